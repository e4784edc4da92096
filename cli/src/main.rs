//! `ferro`: parse the command line, load the configuration, run the
//! command, print one error line on failure.

use std::process::ExitCode;

use clap::Parser;
use ferro_cli::args::{Cli, Command};
use ferro_cli::client::Client;
use ferro_cli::config::{resolve, Sources};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let rt = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    if let Command::Up(up) = cli.command {
        return match ferro_cli::up::run(up).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let cfg = match Sources::gather(cli.config.as_deref(), cli.endpoint.clone()).and_then(resolve) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut client = match Client::new(&cfg) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match ferro_cli::commands::run(&mut client, cli.output, cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("ferro: error: {}", ferro_cli::chain(e));
    ExitCode::FAILURE
}
