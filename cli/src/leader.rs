//! Following the Raft leader.
//!
//! A controller that is not the leader answers `UNAVAILABLE` and names the
//! leader in the metadata `x-ferro-leader` and in its message. The client
//! then retries the same call there ([`next_hop`] decides; the transport
//! loop is in [`crate::client`]).

use crate::config::normalize_endpoint;

/// Metadata key carrying the leader's address.
pub const LEADER_METADATA: &str = "x-ferro-leader";

/// At most this many redirects per call.
pub const MAX_HOPS: usize = 5;

/// What to do after a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// Retry at this endpoint.
    Follow(String),
    /// Give the error to the user.
    Fail,
}

/// The leader named by an `UNAVAILABLE` status, normalised to
/// `http://host:port`: the metadata first, else the message.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let from_meta = status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| normalize_endpoint(v).ok());
    from_meta.or_else(|| leader_in_message(status.message()))
}

/// The first address after the word "leader" in `msg`, e.g.
/// `not the leader; leader is 127.0.0.2:7400` or `leader=http://h:1`.
pub fn leader_in_message(msg: &str) -> Option<String> {
    let lower = msg.to_ascii_lowercase();
    let at = lower.find("leader")?;
    msg[at..]
        .split(|c: char| c.is_whitespace() || c == '=' || c == ',' || c == ';')
        .map(|t| t.trim_matches(|c: char| "\"'()<>`.".contains(c)))
        .filter(|t| t.contains(':'))
        .find_map(|t| normalize_endpoint(t).ok())
}

/// Whether to follow `status` from `current`, given the endpoints already
/// tried for this call.
pub fn next_hop(status: &tonic::Status, current: &str, tried: &[String]) -> Hop {
    match leader_hint(status) {
        Some(leader) if leader != current && !tried.contains(&leader) && tried.len() < MAX_HOPS => {
            Hop::Follow(leader)
        }
        _ => Hop::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn unavailable_with_meta(msg: &str, leader: &str) -> Status {
        let mut s = Status::unavailable(msg);
        s.metadata_mut()
            .insert(LEADER_METADATA, leader.parse().unwrap());
        s
    }

    #[test]
    fn metadata_wins_over_message() {
        let s = unavailable_with_meta("not the leader; leader is 10.0.0.9:1", "127.0.0.2:7400");
        assert_eq!(leader_hint(&s).as_deref(), Some("http://127.0.0.2:7400"));
    }

    #[test]
    fn message_forms() {
        let cases = [
            (
                "not the leader; leader is 127.0.0.3:7400",
                "http://127.0.0.3:7400",
            ),
            ("not leader (leader=http://c2:7400)", "http://c2:7400"),
            (
                "Not the leader. Leader: \"https://c3:7401\".",
                "https://c3:7401",
            ),
            (
                "node 2 is not the leader, leader at 127.0.0.1:7400.",
                "http://127.0.0.1:7400",
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(leader_in_message(msg).as_deref(), Some(want), "{msg}");
        }
        assert_eq!(leader_in_message("no leader elected yet"), None);
        assert_eq!(leader_in_message("tcp connect error 127.0.0.1:7400"), None);
    }

    #[test]
    fn only_unavailable_is_followed() {
        let mut s = Status::new(Code::FailedPrecondition, "leader is 127.0.0.2:7400");
        s.metadata_mut()
            .insert(LEADER_METADATA, "127.0.0.2:7400".parse().unwrap());
        assert_eq!(leader_hint(&s), None);
        assert_eq!(next_hop(&s, "http://a:1", &[]), Hop::Fail);
    }

    #[test]
    fn follows_once_per_endpoint_and_stops_at_the_limit() {
        let s = unavailable_with_meta("not the leader", "b:1");
        assert_eq!(
            next_hop(&s, "http://a:1", &["http://a:1".into()]),
            Hop::Follow("http://b:1".into())
        );
        // Pointing at itself or at a node already tried: a loop, give up.
        assert_eq!(next_hop(&s, "http://b:1", &[]), Hop::Fail);
        let tried = vec!["http://a:1".to_string(), "http://b:1".to_string()];
        assert_eq!(next_hop(&s, "http://c:1", &tried), Hop::Fail);
        let many: Vec<String> = (0..MAX_HOPS).map(|i| format!("http://n{i}:1")).collect();
        assert_eq!(next_hop(&s, "http://c:1", &many), Hop::Fail);
    }

    #[test]
    fn unavailable_without_a_leader_fails() {
        let s = Status::unavailable("no leader elected yet");
        assert_eq!(next_hop(&s, "http://a:1", &[]), Hop::Fail);
    }
}
