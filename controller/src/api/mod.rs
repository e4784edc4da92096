//! The `ferro.compute.v1` gRPC services: thin impls that authenticate,
//! convert ([`convert`]) and delegate to the [`Controller`].
//!
//! Authentication: the [`authenticate`] interceptor takes the bearer key
//! from `authorization`, hashes it (sha256) and attaches the hash; each
//! call then checks the hash against the stored ones on the leader. Keys
//! never exist in clear text on the server.

pub mod cluster;
pub mod compute;
pub mod convert;
pub mod hostnet;
pub mod hosts;
pub mod hostvol;

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::controller::ControllerError;
use crate::state::{sha256_hex, StateError};

pub use cluster::ClusterService;
pub use compute::ComputeService;
pub use hosts::HostsService;

/// Metadata key naming the leader in UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-ferro-leader";

/// Metadata key marking an UNAVAILABLE answer whose call definitely did
/// nothing (not the leader, no quorum before proposing, an election under
/// way): safe to send again, here or at another node.
pub const RETRY_METADATA: &str = "x-ferro-retry";

/// Metadata key marking an UNAVAILABLE answer to a write that was proposed
/// but not answered in time (`x-ferro-outcome: unknown`): it may still
/// commit, so only an idempotent write or one with a client token may be
/// sent again.
pub const OUTCOME_METADATA: &str = "x-ferro-outcome";

/// The sha256 of the caller's bearer key, attached by [`authenticate`].
#[derive(Clone, Debug)]
pub struct CallerKey(pub String);

/// Interceptor: take `authorization: Bearer <key>` and attach its hash; a
/// malformed header is refused here, a missing one by [`caller`] in each
/// call that needs a key (every call but `Hosts.Join`).
#[allow(clippy::result_large_err)]
pub fn authenticate(mut req: Request<()>) -> Result<Request<()>, Status> {
    let Some(header) = req.metadata().get("authorization") else {
        return Ok(req);
    };
    let text = header
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization: not ASCII"))?;
    let key = text
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer <key>\""))?;
    let hash = sha256_hex(key.as_bytes());
    req.extensions_mut().insert(CallerKey(hash));
    Ok(req)
}

/// The caller's key hash (set by the interceptor).
#[allow(clippy::result_large_err)]
pub fn caller<T>(req: &Request<T>) -> Result<String, Status> {
    req.extensions()
        .get::<CallerKey>()
        .map(|k| k.0.clone())
        .ok_or_else(|| Status::unauthenticated("authorization: missing API key"))
}

/// The gRPC status of an error.
pub fn status(e: ControllerError) -> Status {
    use ferro_raft::ReplicationError as R;
    match e {
        ControllerError::State(s) => match s {
            StateError::InvalidArgument(m) => Status::invalid_argument(m),
            StateError::NotFound(m) => Status::not_found(m),
            StateError::AlreadyExists(m) => Status::already_exists(m),
            StateError::FailedPrecondition(m) => Status::failed_precondition(m),
            StateError::ResourceExhausted(m) => Status::resource_exhausted(m),
            StateError::PermissionDenied(m) => Status::permission_denied(m),
        },
        ControllerError::Replication(R::NotLeader { leader }) => {
            let msg = R::NotLeader {
                leader: leader.clone(),
            }
            .to_string();
            let mut st = Status::unavailable(msg);
            st.metadata_mut()
                .insert(RETRY_METADATA, MetadataValue::from_static("1"));
            if let Some(addr) = leader.and_then(|m| MetadataValue::try_from(m.addr).ok()) {
                st.metadata_mut().insert(LEADER_METADATA, addr);
            }
            st
        }
        ControllerError::Replication(R::Membership(m)) => Status::failed_precondition(m),
        ControllerError::Replication(e @ R::Indeterminate(_)) => {
            let mut st = Status::unavailable(e.to_string());
            st.metadata_mut()
                .insert(OUTCOME_METADATA, MetadataValue::from_static("unknown"));
            st
        }
        ControllerError::Replication(e) => {
            // No quorum or an election under way: clients may retry, here
            // or at another node.
            let mut st = Status::unavailable(e.to_string());
            st.metadata_mut()
                .insert(RETRY_METADATA, MetadataValue::from_static("1"));
            st
        }
        ControllerError::Unauthenticated(m) => Status::unauthenticated(m),
        ControllerError::Agent(m) => Status::unavailable(m),
        ControllerError::Unexpected => Status::internal("unexpected state machine output"),
        ControllerError::Pki(e) => Status::internal(format!("certificate authority: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_raft::{Member, ReplicationError};

    #[test]
    fn not_leader_names_the_leader() {
        let e = ControllerError::Replication(ReplicationError::NotLeader {
            leader: Some(Member {
                id: 2,
                addr: "10.0.0.2:7400".into(),
            }),
        });
        let s = status(e);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("10.0.0.2:7400"), "{}", s.message());
        assert_eq!(s.metadata().get(LEADER_METADATA).unwrap(), "10.0.0.2:7400");
        assert!(s.metadata().get(RETRY_METADATA).is_some());
        assert!(s.metadata().get(OUTCOME_METADATA).is_none());
    }

    #[test]
    fn a_write_that_may_still_commit_is_marked_apart() {
        let s = status(ControllerError::Replication(
            ReplicationError::Indeterminate("write timed out".into()),
        ));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.metadata().get(RETRY_METADATA).is_none());
        assert_eq!(s.metadata().get(OUTCOME_METADATA).unwrap(), "unknown");
        let s = status(ControllerError::Replication(ReplicationError::Unavailable(
            "no quorum".into(),
        )));
        assert!(s.metadata().get(RETRY_METADATA).is_some());
        assert!(s.metadata().get(OUTCOME_METADATA).is_none());
    }

    #[test]
    fn interceptor_requires_a_bearer_key() {
        let r = authenticate(Request::new(())).unwrap();
        assert_eq!(caller(&r).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", "Basic x".parse().unwrap());
        assert!(authenticate(r).is_err());
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", "Bearer k".parse().unwrap());
        let r = authenticate(r).unwrap();
        assert_eq!(caller(&r).unwrap(), sha256_hex(b"k"));
    }
}
