//! The agent-wide stream of instance state changes behind `WatchEvents`.

use std::sync::Mutex;

use ferro_proto::agent::v1 as pb;
use tokio::sync::broadcast;

use crate::convert;
use crate::machine::Change;

/// Events kept for slow watchers before they lag.
const BACKLOG: usize = 4096;

/// Numbers events and fans them out to every watcher.
pub struct EventBus {
    tx: broadcast::Sender<pb::InstanceEvent>,
    seq: Mutex<u64>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            seq: Mutex::new(0),
        }
    }
}

impl EventBus {
    /// Publish one change of instance `id`.
    pub fn emit(&self, id: &str, change: &Change) {
        self.send(pb::InstanceEvent {
            seq: 0,
            instance_id: id.to_string(),
            from: convert::phase(change.from) as i32,
            to: convert::phase(change.to) as i32,
            reason: change.reason.clone(),
            exit: change.exit.as_ref().map(convert::exit_info),
            at_unix_ms: crate::now_ms(),
        });
    }

    /// Publish the creation of instance `id` (from `UNSPECIFIED`).
    pub fn emit_created(&self, id: &str) {
        self.send(pb::InstanceEvent {
            seq: 0,
            instance_id: id.to_string(),
            from: pb::InstanceState::Unspecified as i32,
            to: pb::InstanceState::Created as i32,
            reason: "created".into(),
            exit: None,
            at_unix_ms: crate::now_ms(),
        });
    }

    fn send(&self, mut event: pb::InstanceEvent) {
        // Numbering and sending under one lock keeps `seq` in stream order.
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        event.seq = *seq;
        // No receivers is fine.
        let _ = self.tx.send(event);
    }

    /// A new watcher, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::InstanceEvent> {
        self.tx.subscribe()
    }
}
