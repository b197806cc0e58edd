//! `cargo xtask faults`: the long fault suite, against the release binary.
//!
//! Builds the guests and `cargo build --release -p wasm-pc`, then runs each
//! scenario on its own database in `target/faults/` (wiped at the start) and
//! prints one table (also written to `target/faults/results.md`, logs of
//! every process in `target/faults/logs/`). docs/RELIABILITY.md explains the
//! scenarios and records a run.
//!
//! - processes: SIGKILL at random moments during a 50,000-order embedded run
//!   (at least 20 kills, a restart on the same `--db` after each), then a
//!   ledger by order id; SIGTERM drains in `dev` and in `serve` (the latter
//!   with a stand-in for daprd's health endpoint).
//! - guests, with `faulty.wasm` as the consumer and every 10th message
//!   failing: trap (also with instances reused), endless loop, unbounded
//!   memory, deep recursion, a slow guest past the deadline; each failure
//!   must be classified in `/metrics` while the host keeps serving. Then the producer at its largest output
//!   (full batches and the largest body) and a 100 MiB body (413).
//! - queue: another process holding the write lock past the busy timeout,
//!   a full database (`--max-db-mib`), `wasm-pc queue` commands while `dev`
//!   runs.
//!
//! Rules: traffic only to 127.0.0.1; every loop bounded in count and time;
//! every process started here is killed when its scenario ends, passed or
//! failed (`Proc`'s `Drop`). `FAULTS_SEED=N` repeats the kill timings of a
//! run; `FAULTS_ONLY=a,b` runs only the scenarios whose names contain one of
//! those words.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Orders the SIGKILL run must get acknowledged.
const KILL_ORDERS: u64 = 50_000;
/// Fewest SIGKILLs in that run.
const KILLS: u32 = 20;
/// Orders per request (the sample producer takes at most 1,000).
const BATCH: u64 = 100;
/// Over this (cents), the sample consumer rejects an order: config
/// `max-order-cents`, so dead letters take part in every ledger.
const CREDIT_LIMIT: u64 = 100_000;
/// Every this-many-th order is over the credit limit.
const EXPENSIVE_EVERY: u64 = 50;

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    crate::guests(root)?;
    crate::cargo(root, &["build", "--release", "-p", "wasm-pc"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/wasm-pc");
    let work = root.join("target/faults");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    let modules = work.join("modules");
    std::fs::create_dir_all(&modules)?;
    std::fs::create_dir_all(work.join("logs"))?;
    // A private copy: a concurrent `cargo xtask guests` must not swap modules mid-run.
    for file in ["producer.wasm", "consumer.wasm", "faulty.wasm"] {
        std::fs::copy(root.join("target/modules").join(file), modules.join(file))
            .with_context(|| format!("copying {file}"))?;
    }
    let seed = std::env::var("FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let only: Vec<String> = std::env::var("FAULTS_ONLY")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let env = Env { bin, cache: work.join("cache"), modules, work: work.clone(), seed };
    eprintln!("faults: binary {}, work dir {}, seed {seed}", env.bin.display(), work.display());

    type Scenario = fn(&Env) -> anyhow::Result<Row>;
    let scenarios: Vec<(&str, Scenario)> = vec![
        ("kill9-embedded", kill9_embedded),
        ("sigterm-dev", sigterm_dev),
        ("sigterm-serve", sigterm_serve),
        ("guest-trap", |e| guest_fault(e, "guest-trap", "trap", &[])),
        ("guest-loop", |e| guest_fault(e, "guest-loop", "loop", &[])),
        ("guest-alloc", |e| guest_fault(e, "guest-alloc", "alloc", &[])),
        ("guest-recurse", |e| guest_fault(e, "guest-recurse", "recurse", &[])),
        ("guest-slow", |e| guest_fault(e, "guest-slow", "sleep:1000", &[])),
        ("guest-panic", |e| guest_fault(e, "guest-panic", "panic", &[])),
        ("guest-trap-reuse", |e| guest_fault(e, "guest-trap-reuse", "trap", &["--instance-reuse", "16"])),
        ("guest-send-many", guest_send_many),
        ("producer-max-output", producer_max_output),
        ("body-100mib", body_100mib),
        ("queue-lock-held", queue_lock_held),
        ("queue-disk-full", queue_disk_full),
        ("queue-cli-concurrent", queue_cli_concurrent),
    ];
    let mut rows = Vec::new();
    for (name, scenario) in scenarios {
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        eprintln!("faults: --- {name}");
        let began = Instant::now();
        let mut row = match scenario(&env) {
            Ok(row) => row,
            Err(e) => {
                let mut row = Row::new(name);
                row.fail(format!("did not finish: {e:#}"));
                row
            }
        };
        row.secs = began.elapsed().as_secs_f64();
        let verdict = if row.failures.is_empty() { "ok".to_string() } else { row.failures.join("; ") };
        eprintln!("faults: {name}: {verdict} ({:.1} s)", row.secs);
        rows.push(row);
    }

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let report = render(&rows, cores, seed, started.elapsed());
    std::fs::write(work.join("results.md"), &report)?;
    writeln!(std::io::stdout().lock(), "{report}")?;
    let failed: Vec<&str> = rows.iter().filter(|r| !r.failures.is_empty()).map(|r| r.name.as_str()).collect();
    if !failed.is_empty() {
        bail!("faults: {} scenario(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// What every scenario needs.
struct Env {
    bin: PathBuf,
    modules: PathBuf,
    /// Precompiled modules, shared by every process: restarts skip compilation.
    cache: PathBuf,
    work: PathBuf,
    seed: u64,
}

impl Env {
    fn db(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.db"))
    }

    /// The host binary with the environment cleared of our own variables
    /// (a stray `WASM_PC_DB` must not redirect a scenario).
    fn command(&self) -> Command {
        let mut command = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("WASM_PC_") || key.starts_with("DAPR_") || key == "APP_API_TOKEN" {
                command.env_remove(&key);
            }
        }
        command.env("WASM_PC_LOG", "info");
        command
    }

    /// `wasm-pc queue <args> --json --db <db>`: its stdout, or why it failed.
    fn queue(&self, db: &Path, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .arg("queue")
            .args(args)
            .arg("--json")
            .arg("--db")
            .arg(db)
            .stdin(Stdio::null())
            .output()
            .context("cannot run wasm-pc queue")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("queue {args:?}: {}: {}", out.status, stderr.lines().last().unwrap_or_default());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn depth(&self, db: &Path, queue: &str) -> anyhow::Result<Depth> {
        let text = self.queue(db, &["stats", queue])?;
        let n = |key| json_num(&text, key).unwrap_or(0);
        Ok(Depth {
            active: n("active"),
            locked: n("locked"),
            scheduled: n("scheduled"),
            dead_lettered: n("dead_lettered"),
        })
    }

    /// Every message of a queue (`peek`) or its dead letters (`dead-letters`):
    /// the string field `key` of each.
    fn fields(&self, db: &Path, which: &str, queue: &str, key: &str) -> anyhow::Result<Vec<String>> {
        Ok(json_strings(&self.queue(db, &[which, queue, "--limit", "10000000"])?, key))
    }

    /// Waits until `queue` has nothing active, locked or scheduled.
    fn drained(&self, db: &Path, queue: &str, within: Duration) -> anyhow::Result<Depth> {
        let deadline = Instant::now() + within;
        loop {
            let depth = self.depth(db, queue)?;
            if depth.pending() == 0 {
                return Ok(depth);
            }
            if Instant::now() > deadline {
                bail!("{queue} did not drain within {within:?}: {depth:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `wasm-pc dev` on `db`, listening on a free loopback port, and
    /// waits until it says where.
    fn dev(&self, log: &str, db: &Path, extra: &[&str]) -> anyhow::Result<Dev> {
        let mut command = self.command();
        command
            .args(["dev", "--listen", "127.0.0.1:0", "--modules-dir"])
            .arg(&self.modules)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--db")
            .arg(db)
            .args(extra);
        let mut proc = Proc::spawn(command, &self.work.join("logs").join(format!("{log}.log")))?;
        let marker = "producer endpoint: POST http://";
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
            if let Some(rest) = text.split(marker).nth(1) {
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '/').collect();
                let addr: SocketAddr = addr.parse().with_context(|| format!("bad address {addr:?}"))?;
                return Ok(Dev { proc, addr });
            }
            if let Some(status) = proc.child.try_wait()? {
                bail!("wasm-pc dev exited at start ({status}); see {}", proc.log.display());
            }
            if Instant::now() > deadline {
                bail!("wasm-pc dev did not start within 60 s; see {}", proc.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Depth {
    active: u64,
    locked: u64,
    scheduled: u64,
    dead_lettered: u64,
}

impl Depth {
    fn pending(&self) -> u64 {
        self.active + self.locked + self.scheduled
    }
}

/// A child process, its output in a log file; killed and reaped when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut command: Command, log: &Path) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        Ok(Proc { child, log: log.to_path_buf() })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `within` for the exit: the status and how
    /// long it took.
    fn terminate(&mut self, within: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let sent = Instant::now();
        self.signal_term()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, sent.elapsed()));
            }
            if sent.elapsed() > within {
                self.kill9();
                bail!("no exit within {within:?} of SIGTERM (killed)");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal_term(&self) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        Ok(())
    }

    /// Open descriptors and resident memory (KiB), from /proc.
    fn usage(&self) -> Usage {
        let pid = self.pid();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0);
        Usage { fds, rss_kib: rss }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    fds: u64,
    rss_kib: u64,
}

/// A running `wasm-pc dev`.
struct Dev {
    proc: Proc,
    addr: SocketAddr,
}

impl Dev {
    fn metrics(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        metrics(self.addr)
    }
}

/// One scenario's figures. `None` is "does not apply".
struct Row {
    name: String,
    produced: Option<u64>,
    completed: Option<u64>,
    dead_lettered: Option<u64>,
    remaining: Option<u64>,
    lost: Option<u64>,
    duplicated: Option<u64>,
    failed_requests: u64,
    restarts: u64,
    before: Usage,
    after: Usage,
    secs: f64,
    notes: Vec<String>,
    failures: Vec<String>,
}

impl Row {
    fn new(name: &str) -> Row {
        Row {
            name: name.to_string(),
            produced: None,
            completed: None,
            dead_lettered: None,
            remaining: None,
            lost: None,
            duplicated: None,
            failed_requests: 0,
            restarts: 0,
            before: Usage::default(),
            after: Usage::default(),
            secs: 0.0,
            notes: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    fn check(&mut self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.fail(why());
        }
    }

    fn ledger(&mut self, l: &Ledger) {
        self.produced = Some(l.produced);
        self.completed = Some(l.completed);
        self.dead_lettered = Some(l.dead_lettered);
        self.remaining = Some(l.remaining);
        self.lost = Some(l.lost);
        self.duplicated = Some(l.duplicated);
        self.check(l.lost == 0, || format!("{} acknowledged messages lost, e.g. {:?}", l.lost, l.lost_sample));
        self.check(l.phantom == 0, || format!("{} messages nobody produced", l.phantom));
        self.check(l.produced == l.completed + l.dead_lettered + l.remaining, || {
            format!(
                "produced {} != completed {} + dead-lettered {} + remaining {}",
                l.produced, l.completed, l.dead_lettered, l.remaining
            )
        });
        self.check(l.both == 0, || format!("{} messages both completed and dead-lettered", l.both));
    }
}

/// The accounting of a run by message id.
#[derive(Debug, Default)]
struct Ledger {
    /// Acknowledged, plus unacknowledged ones that were found in the queue.
    produced: u64,
    /// Unacknowledged (no answer, or an error answer) yet found in the queue.
    landed_unacknowledged: u64,
    /// Distinct ids completed.
    completed: u64,
    dead_lettered: u64,
    remaining: u64,
    /// Acknowledged but found nowhere.
    lost: u64,
    lost_sample: Vec<String>,
    /// Completions beyond the first, summed over ids.
    duplicated: u64,
    /// Ids found but never sent.
    phantom: u64,
    /// Ids both completed and dead-lettered.
    both: u64,
}

/// Counts by id: `acknowledged` (202, or in a failed batch's `sent` list),
/// `unknown` (no answer or an error answer: may or may not have landed),
/// against what the database holds: completions forwarded to `done`
/// (`<id>-processed`), dead letters and what is still in `queue`.
fn ledger(env: &Env, db: &Path, queue: &str, acknowledged: &[String], unknown: &[String]) -> anyhow::Result<Ledger> {
    let mut done: BTreeMap<String, u64> = BTreeMap::new();
    for id in env.fields(db, "peek", "done", "id")? {
        let order = id.strip_suffix("-processed").unwrap_or(&id).to_string();
        *done.entry(order).or_default() += 1;
    }
    let dead: BTreeSet<String> = env.fields(db, "dead-letters", queue, "id")?.into_iter().collect();
    let left: BTreeSet<String> = env.fields(db, "peek", queue, "id")?.into_iter().collect();
    let acked: BTreeSet<&str> = acknowledged.iter().map(String::as_str).collect();
    let unknown: BTreeSet<&str> = unknown.iter().map(String::as_str).filter(|id| !acked.contains(id)).collect();
    let found = |id: &str| done.contains_key(id) || dead.contains(id) || left.contains(id);
    let lost: Vec<&&str> = acked.iter().filter(|id| !found(id)).collect();
    let landed = unknown.iter().filter(|id| found(id)).count() as u64;
    let all_found: BTreeSet<&str> = done
        .keys()
        .map(String::as_str)
        .chain(dead.iter().map(String::as_str))
        .chain(left.iter().map(String::as_str))
        .collect();
    Ok(Ledger {
        produced: acked.len() as u64 + landed,
        landed_unacknowledged: landed,
        completed: done.len() as u64,
        dead_lettered: dead.len() as u64,
        remaining: left.len() as u64,
        lost: lost.len() as u64,
        lost_sample: lost.iter().take(5).map(|s| s.to_string()).collect(),
        duplicated: done.values().map(|n| n - 1).sum(),
        phantom: all_found.iter().filter(|id| !acked.contains(*id) && !unknown.contains(*id)).count() as u64,
        both: done.keys().filter(|id| dead.contains(*id)).count() as u64,
    })
}

// ---------------------------------------------------------------- processes

/// SIGKILL at random moments while orders are posted and consumed; a restart
/// on the same database after each; at the end a clean run drains it all.
fn kill9_embedded(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("kill9-embedded");
    let db = env.db("kill9");
    let config = format!("forward-binding=done,max-order-cents={CREDIT_LIMIT}");
    let args = [
        "--bindings",
        "orders,done",
        "--consumer-config",
        config.as_str(),
        "--lock-ms",
        "1000",
        "--retry-backoff-ms",
        "5",
    ];
    let poster = Arc::new(Poster::new("k"));
    let mut rng = Rng(env.seed | 1);
    let began = Instant::now();
    let (mut kills, mut rounds, mut kills_with_work) = (0u32, 0u32, 0u32);
    let (mut kills_after_posting, mut kills_consuming) = (0u32, 0u32);
    let mut kill_points_ms = Vec::new();
    // After posting ended, up to 5 more kills while the consumer still has
    // a backlog.
    let mut last_left = 0;
    while poster.acknowledged() < KILL_ORDERS || kills < KILLS || (kills_consuming < 5 && last_left > 0) {
        if rounds >= 120 || began.elapsed() > Duration::from_secs(360) {
            row.fail(format!("stopped after {rounds} rounds / {:?}", began.elapsed()));
            break;
        }
        let mut host = env.dev(&format!("kill9-r{rounds:03}"), &db, &args)?;
        if rounds == 0 {
            row.before = host.proc.usage();
        } else {
            row.restarts += 1;
        }
        rounds += 1;
        let stop = Arc::new(AtomicBool::new(false));
        let posting = poster.acknowledged() < KILL_ORDERS;
        let threads: Vec<_> = if posting {
            (0..2)
                .map(|_| {
                    let (poster, stop, addr) = (Arc::clone(&poster), Arc::clone(&stop), host.addr);
                    std::thread::spawn(move || poster.post_until(addr, &stop, KILL_ORDERS, BATCH))
                })
                .collect()
        } else {
            Vec::new()
        };
        // While posting: anywhere in 0.15-0.9 s. After: early, while the
        // consumer works through the backlog the last kill left.
        let wait = if posting { 150 + rng.below(750) } else { 100 + rng.below(400) };
        std::thread::sleep(Duration::from_millis(wait));
        host.proc.kill9();
        kills += 1;
        kill_points_ms.push(wait);
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            let _ = thread.join();
        }
        // A kill with nothing left to consume proves little: count only
        // those that left messages behind (queued, or locked by the dead host).
        let left = env.depth(&db, "orders")?.pending();
        last_left = left;
        kills_with_work += u32::from(left > 0);
        if !posting {
            kills_after_posting += 1;
            kills_consuming += u32::from(left > 0);
        }
    }
    let mut host = env.dev("kill9-final", &db, &args)?;
    row.restarts += 1;
    let backlog = env.depth(&db, "orders")?.pending();
    let draining = Instant::now();
    let drained = env.drained(&db, "orders", Duration::from_secs(180));
    let drain_time = draining.elapsed();
    row.after = host.proc.usage();
    let (status, took) = host.proc.terminate(Duration::from_secs(30))?;
    drained?;
    row.check(status.success(), || format!("the last run exited {status} after SIGTERM"));

    let acked = poster.acked_ids();
    let unknown = poster.unknown_ids();
    let l = ledger(env, &db, "orders", &acked, &unknown)?;
    row.ledger(&l);
    row.failed_requests = poster.failed.load(Ordering::Relaxed);
    // The credit limit is the only reason to dead-letter here.
    let dead = env.fields(&db, "dead-letters", "orders", "id")?;
    let misfiled = dead.iter().filter(|id| !is_expensive(id)).count();
    row.check(misfiled == 0, || format!("{misfiled} dead letters that are not over the credit limit"));
    let expensive = acked.iter().filter(|id| is_expensive(id)).count() as u64;
    row.check(l.dead_lettered >= expensive, || {
        format!("{expensive} acknowledged orders over the limit, only {} dead-lettered", l.dead_lettered)
    });
    kill_points_ms.sort_unstable();
    row.note(format!(
        "{kills} SIGKILLs, one per run, {kills_with_work} of them leaving messages queued or locked ({kills_after_posting} after posting ended, {kills_consuming} of those with a backlog left), {} ms to {} ms after the host was up; then a clean run drained the {backlog} messages left in {:.1} s and exited {} within {:.2} s of SIGTERM",
        kill_points_ms.first().unwrap_or(&0),
        kill_points_ms.last().unwrap_or(&0),
        drain_time.as_secs_f64(),
        status.code().map(|c| c.to_string()).unwrap_or_else(|| status.to_string()),
        took.as_secs_f64()
    ));
    row.note(format!(
        "{} orders acknowledged (202); {} requests cut off by a kill, of whose orders {} had landed anyway (counted as produced); {} refused at connect and re-posted",
        acked.len(),
        row.failed_requests,
        l.landed_unacknowledged,
        poster.reposted.load(Ordering::Relaxed)
    ));
    row.note(format!(
        "dead letters: the {} orders over the credit limit (every {EXPENSIVE_EVERY}th); duplicates counted by order id in `done`",
        l.dead_lettered
    ));
    Ok(row)
}

/// Order ids `<prefix><n>` where `n % EXPENSIVE_EVERY == 0` are over the credit limit.
fn is_expensive(id: &str) -> bool {
    let digits: String = id.chars().skip_while(|c| !c.is_ascii_digit()).collect();
    digits.parse::<u64>().is_ok_and(|n| n % EXPENSIVE_EVERY == 0)
}

fn order_id(prefix: &str, n: u64) -> String {
    format!("{prefix}{n:07}")
}

fn orders_json(prefix: &str, from: u64, count: u64) -> String {
    let mut body = String::from("[");
    for n in from..from + count {
        if n > from {
            body.push(',');
        }
        let price = if n % EXPENSIVE_EVERY == 0 { CREDIT_LIMIT * 2 } else { 100 + n % 900 };
        body.push_str(&format!(
            r#"{{"id":"{}","customer":"c{}","items":[{{"sku":"S{}","qty":1,"price_cents":{price}}}]}}"#,
            order_id(prefix, n),
            n % 7,
            n % 13
        ));
    }
    body.push(']');
    body
}

/// Posts order batches and keeps the books: which ids were acknowledged,
/// which got no (good) answer and may or may not have landed.
struct Poster {
    prefix: String,
    next_batch: AtomicU64,
    /// Batches refused at connect (the host was down): never reached it,
    /// so they are posted again.
    retry: Mutex<Vec<u64>>,
    acked: Mutex<Vec<String>>,
    unknown: Mutex<Vec<String>>,
    acked_count: AtomicU64,
    /// Requests without a 202: cut off, or answered with an error.
    failed: AtomicU64,
    reposted: AtomicU64,
    /// Slowest answer, in milliseconds.
    slowest_ms: AtomicU64,
    /// Error answers by status.
    statuses: Mutex<BTreeMap<u16, u64>>,
}

impl Poster {
    fn new(prefix: &str) -> Poster {
        Poster {
            prefix: prefix.to_string(),
            next_batch: AtomicU64::new(0),
            retry: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
            unknown: Mutex::new(Vec::new()),
            acked_count: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reposted: AtomicU64::new(0),
            slowest_ms: AtomicU64::new(0),
            statuses: Mutex::new(BTreeMap::new()),
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acked_count.load(Ordering::Relaxed)
    }

    fn acked_ids(&self) -> Vec<String> {
        self.acked.lock().map(|v| v.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    fn unknown_ids(&self) -> Vec<String> {
        self.unknown.lock().map(|v| v.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    fn error_statuses(&self) -> String {
        let statuses = self.statuses.lock().map(|m| m.clone()).unwrap_or_else(|e| e.into_inner().clone());
        statuses.iter().map(|(s, n)| format!("{n}x {s}")).collect::<Vec<_>>().join(", ")
    }

    fn push(list: &Mutex<Vec<String>>, ids: impl IntoIterator<Item = String>) {
        let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
        list.extend(ids);
    }

    /// Posts batches of `size` until `stop`, `target` acknowledged orders, a
    /// request is cut off (the host died), or 2,000 requests.
    fn post_until(&self, addr: SocketAddr, stop: &AtomicBool, target: u64, size: u64) {
        for _ in 0..2_000 {
            if stop.load(Ordering::Relaxed) || self.acknowledged() >= target {
                return;
            }
            let retried = self.retry.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let batch = retried.unwrap_or_else(|| self.next_batch.fetch_add(1, Ordering::Relaxed));
            if retried.is_some() {
                self.reposted.fetch_add(1, Ordering::Relaxed);
            }
            if !self.post(addr, batch, size) {
                return;
            }
        }
    }

    /// One batch; false when the host is unreachable or died mid-request.
    fn post(&self, addr: SocketAddr, batch: u64, size: u64) -> bool {
        let from = batch * size;
        let ids: Vec<String> = (from..from + size).map(|n| order_id(&self.prefix, n)).collect();
        let body = orders_json(&self.prefix, from, size);
        let sent = Instant::now();
        let answer = request(addr, "POST", "/produce", &[("content-type", "application/json")], body.as_bytes());
        self.slowest_ms.fetch_max(sent.elapsed().as_millis() as u64, Ordering::Relaxed);
        match answer {
            Ok((202, _)) => {
                self.acked_count.fetch_add(size, Ordering::Relaxed);
                Self::push(&self.acked, ids);
                true
            }
            Ok((status, reply)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                *self.statuses.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
                let reply = String::from_utf8_lossy(&reply);
                // The sample producer's own refusal names what it sent
                // before a send failed; the failed send and the rest were
                // not stored. Any other error answer (the host's own) may
                // come after some sends committed.
                if let (Some(sent), Some(_)) = (json_string_array(&reply, "sent"), json_str(&reply, "failed")) {
                    self.acked_count.fetch_add(sent.len() as u64, Ordering::Relaxed);
                    Self::push(&self.acked, sent);
                } else {
                    Self::push(&self.unknown, ids);
                }
                true
            }
            Err(Failure::NotSent(_)) => {
                self.retry.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
                false
            }
            Err(Failure::NoAnswer(_)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Self::push(&self.unknown, ids);
                false
            }
        }
    }
}

/// SIGTERM to `dev` while deliveries run: they finish and settle, exit 0.
fn sigterm_dev(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("sigterm-dev");
    let db = env.db("sigterm-dev");
    let mut host = env.dev(
        "sigterm-dev",
        &db,
        &["--consumer-file", "faulty.wasm", "--messages-per-worker", "1", "--bindings", "orders,done"],
    )?;
    row.before = host.proc.usage();
    const SLOW: u64 = 4;
    let mut produced = 0;
    for _ in 0..SLOW {
        match raw(host.addr, b"sleep:2000") {
            Ok((202, _)) => produced += 1,
            _ => row.failed_requests += 1,
        }
    }
    let in_flight = wait_for(Duration::from_secs(10), || Ok(host.metrics()?.get("in_flight").copied() == Some(SLOW)));
    row.check(in_flight.is_ok(), || format!("{SLOW} deliveries never ran at once: {in_flight:?}"));
    row.after = host.proc.usage();
    let (status, took) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));
    // Each delivery sleeps 2 s; SIGTERM came once all were running.
    row.check(took >= Duration::from_millis(1_000), || {
        format!("exited after {took:?}: did not wait for the deliveries")
    });
    let depth = env.depth(&db, "orders")?;
    row.produced = Some(produced);
    row.dead_lettered = Some(depth.dead_lettered);
    row.remaining = Some(depth.pending());
    // Completed = what left the queue; nothing forwards here.
    let completed = produced.saturating_sub(depth.dead_lettered + depth.pending());
    row.completed = Some(completed);
    row.lost = Some(0);
    row.check(depth.pending() == 0 && depth.dead_lettered == 0, || format!("left after the drain: {depth:?}"));
    row.note(format!(
        "{SLOW} deliveries of `sleep:2000` in flight at SIGTERM; exit {} after {:.2} s with all {completed} settled (none left locked)",
        status.code().unwrap_or(-1),
        took.as_secs_f64()
    ));
    let log = std::fs::read_to_string(&host.proc.log).unwrap_or_default();
    row.check(log.contains("finishing deliveries in flight"), || "no drain line in the log".into());
    Ok(row)
}

/// SIGTERM to `serve --role consumer`: it keeps taking deliveries for the
/// drain window, finishes what is in flight, answers each 200, exits 0.
fn sigterm_serve(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("sigterm-serve");
    let sidecar = Sidecar::start()?;
    let port = free_port()?;
    let mut command = env.command();
    command
        .args(["serve", "--role", "consumer", "--listen-address", "127.0.0.1", "--app-port", &port.to_string()])
        .args(["--input-binding", "orders", "--consumer-file", "faulty.wasm"])
        .args(["--drain-secs", "2", "--shutdown-deadline-secs", "15", "--modules-dir"])
        .arg(&env.modules)
        .arg("--cache-dir")
        .arg(&env.cache)
        .env("DAPR_HTTP_PORT", sidecar.port.to_string());
    let mut host = Proc::spawn(command, &env.work.join("logs/sigterm-serve.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(60), || Ok(matches!(get(addr, "/readyz"), Ok((200, _)))))
        .context("serve never became ready")?;
    row.before = host.usage();

    // Four slow deliveries, as daprd would send them, each on its own connection.
    const SLOW: u64 = 4;
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            std::thread::spawn(move || {
                let id = format!("slow-{i}");
                request(addr, "POST", "/orders", &[("id", &id)], b"sleep:3000").map(|(s, _)| s)
            })
        })
        .collect();
    let running = wait_for(Duration::from_secs(10), || Ok(metrics(addr)?.get("in_flight").copied() == Some(SLOW)));
    row.check(running.is_ok(), || format!("the slow deliveries never ran at once: {running:?}"));
    row.after = host.usage();
    let signalled = Instant::now();
    host.signal_term()?;
    std::thread::sleep(Duration::from_millis(500));
    // Inside the drain window: not ready, yet still delivering.
    let ready = get(addr, "/readyz").map(|(s, _)| s);
    let late = request(addr, "POST", "/orders", &[("id", "late-1")], b"ok").map(|(s, _)| s);
    let mut statuses = Vec::new();
    for thread in slow {
        statuses.push(thread.join().map_err(|_| anyhow::anyhow!("a delivery thread panicked"))?);
    }
    let status = loop {
        if let Some(status) = host.child.try_wait()? {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            bail!("serve did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = signalled.elapsed();
    let ok = statuses.iter().filter(|s| matches!(s, Ok(200))).count() as u64 + u64::from(matches!(late, Ok(200)));
    row.produced = Some(SLOW + 1);
    row.completed = Some(ok);
    row.failed_requests = SLOW + 1 - ok;
    row.lost = Some(SLOW + 1 - ok);
    row.check(ok == SLOW + 1, || format!("deliveries answered {statuses:?}, late one {late:?}"));
    row.check(matches!(ready, Ok(503)), || format!("/readyz during the drain: {ready:?}"));
    row.check(status.success(), || format!("exited {status}"));
    row.note(format!(
        "{SLOW} deliveries of `sleep:3000` in flight at SIGTERM and one new delivery 0.5 s into the 2 s drain window: all answered 200, /readyz {} while draining, exit {} after {:.2} s; daprd's health endpoint played by a stub on 127.0.0.1 ({} probes)",
        ready.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
        status.code().unwrap_or(-1),
        took.as_secs_f64(),
        sidecar.hits.load(Ordering::Relaxed)
    ));
    Ok(row)
}

// ---------------------------------------------------------------- guests

/// `faulty.wasm` as the consumer; every 10th message is `bad`, the rest
/// `send:done` (completes by sending its own id to `done`, so completions
/// are counted by id). Each bad message must be tried 3 times, classified
/// in `/metrics` each time and dead-lettered; the good ones complete
/// meanwhile, and the host serves new work after.
fn guest_fault(env: &Env, name: &str, bad: &str, extra: &[&str]) -> anyhow::Result<Row> {
    let mut row = Row::new(name);
    let db = env.db(name);
    let mut args = vec![
        "--consumer-file",
        "faulty.wasm",
        "--bindings",
        "orders,done",
        "--max-delivery-count",
        "3",
        "--retry-backoff-ms",
        "1",
        "--timeout-ms",
        "200",
        "--memory-mib",
        "16",
    ];
    args.extend_from_slice(extra);
    let mut host = env.dev(name, &db, &args)?;
    row.before = host.proc.usage();
    // The slow and endless ones each hold a worker for the whole time limit.
    let per_round: u64 = if matches!(bad, "trap" | "panic") { 500 } else { 100 };
    // The same traffic three times: resident memory must level off.
    const ROUNDS: u64 = 3;
    let total = per_round * ROUNDS;
    let mut acked = Vec::new();
    let mut bad_acked = 0u64;
    let mut rss_mib = Vec::new();
    for round in 0..ROUNDS {
        for i in 0..per_round {
            let is_bad = i % 10 == 9;
            let body: &[u8] = if is_bad { bad.as_bytes() } else { b"send:done" };
            match raw(host.addr, body) {
                Ok((202, reply)) => {
                    acked.extend(json_string_array(&String::from_utf8_lossy(&reply), "ids").unwrap_or_default());
                    bad_acked += u64::from(is_bad);
                }
                _ => row.failed_requests += 1,
            }
        }
        let settled = wait_for(Duration::from_secs(60), || {
            let depth = env.depth(&db, "orders")?;
            Ok(depth.pending() == 0 && depth.dead_lettered == bad_acked)
        });
        row.check(settled.is_ok(), || format!("round {round} did not settle: {:?}", env.depth(&db, "orders")));
        rss_mib.push(host.proc.usage().rss_kib / 1024);
    }
    let good_acked = acked.len() as u64 - bad_acked;
    // A leak would grow by about a round's worth each round; the pool's
    // resident slots only level off.
    let (first, last) = (rss_mib.first().copied().unwrap_or(0), rss_mib.last().copied().unwrap_or(0));
    row.check(last <= first + 256, || format!("resident memory by round {rss_mib:?} MiB"));
    let m = host.metrics()?;
    let counter = |k: &str| m.get(k).copied().unwrap_or(0);
    let (traps, timeouts, host_timeouts, limits) = (
        counter("guest_traps_total"),
        counter("guest_timeouts_total"),
        counter("host_call_timeouts_total"),
        counter("guest_limits_total"),
    );
    let expected = bad_acked * 3;
    let (kind, got, others) = match bad {
        // A Rust panic aborts: a trap.
        "trap" | "panic" => ("guest_traps_total", traps, timeouts + host_timeouts + limits),
        "loop" => ("guest_timeouts_total", timeouts, traps + host_timeouts + limits),
        // The engine's stack limit, like the memory limit, is a resource limit.
        "alloc" | "recurse" => ("guest_limits_total", limits, traps + timeouts + host_timeouts),
        // Sleeping is waiting on the host's clock: either timeout counter.
        _ => ("guest_timeouts_total + host_call_timeouts_total", timeouts + host_timeouts, traps + limits),
    };
    row.check(got == expected && others == 0, || {
        format!("{kind} = {got} (want {expected}); traps {traps}, timeouts {timeouts}, host-call timeouts {host_timeouts}, limits {limits}")
    });
    let reasons = env.fields(&db, "dead-letters", "orders", "dead_letter_reason")?;
    row.check(reasons.iter().all(|r| r == "MaxDeliveryCountExceeded"), || format!("dead-letter reasons {reasons:?}"));
    let descriptions = env.fields(&db, "dead-letters", "orders", "dead_letter_description")?;

    // Still serving: ten more good messages complete.
    let before = env.fields(&db, "peek", "done", "body_preview")?.len();
    let mut more: u64 = 0;
    for _ in 0..10 {
        if let Ok((202, reply)) = raw(host.addr, b"send:done") {
            acked.extend(json_string_array(&String::from_utf8_lossy(&reply), "ids").unwrap_or_default());
            more += 1;
        } else {
            row.failed_requests += 1;
        }
    }
    let served = wait_for(Duration::from_secs(20), || {
        Ok(env.fields(&db, "peek", "done", "body_preview")?.len() >= before + more as usize)
    });
    row.check(served.is_ok() && more == 10, || {
        format!("the host did not serve new messages after the faults ({more} accepted)")
    });
    row.check(matches!(get(host.addr, "/healthz"), Ok((200, _))), || "/healthz not 200".into());
    row.after = host.proc.usage();
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));

    // Completions: the ids the good messages sent to `done`.
    let mut done: BTreeMap<String, u64> = BTreeMap::new();
    for id in env.fields(&db, "peek", "done", "body_preview")? {
        *done.entry(id).or_default() += 1;
    }
    let dead: BTreeSet<String> = env.fields(&db, "dead-letters", "orders", "id")?.into_iter().collect();
    let left: BTreeSet<String> = env.fields(&db, "peek", "orders", "id")?.into_iter().collect();
    let found = |id: &String| done.contains_key(id) || dead.contains(id) || left.contains(id);
    let lost = acked.iter().filter(|id| !found(id)).count() as u64;
    row.produced = Some(acked.len() as u64);
    row.completed = Some(done.len() as u64);
    row.dead_lettered = Some(dead.len() as u64);
    row.remaining = Some(left.len() as u64);
    row.lost = Some(lost);
    row.duplicated = Some(done.values().map(|n| n - 1).sum());
    row.check(lost == 0, || format!("{lost} acknowledged messages found nowhere"));
    row.check(done.len() as u64 == good_acked + more, || {
        format!("{} completed, {} good messages sent", done.len(), good_acked + more)
    });
    let description = descriptions.first().map(|d| d.chars().take(90).collect::<String>()).unwrap_or_default();
    row.note(format!(
        "{bad_acked} of {total} messages `{bad}` (every 10th, in {ROUNDS} rounds){}: {kind} = {got} (3 deliveries each), other failure counters {others}; dead-lettered as MaxDeliveryCountExceeded, e.g. \"{description}\"; {} good messages completed meanwhile and 10 more after; RSS after each round {} MiB",
        if extra.is_empty() { String::new() } else { format!(" with {}", extra.join(" ")) },
        good_acked,
        rss_mib.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ")
    ));
    if bad == "sleep:1000" {
        row.note(format!(
            "of the slow ones: guest_timeouts_total {timeouts}, host_call_timeouts_total {host_timeouts}"
        ));
    }
    Ok(row)
}

/// One consumer invocation that sends 100,000 messages: all arrive once,
/// the message completes once, and memory does not hold the output.
fn guest_send_many(env: &Env) -> anyhow::Result<Row> {
    const SENDS: u64 = 100_000;
    let mut row = Row::new("guest-send-many");
    let db = env.db("send-many");
    let args = ["--consumer-file", "faulty.wasm", "--bindings", "orders,done", "--timeout-ms", "600000"];
    let mut host = env.dev("guest-send-many", &db, &args)?;
    row.before = host.proc.usage();
    let command = format!("send-many:done:{SENDS}");
    let began = Instant::now();
    let acked = match raw(host.addr, command.as_bytes()) {
        Ok((202, reply)) => json_string_array(&String::from_utf8_lossy(&reply), "ids").unwrap_or_default(),
        _ => {
            row.failed_requests += 1;
            Vec::new()
        }
    };
    let drained = env.drained(&db, "orders", Duration::from_secs(300));
    let took = began.elapsed();
    row.check(drained.is_ok(), || format!("{drained:?}"));
    row.after = host.proc.usage();
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));
    let sent = json_strings(&env.queue(&db, &["peek", "done", "--limit", "10000000"])?, "id");
    let distinct: BTreeSet<&String> = sent.iter().collect();
    let dead = env.depth(&db, "orders")?.dead_lettered;
    row.produced = Some(acked.len() as u64);
    row.completed = Some(u64::from(drained.is_ok() && dead == 0) * acked.len() as u64);
    row.dead_lettered = Some(dead);
    row.remaining = Some(0);
    row.lost = Some((acked.len() as u64).saturating_sub(row.completed.unwrap_or(0) + dead));
    row.duplicated = Some((sent.len() - distinct.len()) as u64);
    row.check(acked.len() == 1 && dead == 0, || format!("{} accepted, {dead} dead-lettered", acked.len()));
    row.check(distinct.len() as u64 == SENDS && sent.len() == distinct.len(), || {
        format!("{} messages in done, {} distinct (want {SENDS} once each)", sent.len(), distinct.len())
    });
    row.note(format!(
        "one message whose consumer sends {SENDS} messages in one invocation: all {} arrived once, in {:.1} s; RSS {} -> {} MiB",
        distinct.len(),
        took.as_secs_f64(),
        row.before.rss_kib / 1024,
        row.after.rss_kib / 1024
    ));
    Ok(row)
}

/// The producer at its largest output: full batches (1,000 orders, the
/// sample producer's cap) from 8 clients at once, and one body of exactly
/// `--max-body-bytes` (4 MiB) as a single message.
fn producer_max_output(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("producer-max-output");
    let db = env.db("output");
    let config = format!("forward-binding=done,max-order-cents={CREDIT_LIMIT}");
    let mut host = env.dev("producer-max-output", &db, &["--bindings", "orders,done", "--consumer-config", &config])?;
    row.before = host.proc.usage();
    let poster = Arc::new(Poster::new("h"));
    const BATCHES: u64 = 24;
    let claimed = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (poster, claimed, addr) = (Arc::clone(&poster), Arc::clone(&claimed), host.addr);
            std::thread::spawn(move || {
                loop {
                    let batch = claimed.fetch_add(1, Ordering::Relaxed);
                    if batch >= BATCHES || !poster.post(addr, batch, 1_000) {
                        break;
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let posting = began.elapsed();
    // One message as large as a request may be.
    let big = vec![b'x'; 4 << 20];
    let big_answer = raw(host.addr, &big);
    let mut acked = poster.acked_ids();
    let big_id = match &big_answer {
        Ok((202, reply)) => json_string_array(&String::from_utf8_lossy(reply), "ids").unwrap_or_default(),
        _ => Vec::new(),
    };
    row.failed_requests = poster.failed.load(Ordering::Relaxed) + u64::from(big_id.is_empty());
    acked.extend(big_id.iter().cloned());
    let drained = env.drained(&db, "orders", Duration::from_secs(120));
    row.check(drained.is_ok(), || format!("{drained:?}"));
    row.after = host.proc.usage();
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));
    let l = ledger(env, &db, "orders", &acked, &poster.unknown_ids())?;
    row.ledger(&l);
    // The raw body is forwarded unchanged: one message of that size in `done`.
    let sizes: Vec<u64> = json_nums(&env.queue(&db, &["peek", "done", "--limit", "10000000"])?, "body_bytes");
    let big_done = sizes.iter().filter(|s| **s == big.len() as u64).count();
    row.check(big_id.len() == 1 && big_done == 1, || {
        format!("the {} byte message: {big_answer:?}, {big_done} of that size completed", big.len())
    });
    row.note(format!(
        "{} orders in batches of 1,000 from 8 clients in {:.2} s (slowest request {} ms), plus one {}-byte raw message, forwarded whole; no guest sends more than one message per order, and the sample producer caps a batch at 1,000",
        poster.acknowledged(),
        posting.as_secs_f64(),
        poster.slowest_ms.load(Ordering::Relaxed),
        big.len()
    ));
    Ok(row)
}

/// A 100 MiB body against `--max-body-bytes` 4 MiB: 413, and the host's
/// memory does not take the body in.
fn body_100mib(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("body-100mib");
    let db = env.db("body");
    let mut host = env.dev("body-100mib", &db, &["--max-body-bytes", "4194304"])?;
    row.before = host.proc.usage();
    let (status, written) = huge_post(host.addr, 100 << 20)?;
    row.check(status == Some(413), || format!("answer {status:?} to the 100 MiB body"));
    let after = host.proc.usage();
    let good = request(
        host.addr,
        "POST",
        "/produce",
        &[("content-type", "application/json")],
        orders_json("b", 1, 10).as_bytes(),
    );
    row.check(matches!(good, Ok((202, _))), || format!("a normal batch after it: {good:?}"));
    let drained = env.drained(&db, "orders", Duration::from_secs(30));
    row.check(drained.is_ok(), || format!("{drained:?}"));
    row.after = host.proc.usage();
    let (exit, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(exit.success(), || format!("exited {exit} after SIGTERM"));
    row.produced = Some(10);
    row.completed = drained.ok().map(|d| 10 - d.dead_lettered);
    row.dead_lettered = Some(0);
    row.remaining = Some(0);
    row.lost = Some(0);
    row.failed_requests = 1;
    let rss_before = row.before.rss_kib;
    row.check(after.rss_kib < rss_before + 64 * 1024, || {
        format!("RSS grew from {rss_before} to {} KiB on a refused body", after.rss_kib)
    });
    row.note(format!(
        "answer {} after {:.1} MiB of the 100 MiB had been written (the host reads up to 16 MiB past the limit so the client sees the 413, then closes); RSS right after: {} MiB; the next normal batch: {}",
        status.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
        written as f64 / (1 << 20) as f64,
        after.rss_kib / 1024,
        good.map(|(s, _)| s.to_string()).unwrap_or_else(|e| e.to_string())
    ));
    Ok(row)
}

/// Sends a `size`-byte body (declared) while reading the answer: the status
/// (if one came) and how many bytes were written.
fn huge_post(addr: SocketAddr, size: usize) -> anyhow::Result<(Option<u16>, usize)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let head = format!(
        "POST /produce HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
    );
    writer.write_all(head.as_bytes())?;
    let sending = std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        let mut written = 0;
        while written < size {
            match writer.write(&chunk[..chunk.len().min(size - written)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
        }
        written
    });
    let mut reader = stream;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the status line is in (or the connection ends).
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let _ = reader.shutdown(std::net::Shutdown::Both);
    let written = sending.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?;
    let status = String::from_utf8_lossy(&answer).split_whitespace().nth(1).and_then(|s| s.parse().ok());
    Ok((status, written))
}

// ---------------------------------------------------------------- queue

/// Another process holds SQLite's write lock for 8 s, longer than the
/// host's 5 s busy timeout, while orders are posted and consumed.
fn queue_lock_held(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("queue-lock-held");
    let db = env.db("lock");
    let config = format!("forward-binding=done,max-order-cents={CREDIT_LIMIT}");
    // Deliveries whose settle fails wait out their lock: 10 s here, 60 s by default.
    let mut host = env.dev(
        "queue-lock-held",
        &db,
        &["--bindings", "orders,done", "--consumer-config", &config, "--lock-ms", "10000"],
    )?;
    row.before = host.proc.usage();
    let poster = Arc::new(Poster::new("l"));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (poster, stop, addr) = (Arc::clone(&poster), Arc::clone(&stop), host.addr);
            std::thread::spawn(move || {
                // Bounded: at most 400 batches each, and `stop`.
                for _ in 0..400 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = poster.next_batch.fetch_add(1, Ordering::Relaxed);
                    if !poster.post(addr, batch, 50) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let before_lock = poster.acknowledged();
    const HOLD_SECS: f64 = 8.0;
    let script = "import sqlite3, sys, time\n\
                  c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
                  c.execute('BEGIN IMMEDIATE')\n\
                  print('locked', flush=True)\n\
                  time.sleep(float(sys.argv[2]))\n\
                  c.execute('COMMIT')\n\
                  print('released', flush=True)\n";
    let mut python = Command::new("python3");
    python.args(["-c", script]).arg(&db).arg(HOLD_SECS.to_string());
    let log = env.work.join("logs/queue-lock-held-python.log");
    let mut holder = Proc::spawn(python, &log)?;
    wait_for(Duration::from_secs(30), || Ok(std::fs::read_to_string(&log).unwrap_or_default().contains("locked")))
        .context("python3 did not take the lock")?;
    let locked_at = Instant::now();
    let failed_before = poster.failed.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(30), || Ok(std::fs::read_to_string(&log).unwrap_or_default().contains("released")))
        .context("python3 did not release the lock")?;
    let held = locked_at.elapsed();
    let during_failed = poster.failed.load(Ordering::Relaxed) - failed_before;
    let acked_at_release = poster.acknowledged();
    let recovered = wait_for(Duration::from_secs(30), || Ok(poster.acknowledged() > acked_at_release));
    let recovery = locked_at.elapsed().saturating_sub(held);
    let _ = holder.child.wait();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    let drained = env.drained(&db, "orders", Duration::from_secs(120));
    row.check(drained.is_ok(), || format!("{drained:?}"));
    row.check(recovered.is_ok(), || "no batch was accepted after the lock was released".into());
    row.check(matches!(get(host.addr, "/healthz"), Ok((200, _))), || "/healthz not 200".into());
    row.after = host.proc.usage();
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));
    let l = ledger(env, &db, "orders", &poster.acked_ids(), &poster.unknown_ids())?;
    row.ledger(&l);
    row.failed_requests = poster.failed.load(Ordering::Relaxed);
    row.check(row.failed_requests > 0, || "no request failed while the lock was held: did it hold?".into());
    row.note(format!(
        "python3 held BEGIN IMMEDIATE for {:.1} s (busy timeout 5 s); {before_lock} orders acknowledged before it; {during_failed} requests failed while it was held ({}), slowest answer {} ms; first 202 {:.2} s after the release; {} of the failed requests' orders had landed anyway",
        held.as_secs_f64(),
        poster.error_statuses(),
        poster.slowest_ms.load(Ordering::Relaxed),
        recovery.as_secs_f64(),
        l.landed_unacknowledged
    ));
    Ok(row)
}

/// `--max-db-mib 2` with a `done` queue nobody reads: the database fills,
/// the producer answers 503 and the host keeps serving; a restart with a
/// larger cap delivers everything that was acknowledged.
fn queue_disk_full(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("queue-disk-full");
    let db = env.db("full");
    let config = format!("forward-binding=done,max-order-cents={CREDIT_LIMIT}");
    let args = |cap: &'static str| -> Vec<&str> {
        let base = ["--bindings", "orders,done", "--consumer-config", config.as_str(), "--lock-ms", "10000"];
        let mut args = base.to_vec();
        args.extend(["--retry-backoff-ms", "20", "--max-delivery-count", "1000", "--max-db-mib", cap]);
        args
    };
    let mut host = env.dev("queue-disk-full", &db, &args("2"))?;
    row.before = host.proc.usage();
    let poster = Poster::new("f");
    let began = Instant::now();
    let mut refused_in_a_row = 0;
    // Until 10 refusals in a row; at most 600 batches or 90 s.
    for batch in 0..600 {
        let failed = poster.failed.load(Ordering::Relaxed);
        if !poster.post(host.addr, batch, 100) {
            bail!("the host stopped answering once the database filled; see {}", host.proc.log.display());
        }
        if poster.failed.load(Ordering::Relaxed) > failed {
            refused_in_a_row += 1;
            if refused_in_a_row >= 10 {
                break;
            }
        } else {
            refused_in_a_row = 0;
        }
        if began.elapsed() > Duration::from_secs(90) {
            break;
        }
    }
    row.check(refused_in_a_row >= 10, || "the database never filled".into());
    let full_acked = poster.acknowledged();
    let health = get(host.addr, "/healthz").map(|(s, _)| s);
    let ready = get(host.addr, "/readyz").map(|(s, body)| {
        let reason = json_str(&String::from_utf8_lossy(&body), "reason").unwrap_or_default();
        format!("{s} ({reason})")
    });
    let m = host.metrics();
    row.check(matches!(health, Ok(200)) && m.is_ok(), || {
        format!("full: /healthz {health:?}, /metrics {:?}", m.as_ref().err())
    });
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    row.after = host.proc.usage();
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM while full"));
    let full_depth = env.depth(&db, "orders")?;

    // A larger cap: the backlog completes.
    let mut host = env.dev("queue-disk-full-2", &db, &args("64"))?;
    row.restarts = 1;
    let drained = env.drained(&db, "orders", Duration::from_secs(120));
    row.check(drained.is_ok(), || format!("{drained:?}"));
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));
    let l = ledger(env, &db, "orders", &poster.acked_ids(), &poster.unknown_ids())?;
    row.ledger(&l);
    row.failed_requests = poster.failed.load(Ordering::Relaxed);
    row.note(format!(
        "database file {:.1} MiB at the cap; {full_acked} orders acknowledged, then {} refused ({}); while full: /healthz {}, /readyz {}, {} orders waiting; restarted with --max-db-mib 64, all delivered",
        db_bytes as f64 / (1 << 20) as f64,
        row.failed_requests,
        poster.error_statuses(),
        health.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
        ready.unwrap_or_else(|e| e.to_string()),
        full_depth.pending()
    ));
    Ok(row)
}

/// `wasm-pc queue` commands (reads and a write) in a loop while `dev`
/// produces and consumes on the same file.
fn queue_cli_concurrent(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("queue-cli-concurrent");
    let db = env.db("cli");
    let config = format!("forward-binding=done,max-order-cents={CREDIT_LIMIT}");
    let mut host =
        env.dev("queue-cli-concurrent", &db, &["--bindings", "orders,done", "--consumer-config", &config])?;
    row.before = host.proc.usage();
    let poster = Arc::new(Poster::new("q"));
    let stop = Arc::new(AtomicBool::new(false));
    const ORDERS: u64 = 20_000;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (poster, stop, addr) = (Arc::clone(&poster), Arc::clone(&stop), host.addr);
            std::thread::spawn(move || poster.post_until(addr, &stop, ORDERS, BATCH))
        })
        .collect();
    let commands: [&[&str]; 5] = [
        &["stats"],
        &["peek", "orders", "--limit", "50"],
        &["dead-letters", "orders", "--limit", "50"],
        &["requeue", "orders", "--id", "no-such-message"],
        &["stats", "done"],
    ];
    let (mut runs, mut failures) = (0u64, Vec::new());
    let mut slowest = Duration::ZERO;
    let began = Instant::now();
    // Bounded: 60 rounds of the five commands, or 120 s.
    'rounds: for _ in 0..60 {
        for args in commands {
            let sent = Instant::now();
            if let Err(e) = env.queue(&db, args) {
                failures.push(format!("{e:#}"));
            }
            slowest = slowest.max(sent.elapsed());
            runs += 1;
            if began.elapsed() > Duration::from_secs(120) {
                break 'rounds;
            }
        }
        if poster.acknowledged() >= ORDERS && env.depth(&db, "orders")?.pending() == 0 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    let drained = env.drained(&db, "orders", Duration::from_secs(120));
    row.check(drained.is_ok(), || format!("{drained:?}"));
    row.after = host.proc.usage();
    let (status, _) = host.proc.terminate(Duration::from_secs(30))?;
    row.check(status.success(), || format!("exited {status} after SIGTERM"));
    let l = ledger(env, &db, "orders", &poster.acked_ids(), &poster.unknown_ids())?;
    row.ledger(&l);
    row.failed_requests = poster.failed.load(Ordering::Relaxed) + failures.len() as u64;
    row.check(failures.is_empty(), || format!("{} queue commands failed: {:?}", failures.len(), failures.first()));
    row.note(format!(
        "{runs} `wasm-pc queue` commands (stats, peek, dead-letters, requeue --id, stats done) during the run, {} failed, slowest {} ms; failed requests counts produce requests and queue commands",
        failures.len(),
        slowest.as_millis()
    ));
    Ok(row)
}

// ---------------------------------------------------------------- plumbing

/// How a request failed.
#[derive(Debug)]
enum Failure {
    /// Could not connect: the request never reached the host.
    NotSent(std::io::Error),
    /// Sent (perhaps partly), no complete answer.
    NoAnswer(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotSent(e) => write!(f, "not sent: {e}"),
            Failure::NoAnswer(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// One HTTP/1.1 request on loopback, `connection: close`: status and body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>), Failure> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(Failure::NotSent)?;
    let answer = (|| -> std::io::Result<(u16, Vec<u8>)> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no complete answer"))?;
        let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status"))?;
        let mut body = response[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        Ok((status, body))
    })();
    answer.map_err(Failure::NoAnswer)
}

fn get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), Failure> {
    request(addr, "GET", path, &[], b"")
}

/// One raw message through the sample producer (`application/octet-stream`
/// is sent on as one message, unchanged).
fn raw(addr: SocketAddr, body: &[u8]) -> Result<(u16, Vec<u8>), Failure> {
    request(addr, "POST", "/produce", &[("content-type", "application/octet-stream")], body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = data.get(eol + 4 + size..).unwrap_or_default();
    }
    out
}

/// `/metrics` as `name -> value`, without the `wasm_pc_` prefix (labelled
/// series are skipped).
fn metrics(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let (status, body) = get(addr, "/metrics").map_err(|e| anyhow::anyhow!("/metrics: {e}"))?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?.strip_prefix("wasm_pc_")?;
            let value: f64 = parts.next()?.parse().ok()?;
            Some((name.to_string(), value as u64))
        })
        .collect())
}

/// Polls `ready` every 50 ms until it is true, an error, or `within` passes.
fn wait_for(within: Duration, mut ready: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Stands in for daprd where `serve` only asks whether the sidecar is up
/// (`GET /v1.0/healthz/outbound`): 204 to everything, on 127.0.0.1.
struct Sidecar {
    port: u16,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sidecar {
    fn start() -> anyhow::Result<Sidecar> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (hits, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (counted, stopped) = (Arc::clone(&hits), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        counted.fetch_add(1, Ordering::Relaxed);
                        let _ = stream
                            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Sidecar { port, hits, stop, thread: Some(thread) })
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// xorshift64*: kill timings, repeatable with `FAULTS_SEED`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

// The host's JSON is compact serde_json output with known field names; these
// read the few fields the suite needs without a JSON dependency.

/// The first number after `"key":`.
fn json_num(text: &str, key: &str) -> Option<u64> {
    json_nums(text, key).into_iter().next()
}

/// Every number after `"key":`.
fn json_nums(text: &str, key: &str) -> Vec<u64> {
    let needle = format!("\"{key}\":");
    text.match_indices(&needle)
        .filter_map(|(at, _)| {
            let digits: String = text[at + needle.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Every string value after `"key":`.
fn json_strings(text: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\":\"");
    text.match_indices(&needle).filter_map(|(at, _)| read_string(&text[at + needle.len()..]).map(|(s, _)| s)).collect()
}

fn json_str(text: &str, key: &str) -> Option<String> {
    json_strings(text, key).into_iter().next()
}

/// The array of strings after `"key":`.
fn json_string_array(text: &str, key: &str) -> Option<Vec<String>> {
    let needle = format!("\"{key}\":[");
    let at = text.find(&needle)? + needle.len();
    let mut rest = &text[at..];
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.starts_with(']') {
            return Some(out);
        }
        let (value, used) = read_string(rest.strip_prefix('"')?)?;
        out.push(value);
        rest = &rest[1 + used..];
    }
}

/// A JSON string's contents up to its closing quote (just after the opening
/// one), unescaped, and the bytes used including the closing quote.
fn read_string(text: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = (0..4).filter_map(|_| chars.next().map(|(_, c)| c)).collect();
                    out.push(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).unwrap_or('\u{fffd}'));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

// ---------------------------------------------------------------- report

fn render(rows: &[Row], cores: usize, seed: u64, took: Duration) -> String {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "–".into());
    let mut out = String::new();
    out.push_str(&format!(
        "## cargo xtask faults: {} scenarios, {} failed, {:.0} s on {cores} cores (seed {seed})\n\n",
        rows.len(),
        rows.iter().filter(|r| !r.failures.is_empty()).count(),
        took.as_secs_f64()
    ));
    out.push_str("| scenario | produced | completed | dead-lettered | remaining | lost | duplicated | failed requests | restarts | open fds before → after | RSS MiB before → after | time s | result |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let mib = |k: u64| format!("{:.0}", k as f64 / 1024.0);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} → {} | {} → {} | {:.1} | {} |\n",
            r.name,
            opt(r.produced),
            opt(r.completed),
            opt(r.dead_lettered),
            opt(r.remaining),
            opt(r.lost),
            opt(r.duplicated),
            r.failed_requests,
            r.restarts,
            r.before.fds,
            r.after.fds,
            mib(r.before.rss_kib),
            mib(r.after.rss_kib),
            r.secs,
            if r.failures.is_empty() { "pass" } else { "FAIL" }
        ));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!("- **{}**: {}\n", r.name, r.notes.join("; ")));
        for failure in &r.failures {
            out.push_str(&format!("  - FAILED: {failure}\n"));
        }
    }
    out
}
