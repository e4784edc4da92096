//! `ferro`: parse the command line, load the configuration, run the
//! command, print one error line on failure.

use std::process::ExitCode;

use clap::Parser;
use ferro_cli::args::{Cli, Command};
use ferro_cli::client::Client;
use ferro_cli::config::{resolve, Sources};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
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
        let given = [
            (cli.endpoint.is_some(), "--endpoint"),
            (cli.api_key.is_some(), "--api-key"),
            (cli.config.is_some(), "--config"),
            (cli.output != ferro_cli::args::Format::Table, "--output"),
        ];
        if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
            eprintln!(
                "ferro: error: {flag} is for controller commands; `ferro up` starts its own \
                 controller (see --listen and --data-dir)"
            );
            return ExitCode::from(2);
        }
        return match ferro_cli::up::run(up).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let cfg = match Sources::gather(
        cli.config.as_deref(),
        cli.endpoint.clone(),
        cli.api_key.clone(),
    )
    .and_then(resolve)
    {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut client = match Client::new(&cfg) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match ferro_cli::commands::run(&mut client, cli.output, cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ferro_cli::commands::CommandError::Usage(_)) => {
            fail(&e);
            ExitCode::from(2)
        }
        Err(e) => fail(&e),
    }
}

/// An argument error as one `ferro: error: …` line and status 2, as for
/// every other error; `--help` and `--version` print as clap has them.
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    // clap's first paragraph, on one line: the error, the missing
    // arguments it lists, the possible values; its tips and usage lines
    // are left out.
    let text = e.render().to_string();
    let msg: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .filter(|l| !l.starts_with("tip:"))
        .collect();
    let msg = msg.join(" ");
    let msg = msg.trim_start_matches("error: ");
    eprintln!("ferro: error: {msg} (see `ferro --help`)");
    ExitCode::from(2)
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("ferro: error: {}", ferro_cli::chain(e));
    ExitCode::FAILURE
}
