//! `cargo xtask bench vmm [--runs N] [--only boot|memory|blk|net|linux] [--peer-firecracker PATH]`
//! `cargo xtask bench agent [--runs N]`
//! `cargo xtask bench controller [--runs N] [--only raft|launch|scheduler|rss]`
//! `cargo xtask bench netd`
//! `cargo xtask bench blockd [--secs N] [--only W,...]`
//!
//! Benchmarks print one line per measure, each next to a baseline measured
//! in the same run, and write JSON to `target/bench/<area>.json`.

mod agent_tls;
mod bench_agent;
mod bench_blockd;
mod bench_controller;
mod bench_ec2api;
mod bench_linux;
mod bench_netd;
mod bench_vmm;
mod measure;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        // The bench's replica hosts, run by `bench blockd` inside their
        // network namespaces.
        Some("__blockd-role") => match bench_blockd::role(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask: blockd role: {e}");
                ExitCode::FAILURE
            }
        },
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("agent") => match bench_agent::run(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask: bench agent: {e}");
                    ExitCode::FAILURE
                }
            },
            Some("controller") => match bench_controller::run(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask: bench controller: {e}");
                    ExitCode::FAILURE
                }
            },
            Some("blockd") => match bench_blockd::run(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask: bench blockd: {e}");
                    ExitCode::FAILURE
                }
            },
            Some("ec2api") => match bench_ec2api::run(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask: bench ec2api: {e}");
                    ExitCode::FAILURE
                }
            },
            Some("netd") => match bench_netd::run(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask: bench netd: {e}");
                    ExitCode::FAILURE
                }
            },
            Some("vmm") => match bench_vmm::run(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask: bench vmm: {e}");
                    ExitCode::FAILURE
                }
            },
            other => {
                eprintln!(
                    "xtask: unknown bench area {other:?} (known: vmm, agent, controller, netd, blockd, ec2api)"
                );
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!(
                "usage: cargo xtask bench vmm [--runs N] [--only boot|memory|blk|net|linux] [--peer-firecracker PATH] | bench agent [--runs N] \
                 | bench controller [--runs N] [--only raft|launch|scheduler|rss] | bench netd | bench blockd [--secs N] [--only W,...] | bench ec2api"
            );
            ExitCode::from(2)
        }
    }
}
