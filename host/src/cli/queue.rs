//! `wasm-pc queue ...`: look into and repair the embedded queue database.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::queue::{Database, Peeked, PurgeTarget, QueueOptions};

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
    let open = |args: &DbArgs| Database::open(&args.db, QueueOptions::default(), false);
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
            let messages = open(&args)?.peek(&queue, false, limit)?;
            print_messages(&mut out, &messages, args.json)?;
        }
        QueueCommand::DeadLetters { queue, limit, db: args } => {
            let messages = open(&args)?.peek(&queue, true, limit)?;
            print_messages(&mut out, &messages, args.json)?;
        }
        QueueCommand::Requeue { queue, ids, db: args } => {
            let moved = open(&args)?.requeue(&queue, &ids)?;
            report(&mut out, args.json, "requeued", moved)?;
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

fn print_messages(out: &mut impl Write, messages: &[Peeked], json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string(messages).unwrap_or_else(|_| "[]".into()));
    }
    if messages.is_empty() {
        return writeln!(out, "(none)");
    }
    for m in messages {
        writeln!(
            out,
            "#{} id={} state={} deliveries={} bytes={}",
            m.sequence, m.id, m.state, m.delivery_count, m.body_bytes
        )?;
        if let Some(reason) = &m.dead_letter_reason {
            writeln!(out, "    reason: {reason}: {}", m.dead_letter_description.as_deref().unwrap_or(""))?;
        }
        writeln!(out, "    body: {}", m.body_preview)?;
    }
    Ok(())
}
