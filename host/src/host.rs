//! The composition root: one host, built once from the shared options, that
//! runs whichever sources a mode picks.
//!
//! A [`Host`] owns the runtime's module slots, the [`Dispatcher`], the
//! [`Reloader`], the metrics and the HTTP listener with the routes every
//! mode has: `/healthz`, `/readyz`, `/metrics`, and the producer's route.
//! Sources ([`Source`]) add what they need: a loop of their own, or routes
//! of their own on the same listener (daprd calls the app there). `dev` and
//! `serve` only pick sources and options.
//!
//! Shutdown, after the stop signal: the host keeps serving for the drain
//! window while reporting not ready (in Kubernetes daprd gets SIGTERM at the
//! same moment and still delivers while it drains), then stops accepting,
//! and lets what is in flight finish until the deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dispatch::{Dispatcher, Slot, Source};
use crate::http::{self, Body};
use crate::metrics::Metrics;
use crate::modules::ModuleSource;
use crate::reload::{ReloadStatus, Reloader, Target};
use crate::runtime::outbound::Outbound;
use crate::runtime::{Runtime, RuntimeOptions, World};

/// Everything a host is built from.
pub struct HostOptions {
    pub runtime: RuntimeOptions,
    /// The modules it runs: a producer, a consumer, or both.
    pub modules: Vec<ModuleSource>,
    /// Watched for new module versions (a ConfigMap mount).
    pub modules_dir: PathBuf,
    /// Watch it at all.
    pub reload: bool,
    /// How often the directory is re-read besides file events.
    pub rescan: Duration,
    /// Where guests' sends go.
    pub outbound: Arc<dyn Outbound>,
    /// The counters (shared with the outbound, which counts sends).
    pub metrics: Arc<Metrics>,
    /// The producer's route, when it runs a producer.
    pub produce: Option<ProduceRoute>,
    /// A module that does not load stops the start (`dev`), or leaves the
    /// host up and unready until one does (`serve`: a refused module must
    /// not take a Deployment down on scale-out).
    pub require_modules: bool,
    pub stop: StopPolicy,
    /// Time-outs and the connection cap of the HTTP listener.
    pub listener: http::ListenerLimits,
}

/// Where producer requests arrive and what they must carry.
#[derive(Debug, Clone)]
pub struct ProduceRoute {
    pub path: String,
    /// `Authorization: Bearer <token>`, when set.
    pub token: Option<String>,
    pub max_body_bytes: usize,
}

/// How the host stops after the signal.
#[derive(Debug, Clone, Copy)]
pub struct StopPolicy {
    /// Keep serving (not ready) this long.
    pub drain: Duration,
    /// Everything in flight must be done by then (from the signal).
    pub deadline: Duration,
}

/// A built host, ready to run sources.
pub struct Host {
    dispatcher: Arc<Dispatcher>,
    reload: ReloadStatus,
    reloader: Option<Reloader>,
    produce: Option<ProduceRoute>,
    stop: StopPolicy,
    listener: http::ListenerLimits,
    draining: AtomicBool,
}

impl Host {
    /// Builds the runtime, loads the modules (see
    /// [`HostOptions::require_modules`]) and the dispatcher.
    pub async fn build(options: HostOptions) -> anyhow::Result<Host> {
        let runtime = Arc::new(Runtime::new(options.runtime.clone())?);
        let metrics = options.metrics;
        let (mut producer, mut consumer, mut targets) = (None, None, Vec::new());
        for source in options.modules {
            match source.world {
                World::Producer => {
                    let slot = Arc::new(Slot::empty());
                    producer = Some(Arc::clone(&slot));
                    targets.push(Target::Producer(source, slot));
                }
                World::Consumer => {
                    let slot = Arc::new(Slot::empty());
                    consumer = Some(Arc::clone(&slot));
                    targets.push(Target::Consumer(source, slot));
                }
            }
        }
        let dispatcher =
            Arc::new(Dispatcher::new(Arc::clone(&runtime), options.outbound, consumer, producer, Arc::clone(&metrics)));
        let mut reloader = Reloader::new(runtime, options.modules_dir, targets, metrics, options.rescan);
        let reload = reloader.status();
        // The first load.
        reloader.scan().await;
        if let Some(reason) = reload.unloaded() {
            anyhow::ensure!(!options.require_modules, "{reason}");
            tracing::error!(%reason, "not ready: waiting for a module this host can load");
        }
        Ok(Host {
            dispatcher,
            reload,
            reloader: options.reload.then_some(reloader),
            produce: options.produce,
            stop: options.stop,
            listener: options.listener,
            draining: AtomicBool::new(false),
        })
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.dispatcher.metrics()
    }

