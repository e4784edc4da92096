//! `ferro-netd --config FILE`: parse flags, load the configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The Ferrocloud VPC dataplane daemon.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRO_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = match ferro_netd::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferro-netd: error: {}", ferro_netd::chain(&e));
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(ferro_netd::run(cfg)),
        Err(e) => {
            eprintln!("ferro-netd: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferro-netd: error: {}", ferro_netd::chain(&e));
            ExitCode::FAILURE
        }
    }
}
