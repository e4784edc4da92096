//! Batching of concurrent proposals: writes that arrive while earlier
//! batches are in flight share one log entry, so one append, one fsync and
//! one replication round serve many writes. An idle leader proposes a lone
//! write at once.

use std::sync::Arc;

use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::types::TypeConfig;
use crate::{ReplicationError, StateMachine};

/// openraft's error for a proposal.
pub(crate) type WriteError = openraft::error::RaftError<
    crate::NodeId,
    openraft::error::ClientWriteError<crate::NodeId, openraft::BasicNode>,
>;

/// Most commands in one log entry.
const MAX_BATCH: usize = 1_024;

/// A write waiting for its batch to commit.
pub(crate) struct Proposal<S: StateMachine> {
    pub(crate) command: S::Command,
    pub(crate) reply: oneshot::Sender<Result<S::Response, ReplicationError>>,
}

/// Starts the proposer task; it ends when the returned sender is dropped.
/// At most `in_flight` batches are proposed at a time; the rest queue up
/// and form bigger batches.
pub(crate) fn spawn<S: StateMachine>(
    raft: Raft<TypeConfig<S>>,
    in_flight: usize,
    map_error: fn(WriteError) -> ReplicationError,
) -> mpsc::UnboundedSender<Proposal<S>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Proposal<S>>();
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let raft = raft.clone();
            tokio::spawn(async move {
                let _slot = slot;
                propose(&raft, batch, map_error).await;
            });
        }
    });
    tx
}

async fn propose<S: StateMachine>(
    raft: &Raft<TypeConfig<S>>,
    batch: Vec<Proposal<S>>,
    map_error: fn(WriteError) -> ReplicationError,
) {
    let (commands, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let n = commands.len();
    match raft.client_write(commands).await {
        Ok(resp) if resp.data.len() == n => {
            for (reply, r) in replies.into_iter().zip(resp.data) {
                let _ = reply.send(Ok(r));
            }
        }
        Ok(resp) => {
            let e = ReplicationError::Storage(format!(
                "{n} commands gave {} responses",
                resp.data.len()
            ));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            let e = map_error(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
