//! Arbitrary guest memory (descriptor table, avail ring, request headers,
//! data) through the virtio-blk request parser and handler.

#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use ferro_virtio::block::{BlockHandler, BlockMetrics, Disk};
use ferro_virtio::testing::TempImage;
use ferro_virtio::worker::QueueProcessor;
use libfuzzer_sys::fuzz_target;

/// A 64-sector scratch image shared by all runs.
fn disk() -> Arc<Disk> {
    static IMAGE: OnceLock<(TempImage, Arc<Disk>)> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let image = TempImage::new("fuzz", &[0u8; 64 * 512]).unwrap();
            let disk = Arc::new(Disk::open(image.path(), false).unwrap());
            (image, disk)
        })
        .1
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = common::setup(data);
    let mut handler = BlockHandler::new(disk(), "fuzz", Arc::new(BlockMetrics::default()));
    // Errors only mean the rings themselves are unusable; panics are bugs.
    let _ = handler.process_queue(&mem, &mut queue);
});
