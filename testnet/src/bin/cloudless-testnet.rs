//! `cloudless-testnet`: run many mesh nodes in one process, or simulate thousands.
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cloudless_mesh::membership::sim::{self, Scenario};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate the membership protocol for many nodes; SEED= reproduces a run.
    Sim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// Nodes in the cluster at the start.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds simulated before measuring.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Message loss probability, in percent.
    #[arg(long, default_value_t = 1.0)]
    loss: f64,
    /// Shortest one-way latency in milliseconds.
    #[arg(long, default_value_t = 10)]
    latency_min: u64,
    /// Longest one-way latency in milliseconds.
    #[arg(long, default_value_t = 60)]
    latency_max: u64,
    /// Crashes per minute, in percent of the cluster.
    #[arg(long, default_value_t = 0.2)]
    crash: f64,
    /// Joins per minute, in percent of the cluster.
    #[arg(long, default_value_t = 0.2)]
    join: f64,
    /// Voluntary leaves per minute, in percent of the cluster.
    #[arg(long, default_value_t = 0.1)]
    leave: f64,
    /// Seed; the SEED environment variable works too.
    #[arg(long, env = "SEED", default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(a) => {
            let report = sim::run(Scenario {
                nodes: a.nodes,
                duration: Duration::from_secs_f64(a.duration),
                warmup: Duration::from_secs_f64(a.warmup),
                latency_min: Duration::from_millis(a.latency_min),
                latency_max: Duration::from_millis(a.latency_max),
                loss: a.loss / 100.0,
                crash_rate: a.crash / 100.0,
                join_rate: a.join / 100.0,
                leave_rate: a.leave / 100.0,
                seed: a.seed,
                ..Scenario::default()
            });
            println!("{report}");
        }
    }
    Ok(())
}
