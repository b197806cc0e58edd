//! A local Azure Service Bus endpoint: AMQP 1.0 in front of the embedded
//! queue, spoken well enough that the real Service Bus SDKs (Go's
//! `azservicebus` inside daprd, Python's `azure-servicebus`, JS
//! `@azure/service-bus`) use it as a namespace, with a development
//! connection string:
//!
//! `Endpoint=sb://localhost:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=<key>;UseDevelopmentEmulator=true;`
//!
//! | layer | module |
//! |---|---|
//! | values we write, lenient reading of what we get | [`wire`] |
//! | protocol headers, frames, performatives, SASL | [`frame`] |
//! | a connection: sessions, links, flow control, settlement | [`connection`], [`link`] |
//! | messages to and from the queue's records | [`message`] |
//! | `$cbs` tokens and their SAS signatures | [`cbs`], [`sas`] |
//! | `$management` operations | [`management`], [`request`] |
//! | which queues exist, and what an address names | [`entities`] |
//!
//! What is left out (sessions, topics, transactions, the management REST
//! API) and why each choice was made is in `docs/servicebus.md`.

pub mod cbs;
mod connection;
pub mod entities;
pub(crate) mod frame;
mod link;
mod management;
pub mod message;
pub(crate) mod request;
#[cfg(test)]
mod robustness;
pub mod sas;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub use cbs::Auth;
pub use entities::{Entities, Node};
pub use sas::SasKey;

use crate::queue::QueueHandle;

/// What every connection shares.
pub struct Shared {
    pub queue: QueueHandle,
    pub entities: Entities,
    pub auth: Auth,
    /// Largest message (or batch) a client may send, in bytes.
    pub max_message_bytes: usize,
}

/// The key name the official emulator and our connection strings use.
pub const DEFAULT_KEY_NAME: &str = "RootManageSharedAccessKey";

/// The connection string for clients of an endpoint at `address`.
pub fn connection_string(address: SocketAddr, key: &SasKey) -> String {
    // Go's SDK accepts only `localhost` as the development host.
    let host = if address.ip().is_loopback() || address.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        address.ip().to_string()
    };
    format!(
        "Endpoint=sb://{host}:{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true;",
        address.port(),
        key.name,
        key.key
    )
}

/// Accepts AMQP connections on `listener` until `shutdown` turns true, at
/// most `max_connections` at once (more are closed at once, with a log line).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "AMQP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::requested(&mut shutdown) => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, max_connections, "AMQP connection refused: too many open");
            drop(stream);
            continue;
        };
        let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
        connections.spawn(async move {
            connection::serve(stream, shared, shutdown).await;
            drop(slot);
        });
    }
    // Connections were told to close; give them a moment to say so.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}
