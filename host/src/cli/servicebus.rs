//! `wasm-pc servicebus`: a local Service Bus endpoint and its queue
//! database, nothing else; and the endpoint settings `dev` shares.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::shutdown_signal;
use crate::queue::{QueueHandle, QueueOptions, StoreOptions};
use crate::servicebus::{self, Auth, Entities, SasKey, Shared};

/// How the endpoint listens and checks tokens (`servicebus`, and `dev
/// --servicebus-port`).
#[derive(Debug, Clone, Args)]
pub struct EndpointArgs {
    /// Address the endpoint binds: loopback, as it is meant for development.
    #[arg(long = "servicebus-address", env = "WASM_PC_SERVICEBUS_ADDRESS", default_value = "127.0.0.1")]
    address: IpAddr,
    /// The SAS key name clients sign with.
    #[arg(long = "servicebus-key-name", env = "WASM_PC_SERVICEBUS_KEY_NAME", default_value = servicebus::DEFAULT_KEY_NAME)]
    key_name: String,
    /// The SAS key clients sign with (the official emulator's is `SAS_KEY_VALUE`).
    #[arg(
        long = "servicebus-key",
        env = "WASM_PC_SERVICEBUS_KEY",
        default_value = "SAS_KEY_VALUE",
        hide_env_values = true
    )]
    key: String,
    /// Take any token without checking its signature.
    #[arg(long = "servicebus-accept-any-token", env = "WASM_PC_SERVICEBUS_ACCEPT_ANY_TOKEN")]
    accept_any_token: bool,
    /// Largest message (or batch) a client may send, in bytes (Service Bus
    /// Standard: 256 KiB).
    #[arg(long = "servicebus-max-message-bytes", env = "WASM_PC_SERVICEBUS_MAX_MESSAGE_BYTES", default_value_t = 256 << 10)]
    max_message_bytes: usize,
    /// Most client connections at once; more are closed at once.
    #[arg(long = "servicebus-max-connections", env = "WASM_PC_SERVICEBUS_MAX_CONNECTIONS", default_value_t = 1024)]
    servicebus_max_connections: usize,
}

impl EndpointArgs {
    fn key(&self) -> SasKey {
        SasKey { name: self.key_name.clone(), key: self.key.clone() }
    }

    /// Binds the endpoint, prints its connection string, and serves it in
    /// the background until `stopped`.
    pub async fn start(
        &self,
        port: u16,
        queue: QueueHandle,
        entities: Entities,
        stopped: watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let address = SocketAddr::new(self.address, port);
        let listener = TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?;
        let bound = listener.local_addr()?;
        let auth = if self.accept_any_token { Auth::AcceptAny } else { Auth::Key(self.key()) };
        let names: Vec<&str> = entities.iter().map(|(name, _)| name).collect();
        tracing::info!(address = %bound, queues = ?names, "Service Bus endpoint listening");
        let mut out = std::io::stdout().lock();
        writeln!(out, "Service Bus endpoint: {}", servicebus::connection_string(bound, &self.key()))?;
        out.flush()?;
        let shared = Arc::new(Shared { queue, entities, auth, max_message_bytes: self.max_message_bytes });
        Ok(tokio::spawn(servicebus::serve(listener, shared, self.servicebus_max_connections, stopped)))
    }
}

#[derive(Debug, Args)]
pub struct ServiceBusArgs {
    /// The AMQP port (Service Bus's is 5672).
    #[arg(long, env = "WASM_PC_SERVICEBUS_PORT", default_value_t = 5672)]
    port: u16,
    /// The queue database file.
    #[arg(long, env = "WASM_PC_DB", default_value = ".wasm-pc/servicebus.db")]
    db: PathBuf,
    /// A queue to serve (repeat, or comma-separated in the env var), with
    /// the properties below.
    #[arg(long = "queue", env = "WASM_PC_SERVICEBUS_QUEUES", value_delimiter = ',')]
    queues: Vec<String>,
    /// Queues from a config file in the Service Bus emulator's format
    /// (`UserConfig.Namespaces[].Queues[]` with `Name` and `Properties`).
    #[arg(long, env = "WASM_PC_SERVICEBUS_CONFIG")]
    config: Option<PathBuf>,
    /// Lock duration of `--queue` queues, in seconds (Service Bus: 60).
    #[arg(long, env = "WASM_PC_SERVICEBUS_LOCK_SECS", default_value_t = 60)]
    lock_secs: u64,
    /// Deliveries before a message is dead-lettered (Service Bus: 10).
    #[arg(long, env = "WASM_PC_SERVICEBUS_MAX_DELIVERY_COUNT", default_value_t = 10)]
    max_delivery_count: u32,
    /// Time to live of messages sent without one, in seconds; unset is forever.
    #[arg(long, env = "WASM_PC_SERVICEBUS_DEFAULT_TTL_SECS")]
    default_ttl_secs: Option<u64>,
    /// Expired messages go to the dead-letter queue instead of being dropped.
    #[arg(long, env = "WASM_PC_SERVICEBUS_DEAD_LETTER_ON_EXPIRY")]
    dead_letter_on_expiry: bool,
    /// fsync every commit.
    #[arg(long, env = "WASM_PC_FULL_SYNC")]
    full_sync: bool,
    #[command(flatten)]
    endpoint: EndpointArgs,
}

impl ServiceBusArgs {
    fn entities(&self) -> anyhow::Result<Entities> {
        anyhow::ensure!(self.max_delivery_count >= 1, "--max-delivery-count must be at least 1");
        anyhow::ensure!(self.lock_secs >= 1, "--lock-secs must be at least 1");
        let options = QueueOptions {
            max_delivery_count: self.max_delivery_count,
            lock_duration: Duration::from_secs(self.lock_secs),
            default_ttl: self.default_ttl_secs.map(Duration::from_secs),
            dead_letter_on_expiry: self.dead_letter_on_expiry,
        };
        let mut entities = match &self.config {
            Some(path) => Entities::from_file(path, options)?,
            None => Entities::default(),
        };
        for name in self.queues.iter().map(|q| q.trim()).filter(|q| !q.is_empty()) {
            anyhow::ensure!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c)),
                "queue name {name:?}: use letters, digits, '-', '.', '_', '~'"
            );
            entities.declare(name, options);
        }
        anyhow::ensure!(!entities.is_empty(), "declare at least one queue: --queue NAME or --config FILE");
        Ok(entities)
    }
}

pub async fn run(args: ServiceBusArgs) -> anyhow::Result<ExitCode> {
    let entities = args.entities()?;
    let queues = entities.iter().map(|(name, options)| (name.to_string(), *options)).collect();
    let store = StoreOptions { queues, full_sync: args.full_sync, ..StoreOptions::default() };
    let queue = QueueHandle::open(&args.db, store)?;
    let (stop, stopped) = watch::channel(false);
    let endpoint = args.endpoint.start(args.port, queue, entities, stopped).await?;
    shutdown_signal().await;
    tracing::info!("shutting down the Service Bus endpoint");
    let _ = stop.send(true);
    let _ = endpoint.await;
    Ok(ExitCode::SUCCESS)
}
