//! The `scaletrain` binary.
mod bench_comm;
mod launch;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Plan and run LLM training.
#[derive(Debug, Parser)]
#[command(name = "scaletrain", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a multi-process job on this node (torchrun-style environment).
    Launch(launch::LaunchArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Collective bandwidth and latency per message size (nccl-tests definitions).
    Comm(bench_comm::BenchCommArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Launch(a) => launch::run(&a),
        Cmd::Bench(BenchCmd::Comm(a)) => bench_comm::run(&a),
    };
    match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
