//! Per-invocation store data and the host side of the guest imports
//! (`outbound`, `log`, `config`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{config, log, outbound, types};
use super::limits::{Limiter, Limits};
use super::stdio::Captured;
use crate::runtime::outbound::Outbound;

/// Most log lines one invocation may write; a chatty guest cannot flood logs.
const MAX_LOG_LINES: u32 = 1_000;
/// Longest log message or field kept, in bytes.
const MAX_LOG_FIELD: usize = 4 << 10;

/// What an invocation's imports need to know about the module they serve.
#[derive(Debug)]
pub struct GuestContext {
    /// `name@version`, put on every log line the guest causes.
    pub label: String,
    /// Read-only values from the deployment (`config` import).
    pub config: Arc<BTreeMap<String, String>>,
}

/// A guest's WASI context and the streams it prints to.
struct Wasi {
    ctx: WasiCtx,
    stdout: Captured,
    stderr: Captured,
}

impl Wasi {
    /// WASI granting nothing: no files, env, args or sockets; stdout/stderr
    /// captured; random and clocks as WASI gives them.
    fn new() -> Self {
        let stdout = Captured::default();
        let stderr = Captured::default();
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Wasi { ctx, stdout, stderr }
    }
}

/// The data of one store, that is of one invocation.
pub struct HostState {
    /// Built at the guest's first WASI call: seeding its random sources is a
    /// good part of a fresh store's cost, and a guest that never calls WASI
    /// (one built without `std`, or a call that needs none of it) never pays it.
    wasi: Option<Wasi>,
    table: ResourceTable,
    pub(super) limiter: Limiter,
    guest: Arc<GuestContext>,
    outbound: Arc<dyn Outbound>,
    log_lines: u32,
    /// When the current invocation must end.
    deadline: Instant,
    /// Time this invocation spent waiting on host calls, so a timeout says
    /// where the time went.
    host_time: std::time::Duration,
    /// The host call running now, and since when.
    in_host_call: Option<(String, Instant)>,
}

impl HostState {
    /// A fresh state; its WASI context comes with the guest's first WASI call.
    pub fn new(guest: Arc<GuestContext>, outbound: Arc<dyn Outbound>, limits: Limits, deadline: Instant) -> Self {
        HostState {
            wasi: None,
            table: ResourceTable::new(),
            limiter: Limiter::new(limits),
            guest,
            outbound,
            log_lines: 0,
            deadline,
            host_time: std::time::Duration::ZERO,
            in_host_call: None,
        }
    }

    /// Readies a reused store for its next invocation: its sends go to
    /// `outbound`, its clock and log budget start again.
    pub(super) fn begin(&mut self, outbound: Arc<dyn Outbound>, deadline: Instant) {
        self.outbound = outbound;
        self.deadline = deadline;
        self.log_lines = 0;
        self.host_time = std::time::Duration::ZERO;
        self.in_host_call = None;
    }

    /// Where the invocation's time went, for a timeout's report.
    pub(super) fn time_spent(&self, limit: std::time::Duration) -> super::TimeSpent {
        let (waiting_on, running) = match &self.in_host_call {
            Some((call, since)) => (Some(call.clone()), since.elapsed()),
            None => (None, std::time::Duration::ZERO),
        };
        super::TimeSpent { limit, in_host_calls: self.host_time + running, waiting_on }
    }

    /// When the current invocation must end.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Writes the captured guest output to tracing.
    pub fn flush_output(&self) {
        if let Some(wasi) = &self.wasi {
            wasi.stdout.drain_to_tracing(&self.guest.label, "stdout");
            wasi.stderr.drain_to_tracing(&self.guest.label, "stderr");
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self.wasi.get_or_insert_with(Wasi::new);
        WasiCtxView { ctx: &mut wasi.ctx, table: &mut self.table }
    }
}

impl types::Host for HostState {}

impl outbound::Host for HostState {
    async fn send(&mut self, binding: String, mut message: types::OutboundMessage) -> Result<String, types::SendError> {
        give_id(&mut message);
        let outbound = Arc::clone(&self.outbound);
        let sending = outbound.send(&binding, message);
        let result = self.timed(format!("outbound.send to {binding}"), sending).await;
        if let Err(error) = &result {
            tracing::debug!(module = %self.guest.label, %binding, ?error, "guest send failed");
        }
        result
    }