    pub fn reload_status(&self) -> &ReloadStatus {
        &self.reload
    }

    /// Serves `listener` and runs `sources` until `stop` resolves, then
    /// drains as the [`StopPolicy`] says.
    pub async fn run(
        mut self,
        listener: TcpListener,
        sources: Vec<Arc<dyn Source>>,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stopping, stopped) = watch::channel(false);
        if let Some(reloader) = self.reloader.take() {
            tokio::spawn(reloader.run(stopped.clone()));
        }
        let host = Arc::new(self);
        let mut runs = tokio::task::JoinSet::new();
        for source in &sources {
            let (source, dispatcher, stopped) = (Arc::clone(source), Arc::clone(&host.dispatcher), stopped.clone());
            runs.spawn(source.run(dispatcher, stopped));
        }
        let router = Arc::new(Router { host: Arc::clone(&host), sources });
        let handler = move |request| Arc::clone(&router).route(request);
        let grace = host.stop.deadline.saturating_sub(host.stop.drain);
        let server = tokio::spawn(http::serve(listener, handler, stopped.clone(), grace, host.listener));

        stop.await;
        let signalled = Instant::now();
        host.draining.store(true, Ordering::Relaxed);
        if !host.stop.drain.is_zero() {
            tracing::info!(drain = ?host.stop.drain, deadline = ?host.stop.deadline, "stopping: still serving while the sidecar drains");
            tokio::time::sleep(host.stop.drain).await;
        }
        let in_flight = host.metrics().in_flight.load(Ordering::Relaxed);
        tracing::info!(in_flight, "no new work; finishing what is in flight");
        let _ = stopping.send(true);
        let _ = server.await;
        let left = host.stop.deadline.saturating_sub(signalled.elapsed());
        if tokio::time::timeout(left.max(Duration::from_secs(1)), async { while runs.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!("deliveries still running at the deadline; they will be redelivered");
        }
        tracing::info!(elapsed = ?signalled.elapsed(), "stopped");
        Ok(())
    }

    /// Why the host is not ready, if it is not.
    fn not_ready(&self, sources: &[Arc<dyn Source>]) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining after the stop signal".into());
        }
        if let Some(reason) = self.reload.unloaded() {
            return Some(reason);
        }
        if self.dispatcher.has_producer()
            && let Some(reason) = self.dispatcher.outbound().not_ready()
        {
            return Some(reason);
        }
        sources.iter().find_map(|s| s.not_ready())
    }
}

/// Routes requests: the host's own, then each source's.
struct Router {
    host: Arc<Host>,
    sources: Vec<Arc<dyn Source>>,
}

impl Router {
    async fn route(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let host = &self.host;
        if let Some(produce) = host.produce.as_ref().filter(|p| p.path == request.uri().path()) {
            if request.method() != Method::POST {
                return http::error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            if !bearer_matches(&request, produce.token.as_deref()) {
                let mut response = http::error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                response
                    .headers_mut()
                    .insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
                return response;
            }
            return http::produce(Arc::clone(&host.dispatcher), request, produce.max_body_bytes).await;
        }
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => return http::text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                let reason = host.not_ready(&self.sources);
                let status = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                let body = http::readiness(reason.is_none(), reason.as_deref(), &host.dispatcher, &host.reload);
                return http::json(status, &body);
            }
            (&Method::GET, "/metrics") => {
                let mut readings = host.dispatcher.readings();
                for source in &self.sources {
                    readings.extend(Arc::clone(source).readings().await);
                }
                let modules = host.dispatcher.live_modules();
                return http::text(StatusCode::OK, host.metrics().render(&modules, &readings));
            }
            (_, "/healthz" | "/readyz" | "/metrics") => {
                return http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
            }
            _ => {}
        }
        match self.sources.iter().find(|s| s.claims(&request)) {
            Some(source) => Arc::clone(source).handle(Arc::clone(&host.dispatcher), request).await,
            None => http::error(StatusCode::NOT_FOUND, format!("no route {}", request.uri().path())),
        }
    }
}

fn bearer_matches<B>(request: &Request<B>, expected: Option<&str>) -> bool {
    let Some(expected) = expected else { return true };
    let given = request.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
    given.strip_prefix(b"Bearer ").is_some_and(|token| http::constant_time_eq(token, expected.as_bytes()))
}

/// Binds `address`, before anything slow (daprd dials the app port first
/// thing and must not wait for module compilation).
pub async fn listen(address: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))
}
