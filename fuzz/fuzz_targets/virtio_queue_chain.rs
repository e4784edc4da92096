//! Arbitrary descriptor table and avail ring, walked with the devices'
//! chain walker; every chain is also validated as a block request and sent
//! through the net tx path and the rng handler.

#![no_main]

mod common;

use std::io;
use std::sync::Arc;

use ferro_virtio::block::{Request, MAX_DESCRIPTORS};
use ferro_virtio::chain::walk_chain;
use ferro_virtio::net::{NetBackend, NetHandler, NetMetrics, MAX_BUFFER_LEN};
use ferro_virtio::rng::{RngHandler, RngMetrics};
use ferro_virtio::worker::QueueProcessor;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

struct Sink;

impl NetBackend for Sink {
    fn read_frame(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        assert!(frame.len() <= MAX_BUFFER_LEN);
        Ok(frame.len())
    }
}

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = common::setup(data);
    let mut descs = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        if walk_chain(chain, MAX_DESCRIPTORS, &mut descs).is_ok() {
            assert!(descs.len() <= MAX_DESCRIPTORS);
            for desc in &descs {
                let _ = desc.in_memory(&mem);
            }
            if let Ok(request) = Request::parse_descs(&descs, &mem, 64) {
                assert!(request.data.iter().all(|d| d.in_memory(&mem)));
            }
        }
    }

    let (mem, mut queue) = common::setup(data);
    let mut net = NetHandler::new(Sink, Arc::new(NetMetrics::default()));
    let _ = net.process_tx(&mem, &mut queue);

    let (mem, mut queue) = common::setup(data);
    let mut rng = RngHandler::new(Arc::new(RngMetrics::default()));
    let _ = rng.process_queue(&mem, &mut queue);
});
