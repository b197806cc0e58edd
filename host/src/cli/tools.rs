//! `check` and `compile`: the host's verdict on a module, offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::RuntimeArgs;
use crate::modules::ModuleSource;
use crate::runtime::{Runtime, World};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The module file.
    file: PathBuf,
    /// The world it must implement: consumer or producer.
    #[arg(long)]
    world: World,
    /// Print the verdict as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct CompileArgs {
    /// The module file.
    file: PathBuf,
    #[arg(long)]
    world: World,
    /// Where to write the precompiled artifact.
    #[arg(long, short)]
    output: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Exit 0 when the module would load, 1 (with the reason) when not.
pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeArgs { max_instances: 1, ..args.runtime.clone() }.options())?;
    let spec = ModuleSource::file(args.file.clone(), args.world)
        .read()
        .with_context(|| format!("reading {}", args.file.display()))?;
    let verdict = runtime.load(spec, args.world);
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    match verdict {
        Ok(module) => {
            let info = module.info();
            if args.json {
                let v =
                    serde_json::json!({"ok": true, "world": args.world, "module": info.label(), "bytes": info.size});
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "ok: {} implements the {} world ({} bytes)", info.label(), args.world, info.size)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            if args.json {
                writeln!(out, "{}", serde_json::json!({"ok": false, "world": args.world, "error": error.to_string()}))?;
            } else {
                writeln!(out, "refused: {error}")?;
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn compile(args: CompileArgs) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeArgs { max_instances: 1, ..args.runtime.clone() }.options())?;
    let spec = ModuleSource::file(args.file.clone(), args.world)
        .read()
        .with_context(|| format!("reading {}", args.file.display()))?;
    let artifact = runtime.precompile(spec, args.world)?;
    std::fs::write(&args.output, &artifact).with_context(|| format!("writing {}", args.output.display()))?;
    tracing::info!(output = %args.output.display(), bytes = artifact.len(), "precompiled");
    Ok(ExitCode::SUCCESS)
}
