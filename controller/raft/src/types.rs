//! The openraft type configuration for a [`StateMachine`]. Crate-private:
//! nothing of openraft leaks into the public API.

use std::cmp::Ordering;
use std::fmt;
use std::io::Cursor;
use std::marker::PhantomData;

use openraft::impls::OneshotResponder;
use openraft::{BasicNode, RaftTypeConfig, TokioRuntime};

use crate::{NodeId, StateMachine};

/// openraft's view of a replicated `S`: a log entry carries a batch of
/// commands (concurrent proposals share an entry) and yields their
/// responses in order; blank and membership entries yield none.
pub(crate) struct TypeConfig<S>(PhantomData<fn() -> S>);

impl<S> fmt::Debug for TypeConfig<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TypeConfig")
    }
}

impl<S> Clone for TypeConfig<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for TypeConfig<S> {}

impl<S> Default for TypeConfig<S> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<S> PartialEq for TypeConfig<S> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<S> Eq for TypeConfig<S> {}

impl<S> PartialOrd for TypeConfig<S> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<S> Ord for TypeConfig<S> {
    fn cmp(&self, _: &Self) -> Ordering {
        Ordering::Equal
    }
}

impl<S: StateMachine> RaftTypeConfig for TypeConfig<S> {
    type D = Vec<S::Command>;
    type R = Vec<S::Response>;
    type NodeId = NodeId;
    type Node = BasicNode;
    type Entry = openraft::Entry<Self>;
    type SnapshotData = Cursor<Vec<u8>>;
    type AsyncRuntime = TokioRuntime;
    type Responder = OneshotResponder<Self>;
}

/// A log id of this crate's configuration.
pub(crate) type LogId = openraft::LogId<NodeId>;
/// Stored membership of this crate's configuration.
pub(crate) type Membership = openraft::StoredMembership<NodeId, BasicNode>;
/// Snapshot metadata of this crate's configuration.
pub(crate) type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
/// openraft's storage error.
pub(crate) type StorageError = openraft::StorageError<NodeId>;
