//! `ferro-controller --config FILE`: parse flags, load the configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The Ferrocloud controller.
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
                // Our own events at info; openraft's own chatter only when
                // it warns (FERRO_LOG=info,openraft=info shows it).
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = match ferro_controller::config::ControllerConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferro-controller: error: {}", ferro_controller::chain(&e));
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferro-controller: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ferro_controller::server::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferro-controller: error: {}", ferro_controller::chain(&e));
            ExitCode::FAILURE
        }
    }
}
