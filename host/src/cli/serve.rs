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
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::sync::watch;

use super::{ModuleArgs, RuntimeArgs, shutdown_signal};
use crate::dapr::{Binding, BindingOptions, DaprClient, DaprOutbound, PubSub, PubSubOptions, RetryPolicy};
use crate::dispatch::Source;
use crate::host::{self, Host, HostOptions, ProduceRoute, StopPolicy};
use crate::metrics::Metrics;
use crate::modules::parse_pairs;
use crate::runtime::World;
use crate::runtime::outbound::Outbound;

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
    /// Bearer token clients must send to the producer route
    /// (`Authorization: Bearer ...`); unset leaves the route open.
    #[arg(long, env = "WASM_PC_PRODUCE_TOKEN", hide_env_values = true)]
    produce_token: Option<String>,
    /// Output binding for poison messages; without one they are refused until
    /// Service Bus dead-letters them after the queue's max delivery count.
    #[arg(long, env = "WASM_PC_DEAD_LETTER_BINDING")]
    dead_letter_binding: Option<String>,
    /// Consume a pub/sub topic instead of the input binding: the pub/sub
    /// Component's name (with `--topic`).
    #[arg(long, env = "WASM_PC_PUBSUB", requires = "topic")]
    pubsub: Option<String>,
    /// The topic to subscribe to (a queue's name, for Service Bus queues).
    #[arg(long, env = "WASM_PC_TOPIC", requires = "pubsub")]
    topic: Option<String>,
    /// Where daprd delivers the topic's events (default `/<pubsub>/<topic>`).
    #[arg(long, env = "WASM_PC_PUBSUB_ROUTE")]
    pubsub_route: Option<String>,
    /// Topic poison events go to (daprd moves them there on DROP); without
    /// one they are discarded.
    #[arg(long, env = "WASM_PC_DEAD_LETTER_TOPIC")]
    dead_letter_topic: Option<String>,
    /// Subscribe with `rawPayload`: events published without a CloudEvent envelope.
    #[arg(long, env = "WASM_PC_RAW_PAYLOAD")]
    raw_payload: bool,
    /// Subscribe in bulk, at most this many events per delivery.
    #[arg(long, env = "WASM_PC_BULK")]
    bulk: Option<u32>,
    /// Output bindings that are pub/sub topics instead: `binding=pubsub/topic`
    /// (repeat, or comma-separated in the env var).
    #[arg(long = "publish", env = "WASM_PC_PUBLISH", value_delimiter = ',')]
    publish: Vec<String>,
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
    listener: super::ListenerArgs,
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
    let listener = host::listen(SocketAddr::new(args.listen_address, args.app_port)).await?;
    tracing::info!(role = ?args.role, "app listening for daprd on {}", listener.local_addr()?);

    let metrics = Arc::new(Metrics::default());
    let token = std::env::var("DAPR_API_TOKEN").ok();
    let retry = RetryPolicy { attempts: args.send_attempts.max(1), ..RetryPolicy::default() };
    let mut outbound = DaprOutbound::new(DaprClient::new(args.dapr_http_port, token, retry), Arc::clone(&metrics));
    for (binding, target) in parse_pairs(args.publish.iter().map(String::as_str)).map_err(anyhow::Error::msg)? {
        let (pubsub, topic) = target
            .split_once('/')
            .filter(|(p, t)| !p.is_empty() && !t.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--publish {binding}={target}: the target is pubsub/topic"))?;
        outbound = outbound.with_topic(&binding, pubsub, topic);
    }
    let outbound = Arc::new(outbound);

    let mut modules = Vec::new();
    if produces {
        modules.push(args.modules.source(World::Producer)?);
    }
    if consumes {
        modules.push(args.modules.source(World::Consumer)?);
    }
    let host = Host::build(HostOptions {
        runtime: args.runtime.options(),
        modules,
        modules_dir: args.modules.modules_dir.clone(),
        reload: args.modules.reload,
        rescan: args.modules.rescan(),
        outbound: Arc::clone(&outbound) as Arc<dyn Outbound>,
        metrics,
        produce: produces.then(|| ProduceRoute {
            path: normalize_route(&args.produce_route),
            token: args.produce_token.clone().filter(|t| !t.is_empty()),
            max_body_bytes: args.max_body_bytes,
        }),
        require_modules: false,
        listener: args.listener.limits(),
        stop: StopPolicy {
            drain: Duration::from_secs_f64(args.drain_secs),
            deadline: Duration::from_secs_f64(args.shutdown_deadline_secs),
        },
    })
    .await?;

    let mut sources: Vec<Arc<dyn Source>> = Vec::new();
    let app_token = std::env::var("APP_API_TOKEN").ok().filter(|t| !t.is_empty());
    if let (true, Some(pubsub), Some(topic)) = (consumes, &args.pubsub, &args.topic) {
        let route = normalize_route(args.pubsub_route.as_deref().unwrap_or(&format!("{pubsub}/{topic}")));
        tracing::info!(%pubsub, %topic, %route, "pub/sub subscription ready");
        sources.push(Arc::new(PubSub::new(PubSubOptions {
            pubsub: pubsub.clone(),
            topic: topic.clone(),
            route,
            dead_letter_topic: args.dead_letter_topic.clone(),
            raw_payload: args.raw_payload,
            bulk: args.bulk,
            app_token: app_token.clone(),
            max_concurrency: args.max_concurrency,
            max_body_bytes: args.max_body_bytes,
            attempt_memory: 100_000,
        })));
    } else if consumes {
        let route = normalize_route(args.input_route.as_deref().unwrap_or(&args.input_binding));
        tracing::info!(%route, "input binding route ready");
        sources.push(Arc::new(Binding::new(
            BindingOptions {
                route,
                app_token,
                max_concurrency: args.max_concurrency,
                max_body_bytes: args.max_body_bytes,
                dead_letter_binding: args.dead_letter_binding.clone(),
                attempt_memory: 100_000,
            },
            Arc::clone(&outbound),
        )));
    }

    let (stop_watch, watching) = watch::channel(false);
    let sidecar = tokio::spawn(Arc::clone(&outbound).watch(watching));
    let stop = async {
        shutdown_signal().await;
        outbound.client().let_go_of_idle_connections();
    };
    host.run(listener, sources, stop).await?;
    let _ = stop_watch.send(true);
    let _ = sidecar.await;
    Ok(ExitCode::SUCCESS)
}

/// daprd cleans the route with `path.Clean` and a leading `/`.
fn normalize_route(raw: &str) -> String {
    let parts: Vec<&str> = raw.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
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
