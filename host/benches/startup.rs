//! Start → ready: the release binary as a consumer (`serve --role
//! consumer`), from exec to `/readyz` 200 and to its first delivery settled,
//! with a warm precompiled cache and cold (compiling `consumer.wasm`).
//!
//! `cargo bench -p wasm-pc --bench startup [-- RUNS]` (default 20 runs of
//! each, interleaved). daprd is replaced by a listener that answers every
//! request 204, which is all the host asks of it before it is ready.

#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const ORDER: &[u8] = br#"{"id":"o-1","customer":"acme","items":[{"sku":"A","qty":2,"price_cents":350}]}"#;

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("wasm-pc-startup-{}", std::process::id()));
    let modules = dir.join("modules");
    if let Err(e) = std::fs::create_dir_all(&modules)
        .and_then(|()| std::fs::write(modules.join("consumer.wasm"), common::module("consumer.wasm")))
    {
        eprintln!("cannot prepare {}: {e}", modules.display());
        std::process::exit(2);
    }
    let sidecar = answer_everything_204();
    let warm_cache = dir.join("warm-cache");
    // One start fills the warm cache.
    start(&modules, &warm_cache, sidecar);

    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for run in 0..runs {
        warm.push(start(&modules, &warm_cache, sidecar));
        let cold_cache = dir.join(format!("cold-cache-{run}"));
        cold.push(start(&modules, &cold_cache, sidecar));
        let _ = std::fs::remove_dir_all(&cold_cache);
    }
    println!("consumer role, {runs} starts each, interleaved");
    println!("| cache | exec → /readyz 200, p50 | max | exec → first delivery settled, p50 | max |");
    println!("|---|---|---|---|---|");
    for (name, samples) in [("warm", &mut warm), ("cold (compiles)", &mut cold)] {
        let mut ready: Vec<Duration> = samples.iter().map(|s| s.0).collect();
        let mut settled: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        let (ready_p50, _) = common::percentiles(&mut ready);
        let (settled_p50, _) = common::percentiles(&mut settled);
        let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            ms(ready_p50),
            ms(max(&ready)),
            ms(settled_p50),
            ms(max(&settled))
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Starts the host, returns (exec → ready, exec → first delivery settled).
fn start(modules: &Path, cache: &Path, sidecar: u16) -> (Duration, Duration) {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
    let began = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-pc"))
        .args(["serve", "--role", "consumer", "--listen-address", "127.0.0.1", "--app-port", &port.to_string()])
        .arg("--cache-dir")
        .arg(cache)
        .env("WASM_PC_MODULES_DIR", modules)
        .env("DAPR_HTTP_PORT", sidecar.to_string())
        .env("WASM_PC_LOG", "warn")
        .env_remove("APP_API_TOKEN")
        .env_remove("DAPR_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start the host: {e}")));
    let ready = until_status(&mut child, port, "GET /readyz", b"", 200, began);
    let settled = until_status(&mut child, port, "POST /orders", ORDER, 200, began);
    let _ = child.kill();
    let _ = child.wait();
    (ready, settled)
}

/// Sends the request every 200 µs until it is answered `status`.
fn until_status(child: &mut Child, port: u16, line: &str, body: &[u8], status: u16, began: Instant) -> Duration {
    let deadline = began + Duration::from_secs(30);
    while Instant::now() < deadline {
        if answer(port, line, body) == Some(status) {
            return began.elapsed();
        }
        if let Ok(Some(exit)) = child.try_wait() {
            fail(&format!("the host exited: {exit}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    fail(&format!("{line} was not answered {status} within 30 s"))
}

fn answer(port: u16, line: &str, body: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let head = format!(
        "{line} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    std::str::from_utf8(reply.get(9..12)?).ok()?.parse().ok()
}

/// A stand-in for daprd's HTTP port: every request answered 204.
fn answer_everything_204() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("cannot listen: {e}")));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if stream.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

fn fail(message: &str) -> ! {
    eprintln!("startup bench: {message}");
    std::process::exit(1)
}
