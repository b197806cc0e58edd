//! Guest stdout/stderr: captured per invocation, then written to tracing.
//!
//! Guests get no host file descriptors. What they print is kept in a bounded
//! buffer (the excess is counted and dropped, never an error the guest sees)
//! and logged line by line, tagged with the module, after the call.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Most bytes kept per stream per invocation.
const CAPACITY: usize = 16 << 10;

#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
}

/// One captured output stream (a guest's stdout or stderr).
#[derive(Debug, Clone, Default)]
pub struct Captured {
    buffer: Arc<Mutex<Buffer>>,
}

impl Captured {
    /// Logs what was captured, one event per line, and empties the buffer.
    pub fn drain_to_tracing(&self, module: &str, stream: &'static str) {
        let Ok(mut buffer) = self.buffer.lock() else {
            return;
        };
        if buffer.bytes.is_empty() && buffer.dropped == 0 {
            return;
        }
        let text = String::from_utf8_lossy(&buffer.bytes);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(target: "guest", module, stream, "{line}");
        }
        if buffer.dropped > 0 {
            tracing::warn!(target: "guest", module, stream, dropped = buffer.dropped, "guest output over {CAPACITY} bytes was dropped");
        }
        buffer.bytes.clear();
        buffer.dropped = 0;
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for Captured {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Ok(mut buffer) = self.buffer.lock() {
            let room = CAPACITY.saturating_sub(buffer.bytes.len());
            let kept = buf.len().min(room);
            buffer.bytes.extend_from_slice(&buf[..kept]);
            buffer.dropped += buf.len() - kept;
        }
        // Report everything as written: a guest must not stall or fail on logs.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
