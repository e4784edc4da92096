//! `ferro-blockd` binary: parse flags, open the volumes, serve each on its
//! own thread.

use std::process::ExitCode;

use clap::Parser;
use ferro_blockd::config::parse_volume;
use ferro_blockd::server::Volume;

/// Ferrocloud block volume daemon: serves volumes over vhost-user-blk.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Volume: id=SERIAL,path=FILE,size=SIZE[K|M|G|T],socket=PATH; repeatable.
    #[arg(long, value_name = "SPEC", required = true)]
    volume: Vec<String>,
}

/// Print an error and its causes on one line.
fn report(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    eprintln!("ferro-blockd: error: {msg}");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let mut volumes = Vec::new();
    for spec in &cli.volume {
        match parse_volume(spec).map_err(|e| Box::new(e) as Box<dyn std::error::Error>) {
            Ok(cfg) => volumes.push(cfg),
            Err(e) => {
                report(&*e);
                return ExitCode::from(2);
            }
        }
    }
    let mut opened = Vec::new();
    for cfg in volumes {
        match Volume::open(cfg) {
            Ok(v) => opened.push(v),
            Err(e) => {
                report(&e);
                return ExitCode::from(1);
            }
        }
    }
    eprintln!("ferro-blockd: serving {} volume(s)", opened.len());
    let threads: Vec<_> = opened
        .into_iter()
        .map(|v| std::thread::spawn(move || v.serve()))
        .collect();
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            report(&e);
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
