//! A consumer that misbehaves on request, for the host's fault tests.
//!
//! The message body names the behaviour: `ok`, `retry`, `reject`, `trap`,
//! `loop` (spins forever), `alloc` (grows memory without bound), `recurse`
//! (recurses without bound), `log` (logs and writes to stdout/stderr),
//! `send:<binding>` (sends the message id to `binding`), `config:<key>`
//! (retries with the config value as its reason, so tests can read it),
//! `sleep:<ms>` (waits on the monotonic clock, then succeeds), `whoami`
//! (retries with this build's flavor as the reason), `tag` (sends
//! `<flavor> <id>` to the `tags` binding, then succeeds), `count` (retries
//! with how many calls this instance has served, so tests see reuse),
//! `levels` (retries with the log levels the host has enabled), `panic`
//! (a Rust panic), `send-many:<binding>:<n>` (sends `n` messages to
//! `binding` from one invocation, then succeeds).

use std::sync::atomic::{AtomicU32, Ordering};

use exports::wasm_pc::app::consume::{ConsumeError, Guest, Message};
use wasm_pc::app::log::{Level, enabled, log};
use wasm_pc::app::types::OutboundMessage;
use wasm_pc::app::{config, outbound};

wit_bindgen::generate!({ world: "consumer", path: "../wit" });

struct Misbehaving;

/// Which build this is; see the `flavor-b` feature.
const FLAVOR: &str = if cfg!(feature = "flavor-b") { "flavor-b" } else { "flavor-a" };

/// Calls this instance has served: state that survives only if the host
/// reuses the instance.
static CALLS: AtomicU32 = AtomicU32::new(0);

impl Guest for Misbehaving {
    fn handle(message: Message) -> Result<(), ConsumeError> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        let command = String::from_utf8_lossy(&message.body).into_owned();
        match command.as_str() {
            "ok" => Ok(()),
            "count" => Err(ConsumeError::Retry(format!("calls={calls}"))),
            "levels" => {
                let levels = [
                    (Level::Trace, "trace"),
                    (Level::Debug, "debug"),
                    (Level::Info, "info"),
                    (Level::Warn, "warn"),
                    (Level::Error, "error"),
                ];
                let on: Vec<&str> = levels.into_iter().filter(|(l, _)| enabled(*l)).map(|(_, n)| n).collect();
                Err(ConsumeError::Retry(on.join(",")))
            }
            "whoami" => Err(ConsumeError::Retry(FLAVOR.into())),
            "tag" => {
                let out = OutboundMessage {
                    id: Some(format!("{}-tag", message.id)),
                    body: format!("{FLAVOR} {}", message.id).into_bytes(),
                    content_type: Some("text/plain".into()),
                    metadata: vec![],
                };
                outbound::send("tags", &out).map(|_| ()).map_err(|e| ConsumeError::Retry(format!("{e:?}")))
            }
            "retry" => Err(ConsumeError::Retry("asked to retry".into())),
            "reject" => Err(ConsumeError::Reject("asked to reject".into())),
            "trap" => std::process::abort(),
            "panic" => panic!("asked to panic"),
            "loop" => spin(),
            "alloc" => hoard(),
            "recurse" => Ok(recurse(1).map(|_| ())?),
            "log" => {
                log(Level::Warn, "guest log line", &[("id".into(), message.id.clone())]);
                std::io::Write::write_all(&mut std::io::stdout(), b"to stdout\n").ok();
                std::io::Write::write_all(&mut std::io::stderr(), b"to stderr\n").ok();
                Ok(())
            }
            other => {
                if let Some(binding) = other.strip_prefix("send:") {
                    let out = OutboundMessage {
                        id: None,
                        body: message.id.into_bytes(),
                        content_type: None,
                        metadata: vec![],
                    };
                    return outbound::send(binding, &out)
                        .map(|_| ())
                        .map_err(|e| ConsumeError::Retry(format!("{e:?}")));
                }
                if let Some((binding, n)) = other.strip_prefix("send-many:").and_then(|rest| rest.rsplit_once(':')) {
                    let n: u32 = n.parse().map_err(|_| ConsumeError::Reject(format!("bad count in {other:?}")))?;
                    return send_many(&message.id, binding, n);
                }
                if let Some(rest) = other.strip_prefix("touch:") {
                    return touch(rest);
                }
                if let Some(ms) = other.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    return Ok(());
                }
                if let Some(key) = other.strip_prefix("config:") {
                    return Err(ConsumeError::Retry(config::get(key).unwrap_or_default()));
                }
                Err(ConsumeError::Reject(format!("unknown command {other:?}")))
            }
        }
    }
}

/// Sends `<id> <i>` for i in 0..n: output of any size from one invocation.
fn send_many(id: &str, binding: &str, n: u32) -> Result<(), ConsumeError> {
    for i in 0..n {
        let out = OutboundMessage {
            id: Some(format!("{id}-{i}")),
            body: format!("{id} {i}").into_bytes(),
            content_type: Some("text/plain".into()),
            metadata: vec![],
        };
        outbound::send(binding, &out).map_err(|e| ConsumeError::Retry(format!("send {i} of {n}: {e:?}")))?;
    }
    Ok(())
}

/// `touch:<KiB>[:<ms>]`: dirties KiB of heap, a page at a time, then
/// sleeps ms with it held: a guest that uses its whole memory, as a Python
/// or JS guest does, for the memory benchmark.
fn touch(args: &str) -> Result<(), ConsumeError> {
    let (kib, ms) = args.split_once(':').unwrap_or((args, "0"));
    let (Ok(kib), Ok(ms)) = (kib.parse::<usize>(), ms.parse::<u64>()) else {
        return Err(ConsumeError::Reject(format!("bad touch:{args}")));
    };
    let mut held = vec![0u8; kib << 10];
    for page in held.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&held);
    std::thread::sleep(std::time::Duration::from_millis(ms));
    std::hint::black_box(&mut held);
    Ok(())
}

fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn hoard() -> Result<(), ConsumeError> {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really used.
        chunks.push(std::hint::black_box(vec![1u8; 1 << 20]));
    }
}

/// Recursion whose frames live on the wasm call stack (no address-taken
/// locals, so nothing goes to the shadow stack in linear memory): ends in the
/// engine's stack-overflow trap.
#[inline(never)]
fn recurse(depth: u64) -> Result<u64, ConsumeError> {
    if depth == u64::MAX {
        return Ok(0);
    }
    let below = recurse(depth + 1)?;
    Ok(below ^ depth.rotate_left(7))
}

export!(Misbehaving);
