//! `wasm-pc dev --demo N`: sample orders for the sample guests, posted
//! through the producer endpoint, and a summary once all are settled. The
//! demo's data knows the sample consumer's rules (a flaky SKU, a credit
//! limit); nothing else in the host does.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use crate::metrics::Metrics;
use crate::queue::QueueHandle;

/// The sample consumer's config the demo's data exercises, unless the user
/// set it.
pub fn configure(config: &mut Vec<String>) {
    for (key, value) in [("transient-sku", "FLAKY"), ("transient-attempts", "2"), ("max-order-cents", "500000")] {
        if !config.iter().any(|c| c.starts_with(&format!("{key}="))) {
            config.push(format!("{key}={value}"));
        }
    }
}

/// Posts `count` sample orders in batches through the HTTP endpoint, then
/// waits until the queue has nothing pending. Returns how many were accepted.
pub async fn drive(
    address: SocketAddr,
    count: usize,
    queue: &QueueHandle,
    name: &str,
    metrics: &Metrics,
) -> anyhow::Result<usize> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let run = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let orders: Vec<serde_json::Value> = (0..count).map(|i| sample_order(run, i)).collect();
    let mut accepted = 0usize;
    let mut posts = tokio::task::JoinSet::new();
    for batch in orders.chunks(100) {
        let body = serde_json::to_vec(batch)?;
        let request = hyper::Request::post(format!("http://{address}/produce"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let client = client.clone();
        posts.spawn(async move {
            let response = client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                status == StatusCode::ACCEPTED,
                "producer answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            let reply: serde_json::Value = serde_json::from_slice(&body)?;
            Ok(reply["accepted"].as_u64().unwrap_or(0) as usize)
        });
        while posts.len() >= 4 {
            if let Some(done) = posts.join_next().await {
                accepted += done??;
            }
        }
    }
    while let Some(done) = posts.join_next().await {
        accepted += done??;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let depth = queue.depth(name).await?;
        if depth.pending() == 0 && metrics.in_flight.load(Ordering::Relaxed) == 0 {
            return Ok(accepted);
        }
        anyhow::ensure!(Instant::now() < deadline, "the queue did not drain within 5 minutes: {depth:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Order `i` of a demo run: every 25th holds the flaky SKU (retried, then
/// fine), every 40th is over the credit limit (dead-lettered).
fn sample_order(run: &str, i: usize) -> serde_json::Value {
    const CUSTOMERS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
    let mut items = vec![
        serde_json::json!({"sku": format!("SKU-{}", i % 17), "qty": 1 + i % 3, "price_cents": 499 + (i % 7) * 100}),
    ];
    if i % 25 == 7 {
        items.push(serde_json::json!({"sku": "FLAKY", "qty": 1, "price_cents": 100}));
    }
    if i % 40 == 13 {
        items.push(serde_json::json!({"sku": "YACHT", "qty": 1, "price_cents": 99_000_000}));
    }
    serde_json::json!({"id": format!("demo-{run}-{i:05}"), "customer": CUSTOMERS[i % CUSTOMERS.len()], "items": items})
}

pub fn print_summary(
    requested: usize,
    accepted: usize,
    elapsed: Duration,
    metrics: &Metrics,
    queue: &str,
    db: &Path,
) -> std::io::Result<()> {
    let s = metrics.snapshot();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(out, "wasm-pc dev --demo {requested}: done in {secs:.2} s")?;
    writeln!(out, "  {:<34} {:>8}", "orders accepted by producer.wasm", accepted)?;
    writeln!(out, "  {:<34} {:>8}", "messages enqueued (durable)", s.sent)?;
    writeln!(out, "  {:<34} {:>8}", "completed by consumer.wasm", s.completed)?;
    writeln!(out, "  {:<34} {:>8}", "retried (SKU FLAKY, then ok)", s.abandoned)?;
    writeln!(out, "  {:<34} {:>8}", "dead-lettered (over credit limit)", s.dead_lettered)?;
    writeln!(out, "  {:<34} {:>8}", "host-ended (trap/timeout/limit)", s.traps + s.timeouts + s.limits)?;
    writeln!(out, "  {:<34} {:>8.0}", "orders/s, produce to settle", accepted as f64 / secs)?;
    writeln!(out)?;
    writeln!(
        out,
        "Dead letters and their reasons: cargo run --release -- queue dead-letters {} --db {}",
        queue,
        db.display()
    )?;
    Ok(())
}
