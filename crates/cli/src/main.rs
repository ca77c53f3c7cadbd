//! The `scaletrain` binary.

mod bench_train;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "scaletrain",
    about = "Estimate and run distributed LLM training."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Tokens/s of a full CPU training step (forward, backward, AdamW) for one GPT-2 config.
    Train(bench_train::BenchTrainArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Bench(BenchCommand::Train(args)) => bench_train::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
