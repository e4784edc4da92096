//! `ferro-vmm` binary: parse flags, build the configuration, run the VM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferro_vmm::config::{self, ConfigError, FileConfig, Overrides, VmConfig};
use ferro_vmm::devices::ExitReason;
use ferro_vmm::vm::Vm;

/// Ferrocloud microVM monitor: runs one KVM virtual machine.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of vCPUs (1-32).
    #[arg(long)]
    vcpus: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Disk: path=FILE[,ro=on][,id=SERIAL]; repeatable.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// vhost-user-blk disk: socket=PATH,id=ID[,boot=on]; repeatable; the
    /// one with boot=on comes first on the PCI bus.
    #[arg(long, value_name = "SPEC")]
    vhost_user_blk: Vec<String>,
    /// NIC: tap=NAME[,mac=AA:BB:CC:DD:EE:FF]; repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// Serial console sink: stdout, null or file:PATH.
    #[arg(long)]
    serial: Option<String>,
    /// Control socket path.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// SMBIOS system UUID (8-4-4-4-12 hex), also given as the serial number.
    #[arg(long, value_name = "UUID")]
    system_uuid: Option<String>,
}

fn build_config(cli: Cli) -> Result<VmConfig, ConfigError> {
    let file = match &cli.config {
        Some(p) => config::read_file(p)?,
        None => FileConfig::default(),
    };
    let flags = Overrides {
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        disks: cli
            .disk
            .iter()
            .map(|s| config::parse_disk(s))
            .collect::<Result<_, _>>()?,
        nets: cli
            .net
            .iter()
            .map(|s| config::parse_net(s))
            .collect::<Result<_, _>>()?,
        vhost_user_blks: cli
            .vhost_user_blk
            .iter()
            .map(|s| config::parse_vhost_user_blk(s))
            .collect::<Result<_, _>>()?,
        serial: cli.serial,
        control_socket: cli.control_socket,
        no_seccomp: cli.no_seccomp,
        system_uuid: cli.system_uuid,
    };
    VmConfig::build(file, flags)
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
    eprintln!("ferro-vmm: error: {msg}");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cfg = match build_config(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            report(&e);
            return ExitCode::from(2);
        }
    };
    let result = Vm::build(&cfg).and_then(Vm::run);
    match result {
        Ok(ExitReason::Error) => {
            eprintln!("ferro-vmm: error: the VM stopped on a vCPU error (see log above)");
            ExitCode::from(1)
        }
        Ok(reason) => {
            // One line saying how the VM ended, for whoever supervises us.
            let how = match reason {
                ExitReason::Reset => "the guest reset",
                ExitReason::PowerOff => "the guest powered off",
                ExitReason::Stopped | ExitReason::Error => "stopped from the control socket",
            };
            eprintln!("ferro-vmm: VM ended: {how}");
            if reason == ExitReason::Reset {
                ExitCode::from(ferro_vmm::EXIT_GUEST_RESET)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            report(&e);
            ExitCode::from(1)
        }
    }
}
