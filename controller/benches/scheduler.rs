//! Scheduler decision time over 10,000 hosts (run in release:
//! `cargo bench -p ferro-controller --bench scheduler`).

use std::hint::black_box;
use std::time::Instant;

use ferro_controller::scheduler::{pick, place, Candidate, Request, Strategy};

fn main() {
    let hosts: Vec<Candidate> = (0..10_000)
        .map(|i| Candidate {
            index: i,
            az: format!("az-{}", i % 3),
            healthy: i % 50 != 0,
            vcpus_total: 64,
            memory_total_mib: 262_144,
            free_vcpus: (i % 64) as u32,
            free_memory_mib: ((i * 7919) % 262_144) as u64,
            group_members: 0,
        })
        .collect();
    let req = Request {
        vcpus: 2,
        memory_mib: 2048,
        az: None,
        group: None,
        strategy: Strategy::BinPack,
    };
    for _ in 0..100 {
        black_box(pick(black_box(&hosts), &req));
    }
    let runs = 2000;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        black_box(pick(black_box(&hosts), black_box(&req)));
        times.push(t.elapsed());
    }
    times.sort();
    let p50 = times[runs / 2];
    let p99 = times[runs * 99 / 100];
    println!("scheduler: one decision over 10000 hosts: p50 {p50:?}, p99 {p99:?}");
    let mut h = hosts.clone();
    let t = Instant::now();
    let placed = place(&mut h, &req, 100).map(|v| v.len()).unwrap_or(0);
    println!(
        "scheduler: 100 placements over 10000 hosts: {:?} ({placed} placed)",
        t.elapsed()
    );
}
