//! The host's connections to daprd's HTTP API, and letting go of them when
//! the stop signal comes.
//!
//! On SIGTERM daprd closes its HTTP server with Go's `http.Server.Shutdown`,
//! which waits for every connection that has not sent its first request
//! until that connection is 5 to 6 seconds old. daprd's whole shutdown has
//! `--dapr-graceful-shutdown-seconds` (5 by default and in the e2e tests,
//! 10 in `k8s/`), after which it exits 1; short of that, such a connection
//! still holds daprd up for seconds. hyper's pool keeps such connections:
//! when a request finds no idle one it starts connecting, and if another
//! request's connection comes back first it takes that one and pools the
//! new connection unused. The host keeps running for its drain window
//! after the same SIGTERM, so it must not keep them: at the stop signal the
//! pool is dropped (its idle connections close) and every later call gets
//! a connection of its own, closed after its answer.

use std::sync::RwLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub struct SidecarConnections {
    /// Until [`SidecarConnections::let_go`].
    pooled: RwLock<Option<HttpClient>>,
    unpooled: HttpClient,
}

impl SidecarConnections {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let build = |max_idle: usize| {
            Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(max_idle)
                .build(connector.clone())
        };
        SidecarConnections { pooled: RwLock::new(Some(build(usize::MAX))), unpooled: build(0) }
    }

    /// The client for the next call.
    pub fn client(&self) -> HttpClient {
        let pooled = self.pooled.read().map(|pooled| pooled.clone()).unwrap_or_default();
        pooled.unwrap_or_else(|| self.unpooled.clone())
    }

    /// Closes the idle connections now; calls in flight keep theirs until
    /// they are answered, and later calls do not pool.
    pub fn let_go(&self) {
        let pooled = match self.pooled.write() {
            Ok(mut pooled) => pooled.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(pooled);
    }
}
