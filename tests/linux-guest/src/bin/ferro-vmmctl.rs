//! `ferro-vmmctl SOCKET REQUEST`: send one JSON request line to a ferro-vmm
//! control socket and print the answer line. The Linux-guest harness copies
//! it into L1 hosts, whose busybox has no Unix-socket client; operators can
//! use it the same way (docs/vmm-control.md).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, request] = args.as_slice() else {
        eprintln!("usage: ferro-vmmctl SOCKET REQUEST   e.g. ferro-vmmctl /run/vm.sock '{{\"op\":\"status\"}}'");
        return ExitCode::from(2);
    };
    // The socket is bound once the VM runs: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("ferro-vmmctl: error: cannot connect to {socket}: {e}");
                return ExitCode::from(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if let Err(e) = writeln!(stream, "{request}") {
        eprintln!("ferro-vmmctl: error: cannot send to {socket}: {e}");
        return ExitCode::from(1);
    }
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(0) | Err(_) => {
            eprintln!("ferro-vmmctl: error: {socket} closed without an answer");
            ExitCode::from(1)
        }
        Ok(_) => {
            print!("{answer}");
            if answer.contains("\"ok\":true") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
