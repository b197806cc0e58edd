//! Running the real `wasm-pc` binary as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guests;

/// A port on 127.0.0.1 for a child process to listen on: nothing listens
/// there now, and no other call in this test process returns it again.
///
/// Drawn below the kernel's ephemeral range, because a port from `bind(0)`
/// is fair game for the kernel again once let go, until the child binds it:
/// another `bind(0)` here or any outgoing connection can take it first. A
/// host polling its sidecar's port before daprd is up can even connect to
/// itself there (source port = destination port) and hold it; daprd then
/// exits and the test waits for a port that never opens. Below the range
/// only an explicit bind competes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let (low, span) = (10_000, ephemeral_low.saturating_sub(10_000).max(1_000));
    // Test processes that run one after another start at different places.
    let start = std::process::id() % span * 7_919 % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{}", low + span);
}

/// The host binary, with the guests installed as modules.
pub fn command(args: &[&str]) -> Command {
    modules_dir();
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-pc"));
    command.args(args).env("WASM_PC_MODULES_DIR", modules_dir()).env("WASM_PC_LOG", "info");
    command
}

/// A directory holding `producer.wasm`, `consumer.wasm` and `faulty.wasm`,
/// written once per test process.
pub fn modules_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = guests::workspace().join(format!("target/test-modules/{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (which, file) in [("producer", "producer.wasm"), ("consumer", "consumer.wasm"), ("faulty", "faulty.wasm")] {
            std::fs::write(dir.join(file), guests::bytes(which)).unwrap();
        }
        dir
    })
    .clone()
}

/// A running host; killed when dropped.
pub struct Running {
    pub child: Child,
    pub address: SocketAddr,
    /// Kept so the reader threads keep draining the child's pipes.
    _lines: mpsc::Receiver<String>,
}

impl Running {
    /// Starts the host and waits until it says where it listens.
    pub fn start(command: &mut Command, listen_marker: &str) -> Running {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the host did not print {listen_marker:?} in time")
            });
            if let Some(rest) = line.split(listen_marker).nth(1) {
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '/').collect();
                let address = addr.parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
                return Running { child, address, _lines: lines };
            }
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the host did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.1 request on loopback: `(status, body)`.
pub fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split =
        response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let mut body = response[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 4 + size..];
    }
    out
}

/// Runs `wasm-pc queue ... --json` on a database and parses the output.
pub fn queue_json(db: &Path, args: &[&str]) -> serde_json::Value {
    let out = command(&["queue"]).args(args).args(["--json", "--db"]).arg(db).output().unwrap();
    assert!(out.status.success(), "queue {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