    async fn send_batch(
        &mut self,
        binding: String,
        mut messages: Vec<types::OutboundMessage>,
    ) -> Vec<Result<String, types::SendError>> {
        messages.iter_mut().for_each(give_id);
        let count = messages.len();
        let outbound = Arc::clone(&self.outbound);
        let sending = outbound.send_batch(&binding, messages);
        let mut results = self.timed(format!("outbound.send-batch of {count} to {binding}"), sending).await;
        // The guest is promised one result per message, whatever the binding did.
        results.resize_with(count, || Err(types::SendError::Unavailable("the binding gave no result".into())));
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::debug!(module = %self.guest.label, %binding, count, failed, "guest batch send failed in part");
        }
        results
    }
}

/// A message the guest sent without an id gets one: the id is what a send
/// answers with.
fn give_id(message: &mut types::OutboundMessage) {
    if message.id.as_deref().is_none_or(str::is_empty) {
        message.id = Some(uuid::Uuid::new_v4().to_string());
    }
}

impl HostState {
    /// Awaits a host call the guest is blocked on, naming it for the
    /// watchdog while it runs and adding its time to the host's share.
    async fn timed<T>(&mut self, call: String, work: impl Future<Output = T>) -> T {
        let started = Instant::now();
        self.in_host_call = Some((call, started));
        let result = work.await;
        self.in_host_call = None;
        self.host_time += started.elapsed();
        result
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) -> wasmtime::Result<()> {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                tracing::warn!(target: "guest", module = %self.guest.label, "more than {MAX_LOG_LINES} log lines in one invocation; the rest are dropped");
            }
            return Ok(());
        }
        let module = self.guest.label.as_str();
        let message = clip(&message);
        let fields = Fields(&fields);
        match level {
            log::Level::Trace => tracing::trace!(target: "guest", module, %fields, "{message}"),
            log::Level::Debug => tracing::debug!(target: "guest", module, %fields, "{message}"),
            log::Level::Info => tracing::info!(target: "guest", module, %fields, "{message}"),
            log::Level::Warn => tracing::warn!(target: "guest", module, %fields, "{message}"),
            log::Level::Error => tracing::error!(target: "guest", module, %fields, "{message}"),
        }
        Ok(())
    }

    fn enabled(&mut self, level: log::Level) -> wasmtime::Result<bool> {
        if self.log_lines >= MAX_LOG_LINES {
            return Ok(false);
        }
        Ok(match level {
            log::Level::Trace => tracing::enabled!(target: "guest", tracing::Level::TRACE),
            log::Level::Debug => tracing::enabled!(target: "guest", tracing::Level::DEBUG),
            log::Level::Info => tracing::enabled!(target: "guest", tracing::Level::INFO),
            log::Level::Warn => tracing::enabled!(target: "guest", tracing::Level::WARN),
            log::Level::Error => tracing::enabled!(target: "guest", tracing::Level::ERROR),
        })
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.guest.config.get(&key).cloned())
    }

    fn get_all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.guest.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

/// Guest-chosen key/value pairs, shown as `k=v k=v` in one tracing field
/// (tracing field names must be static).
struct Fields<'a>(&'a [(String, String)]);

impl std::fmt::Display for Fields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={:?}", clip(k), clip(v))?;
        }
        Ok(())
    }
}

fn clip(s: &str) -> &str {
    if s.len() <= MAX_LOG_FIELD {
        return s;
    }
    let mut end = MAX_LOG_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
