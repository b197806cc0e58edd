//! `wasm-pc queue ...`: look into and repair the embedded queue database.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::queue::{Database, MessageState, PurgeTarget, StoreOptions, StoredMessage, SubQueue};

#[derive(Debug, Args)]
pub struct DbArgs {
    /// The queue database.
    #[arg(long, env = "WASM_PC_DB", default_value = ".wasm-pc/dev.db")]
    db: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Depth of every queue (or one): active, locked, scheduled, dead-lettered.
    Stats {
        queue: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show live messages without locking them.
    Peek {
        queue: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show dead-lettered messages with their reasons.
    DeadLetters {
        queue: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Move dead letters back to the queue (all, or those with `--id`).
    Requeue {
        queue: String,
        #[arg(long = "id")]
        ids: Vec<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Copy every message that can still be read from a damaged database
    /// into a new one (locks released), and say how many could not be.
    Salvage {
        /// The new database to write; it must not exist yet.
        #[arg(long)]
        into: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Delete messages for good: live ones (default), `--dead-letters`, or `--all`.
    Purge {
        queue: String,
        #[arg(long, conflicts_with = "all")]
        dead_letters: bool,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn run(command: QueueCommand) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let open = |args: &DbArgs| Database::open(&args.db, StoreOptions::default());
    match command {
        QueueCommand::Stats { queue, db: args } => {
            let mut db = open(&args)?;
            let all = match queue {
                Some(q) => vec![(q.clone(), db.depth(&q)?)],
                None => db.queues()?,
            };
            if args.json {
                let rows: Vec<_> = all.iter().map(|(q, d)| serde_json::json!({"queue": q, "depth": d})).collect();
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
            } else {
                writeln!(
                    out,
                    "{:<20} {:>10} {:>10} {:>10} {:>14}",
                    "QUEUE", "ACTIVE", "LOCKED", "SCHEDULED", "DEAD-LETTERED"
                )?;
                for (q, d) in &all {
                    writeln!(
                        out,
                        "{q:<20} {:>10} {:>10} {:>10} {:>14}",
                        d.active, d.locked, d.scheduled, d.dead_lettered
                    )?;
                }
            }
        }
        QueueCommand::Peek { queue, limit, db: args } => {
            let messages = open(&args)?.peek(&queue, SubQueue::Active, 0, limit)?;
            print_messages(&mut out, &messages, args.json)?;
        }
        QueueCommand::DeadLetters { queue, limit, db: args } => {
            let messages = open(&args)?.peek(&queue, SubQueue::DeadLetter, 0, limit)?;
            print_messages(&mut out, &messages, args.json)?;
        }
        QueueCommand::Requeue { queue, ids, db: args } => {
            let moved = open(&args)?.requeue(&queue, &ids)?;
            report(&mut out, args.json, "requeued", moved)?;
        }
        QueueCommand::Salvage { into, db: args } => {
            let (copied, unreadable) = Database::salvage(&args.db, &into)?;
            if args.json {
                writeln!(out, "{}", serde_json::json!({"copied": copied, "unreadable": unreadable, "into": into}))?;
            } else {
                writeln!(out, "copied {copied} message(s) into {}; {unreadable} could not be read", into.display())?;
            }
        }
        QueueCommand::Purge { queue, dead_letters, all, db: args } => {
            let target = match (dead_letters, all) {
                (_, true) => PurgeTarget::All,
                (true, false) => PurgeTarget::DeadLetters,
                (false, false) => PurgeTarget::Active,
            };
            let removed = open(&args)?.purge(&queue, target)?;
            report(&mut out, args.json, "purged", removed)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report(out: &mut impl Write, json: bool, what: &str, count: usize) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::json!({ what: count }))
    } else {
        writeln!(out, "{what} {count} message(s)")
    }
}

/// A stored message as the CLI shows it: a preview of the body, not all of it.
#[derive(serde::Serialize)]
struct Shown<'a> {
    id: &'a str,
    sequence: i64,
    state: MessageState,
    delivery_count: u32,
    enqueued_at_ms: i64,
    body_preview: String,
    body_bytes: usize,
    content_type: Option<&'a str>,
    metadata: &'a [(String, String)],
    dead_letter_reason: Option<&'a str>,
    dead_letter_description: Option<&'a str>,
}

impl<'a> From<&'a StoredMessage> for Shown<'a> {
    fn from(m: &'a StoredMessage) -> Self {
        Shown {
            id: &m.id,
            sequence: m.sequence,
            state: m.state,
            delivery_count: m.delivery_count,
            enqueued_at_ms: m.enqueued_at_ms,
            body_preview: preview(&m.body),
            body_bytes: m.body.len(),
            content_type: m.content_type.as_deref(),
            metadata: &m.metadata,
            dead_letter_reason: m.dead_letter_reason.as_deref(),
            dead_letter_description: m.dead_letter_description.as_deref(),
        }
    }
}

fn preview(body: &[u8]) -> String {
    let shown = &body[..body.len().min(120)];
    match std::str::from_utf8(shown) {
        Ok(text) => text.to_string(),
        Err(_) => format!("<{} bytes of binary>", body.len()),
    }
}

fn print_messages(out: &mut impl Write, messages: &[StoredMessage], json: bool) -> std::io::Result<()> {
    let shown: Vec<Shown<'_>> = messages.iter().map(Shown::from).collect();
    if json {
        return writeln!(out, "{}", serde_json::to_string(&shown).unwrap_or_else(|_| "[]".into()));
    }
    if shown.is_empty() {
        return writeln!(out, "(none)");
    }
    for m in shown {
        let state = serde_json::to_value(m.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        writeln!(
            out,
            "#{} id={} state={state} deliveries={} bytes={}",
            m.sequence, m.id, m.delivery_count, m.body_bytes
        )?;
        if let Some(reason) = m.dead_letter_reason {
            writeln!(out, "    reason: {reason}: {}", m.dead_letter_description.unwrap_or(""))?;
        }
        writeln!(out, "    body: {}", m.body_preview)?;
    }
    Ok(())
}
