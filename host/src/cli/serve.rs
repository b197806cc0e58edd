//! `wasm-pc serve`: Dapr mode. One image serves the producer Deployment,
//! the consumer Deployment, or both roles.
//!
//! Shutdown follows the contract's section 8: the kubelet sends SIGTERM to
//! this container and to daprd at the same moment, and daprd still delivers
//! while it drains. So after SIGTERM the host keeps serving (in-flight and
//! new deliveries) for `--drain-secs`, reporting not-ready; then it stops
//! accepting, lets what is in flight finish until `--shutdown-deadline-secs`
//! after SIGTERM, and exits 0. A delivery cut off by the deadline never got
//! its 200, so daprd abandons it and Service Bus redelivers it.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{ModuleArgs, RuntimeArgs, shutdown_signal};
use crate::dapr::{App, AppOptions, DaprClient, DaprOutbound, RetryPolicy};
use crate::dispatch::{Dispatcher, Slot};
use crate::http;
use crate::metrics::Metrics;
use crate::reload::{Reloader, Target};
use crate::runtime::{Runtime, World};

/// Which modules this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Producer,
    Consumer,
    Both,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Which role(s) this host plays.
    #[arg(long, env = "WASM_PC_ROLE", value_enum)]
    role: Role,
    /// The port daprd calls (`dapr.io/app-port`).
    #[arg(long, env = "WASM_PC_APP_PORT", default_value_t = 8080)]
    app_port: u16,
    /// Listen address: 0.0.0.0 so kubelet probes reach it; daprd dials 127.0.0.1.
    #[arg(long, env = "WASM_PC_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// The input binding (Component name) the consumer receives from.
    #[arg(long, env = "WASM_PC_INPUT_BINDING", default_value = "orders")]
    input_binding: String,
    /// The input binding's `route` metadata, if the Component sets one.
    #[arg(long, env = "WASM_PC_INPUT_ROUTE")]
    input_route: Option<String>,
    /// Where the producer's requests arrive.
    #[arg(long, env = "WASM_PC_PRODUCE_ROUTE", default_value = "/produce")]
    produce_route: String,
    /// Output binding for poison messages; without one they are refused until
    /// Service Bus dead-letters them after the queue's max delivery count.
    #[arg(long, env = "WASM_PC_DEAD_LETTER_BINDING")]
    dead_letter_binding: Option<String>,
    /// daprd's HTTP port (`DAPR_HTTP_PORT`, set by the injector and `dapr run`).
    #[arg(long, env = "DAPR_HTTP_PORT", default_value_t = 3500)]
    dapr_http_port: u16,
    /// Deliveries handled at once: equal to the Component's
    /// maxConcurrentHandlers and dapr.io/app-max-concurrency.
    #[arg(long, env = "WASM_PC_MAX_CONCURRENCY", default_value_t = 16)]
    max_concurrency: usize,
    /// Largest request or delivery body, in bytes (daprd's own default is 4 MiB).
    #[arg(long, env = "WASM_PC_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds to keep serving after SIGTERM (longer than daprd's
    /// graceful-shutdown-seconds, default 5).
    #[arg(long, env = "WASM_PC_DRAIN_SECS", default_value_t = 6.0)]
    drain_secs: f64,
    /// Seconds after SIGTERM by which in-flight work must be done; keep it
    /// below terminationGracePeriodSeconds.
    #[arg(long, env = "WASM_PC_SHUTDOWN_DEADLINE_SECS", default_value_t = 25.0)]
    shutdown_deadline_secs: f64,
    /// Attempts of a failing output-binding call before the guest sees an error.
    #[arg(long, env = "WASM_PC_SEND_ATTEMPTS", default_value_t = 4)]
    send_attempts: u32,
    #[command(flatten)]
    modules: ModuleArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.shutdown_deadline_secs >= args.drain_secs,
        "--shutdown-deadline-secs must be at least --drain-secs"
    );
    let consumes = matches!(args.role, Role::Consumer | Role::Both);
    let produces = matches!(args.role, Role::Producer | Role::Both);

    // Listen first: daprd dials the app port and probes the binding before
    // anything else, and must not wait for module compilation.
    let address = SocketAddr::new(args.listen_address, args.app_port);
    let listener = TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?;
    tracing::info!(role = ?args.role, "app listening for daprd on {}", listener.local_addr()?);

    let metrics = Arc::new(Metrics::default());
    let token = std::env::var("DAPR_API_TOKEN").ok();
    let retry = RetryPolicy { attempts: args.send_attempts.max(1), ..RetryPolicy::default() };
    let client = DaprClient::new(args.dapr_http_port, token, retry);
    let outbound = Arc::new(DaprOutbound::new(client.clone(), Arc::clone(&metrics)));

    let runtime = Arc::new(Runtime::new(args.runtime.options())?);
    let producer_source = produces.then(|| args.modules.source(World::Producer)).transpose()?;
    let consumer_source = consumes.then(|| args.modules.source(World::Consumer)).transpose()?;
    let (rt, sources) = (Arc::clone(&runtime), (producer_source.clone(), consumer_source.clone()));
    let (producer, consumer) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let read = |s: &crate::modules::ModuleSource| s.read().with_context(|| format!("reading {}", s.path.display()));
        let producer = sources.0.map(|s| read(&s).and_then(|spec| Ok(rt.load_producer(spec)?))).transpose()?;
        let consumer = sources.1.map(|s| read(&s).and_then(|spec| Ok(rt.load_consumer(spec)?))).transpose()?;
        Ok((producer, consumer))
    })
    .await??;
    let producer = producer.map(|m| Arc::new(Slot::new(m)));
    let consumer = consumer.map(|m| Arc::new(Slot::new(m)));
    let mut targets = Vec::new();
    if let (Some(source), Some(slot)) = (producer_source, &producer) {
        targets.push(Target::Producer(source, Arc::clone(slot)));
    }
    if let (Some(source), Some(slot)) = (consumer_source, &consumer) {
        targets.push(Target::Consumer(source, Arc::clone(slot)));
    }
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&runtime),
        Arc::clone(&outbound) as Arc<dyn crate::outbound::Outbound>,
        consumer,
        producer,
    ));
    let reloader =
        Reloader::new(runtime, args.modules.modules_dir.clone(), targets, Arc::clone(&metrics), args.modules.rescan());
    let reload = reloader.status();

    let input_route = consumes.then(|| {
        let raw = args.input_route.clone().unwrap_or_else(|| args.input_binding.clone());
        normalize_route(&raw)
    });
    let app = Arc::new(App::new(
        AppOptions {
            input_route: input_route.clone(),
            produce_route: produces.then(|| normalize_route(&args.produce_route)),
            app_token: std::env::var("APP_API_TOKEN").ok().filter(|t| !t.is_empty()),
            max_concurrency: args.max_concurrency,
            max_body_bytes: args.max_body_bytes,
            dead_letter_binding: args.dead_letter_binding.clone(),
            attempt_memory: 100_000,
        },
        dispatcher,
        metrics,
        outbound,
        reload,
    ));
    if let Some(route) = &input_route {
        tracing::info!(%route, "input binding route ready");
    }

    let (stop, stopped) = watch::channel(false);
    if args.modules.reload {
        tokio::spawn(reloader.run(stopped.clone()));
    }
    let watcher = tokio::spawn(watch_sidecar(client, Arc::clone(&app), stopped.clone()));
    let handler = {
        let app = Arc::clone(&app);
        move |request| Arc::clone(&app).handle(request)
    };
    let deadline = Duration::from_secs_f64(args.shutdown_deadline_secs);
    let drain = Duration::from_secs_f64(args.drain_secs);
    let server = tokio::spawn(http::serve(listener, handler, stopped.clone(), deadline.saturating_sub(drain)));

    shutdown_signal().await;
    let signalled = Instant::now();
    app.draining.store(true, Ordering::Relaxed);
    tracing::info!(?drain, ?deadline, "SIGTERM: still serving while daprd drains");
    tokio::time::sleep(drain).await;
    tracing::info!(in_flight = app.in_flight(), "drain window over: no new connections; finishing in-flight work");
    let _ = stop.send(true);
    let _ = server.await;
    let _ = watcher.await;
    tracing::info!(elapsed = ?signalled.elapsed(), "stopped");
    Ok(ExitCode::SUCCESS)
}

/// daprd cleans the route with `path.Clean` and a leading `/`.
fn normalize_route(raw: &str) -> String {
    let parts: Vec<&str> = raw.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
}

/// Keeps `sidecar_ready` current by polling daprd's outbound health: fast
/// until it first answers, then every few seconds.
async fn watch_sidecar(client: DaprClient, app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    let mut was = false;
    loop {
        let ready = client.outbound_ready().await;
        app.sidecar_ready.store(ready, Ordering::Relaxed);
        if ready != was {
            tracing::info!(ready, "daprd outbound API (/v1.0/healthz/outbound)");
            was = ready;
        }
        let pause = if ready { Duration::from_secs(5) } else { Duration::from_millis(200) };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = crate::shutdown::requested(&mut stopped) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_route;

    #[test]
    fn routes_are_cleaned_like_daprd_does() {
        assert_eq!(normalize_route("orders"), "/orders");
        assert_eq!(normalize_route("/sb//orders/"), "/sb/orders");
        assert_eq!(normalize_route("./a"), "/a");
    }
}
