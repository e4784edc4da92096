//! Following the Raft leader.
//!
//! A controller that is not the leader answers `UNAVAILABLE` and names the
//! leader in the metadata `x-ferro-leader` and in its message. The client
//! then retries the same call there ([`next_hop`] decides; the transport
//! loop is in [`crate::client`]).

use crate::normalize_endpoint;

/// Metadata key carrying the leader's address.
pub const LEADER_METADATA: &str = "x-ferro-leader";

/// At most this many redirects per call.
pub const MAX_HOPS: usize = 5;

/// Metadata key marking an `UNAVAILABLE` answer whose call did nothing (not
/// the leader, no quorum, an election under way): safe to send again.
pub const RETRY_METADATA: &str = "x-ferro-retry";

/// Metadata key marking an `UNAVAILABLE` answer to a write that may still
/// commit (`unknown`). [`Failover`] sends it again too: callers make only
/// idempotent calls or calls with a client token through a [`Client`](crate::Client).
pub const OUTCOME_METADATA: &str = "x-ferro-outcome";

/// At most this many retries per call after failures that are not
/// redirects (unreachable node, election under way).
pub const MAX_RETRIES: usize = 40;

/// The pause before a retry once every endpoint has failed in turn.
pub const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// What to do after a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// Retry at this endpoint now.
    Follow(String),
    /// Retry at this endpoint after the pause.
    Retry(String, std::time::Duration),
    /// Give the error to the user.
    Fail,
}

/// Whether `status` means "try again, maybe elsewhere": the transport
/// failed (no answer from that node) or the node marked it retryable.
pub fn retryable(status: &tonic::Status) -> bool {
    let transport = std::error::Error::source(status).is_some()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        );
    let marked = status.code() == tonic::Code::Unavailable
        && (status.metadata().get(RETRY_METADATA).is_some()
            || status.metadata().get(OUTCOME_METADATA).is_some());
    transport || marked
}

/// The endpoints of one call and what was tried: decides each next hop.
#[derive(Debug, Clone)]
pub struct Failover {
    endpoints: Vec<String>,
    tried: Vec<String>,
    /// Endpoints that refused the connection (nothing listens there).
    refused: Vec<String>,
    /// Endpoints whose transport failed in this call (no answer: a dead or
    /// paused node); not followed as leader and tried last.
    silent: Vec<String>,
    hops: usize,
    retries: usize,
    max_retries: usize,
    failed_in_a_row: usize,
}

impl Failover {
    /// A call over the configured `endpoints` (at least one).
    pub fn new(endpoints: Vec<String>) -> Self {
        Self::with_retries(endpoints, MAX_RETRIES)
    }

    /// Like [`Self::new`] with at most `max_retries` retries.
    pub fn with_retries(endpoints: Vec<String>, max_retries: usize) -> Self {
        Self {
            endpoints,
            tried: Vec::new(),
            refused: Vec::new(),
            silent: Vec::new(),
            hops: 0,
            retries: 0,
            max_retries,
            failed_in_a_row: 0,
        }
    }

    /// After `status` from `current`: follow a named leader, move to the
    /// next configured endpoint (pausing once all failed in turn), or fail.
    pub fn next(&mut self, status: &tonic::Status, current: &str) -> Hop {
        self.tried.push(current.to_string());
        if transport_failed(status) && !self.silent.iter().any(|s| s == current) {
            self.silent.push(current.to_string());
        }
        if let Some(leader) = leader_hint(status).map(|l| same_scheme(&l, current)) {
            let loops = leader == current || self.tried.iter().rev().take(2).any(|t| *t == leader);
            // A follower that has not noticed yet still names a leader that
            // did not answer us: do not go back to it.
            let silent = self.silent.contains(&leader);
            if !loops && !silent && self.hops < MAX_HOPS {
                self.hops += 1;
                self.failed_in_a_row = 0;
                return Hop::Follow(leader);
            }
        }
        if refused(status) && !self.refused.iter().any(|r| r == current) {
            self.refused.push(current.to_string());
        }
        // Every endpoint refused the connection: nothing listens anywhere,
        // and waiting will not change that within a call. Fail at once.
        if !self.endpoints.is_empty() && self.endpoints.iter().all(|e| self.refused.contains(e)) {
            return Hop::Fail;
        }
        if !retryable(status) || self.retries >= self.max_retries {
            return Hop::Fail;
        }
        self.retries += 1;
        self.failed_in_a_row += 1;
        let at = self.endpoints.iter().position(|e| e == current);
        let n = self.endpoints.len();
        let start = at.map_or(0, |i| i + 1);
        // The next endpoint that answered (or was not tried) in this call;
        // a silent one only when every endpoint is.
        let next = (0..n)
            .map(|k| &self.endpoints[(start + k) % n.max(1)])
            .find(|e| !self.silent.contains(e))
            .or_else(|| self.endpoints.get(start % n.max(1)))
            .cloned()
            .unwrap_or_else(|| current.to_string());
        let pause = if self.failed_in_a_row >= self.endpoints.len().max(1) {
            self.failed_in_a_row = 0;
            RETRY_PAUSE
        } else {
            std::time::Duration::ZERO
        };
        Hop::Retry(next, pause)
    }
}

/// The transport failed: no answer from that node (a gRPC status with a
/// transport error as its source).
fn transport_failed(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        )
}

/// The connection was refused (ECONNREFUSED somewhere in the cause chain).
pub fn refused(status: &tonic::Status) -> bool {
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// `leader` with the scheme of `current`: a node names its leader as
/// `host:port`, and the whole cluster speaks TLS or none of it does.
fn same_scheme(leader: &str, current: &str) -> String {
    match (
        leader.strip_prefix("http://"),
        current.starts_with("https://"),
    ) {
        (Some(rest), true) => format!("https://{rest}"),
        _ => leader.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn refused_status() -> Status {
        let mut s = Status::unavailable("tcp connect error");
        s.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        s
    }

    #[test]
    fn refused_everywhere_fails_at_once_refused_somewhere_moves_on() {
        let mut one = Failover::new(vec!["http://a:1".into()]);
        assert_eq!(one.next(&refused_status(), "http://a:1"), Hop::Fail);
        let mut three = Failover::new(vec![
            "http://a:1".into(),
            "http://b:1".into(),
            "http://c:1".into(),
        ]);
        assert!(
            matches!(three.next(&refused_status(), "http://a:1"), Hop::Retry(n, _) if n == "http://b:1")
        );
        assert!(
            matches!(three.next(&refused_status(), "http://b:1"), Hop::Retry(n, _) if n == "http://c:1")
        );
        assert_eq!(three.next(&refused_status(), "http://c:1"), Hop::Fail);
    }

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

    fn failover(eps: &[&str]) -> Failover {
        Failover::new(eps.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn only_unavailable_is_followed() {
        let mut s = Status::new(Code::FailedPrecondition, "leader is 127.0.0.2:7400");
        s.metadata_mut()
            .insert(LEADER_METADATA, "127.0.0.2:7400".parse().unwrap());
        assert_eq!(leader_hint(&s), None);
        assert_eq!(failover(&["http://a:1"]).next(&s, "http://a:1"), Hop::Fail);
    }

    #[test]
    fn follows_the_leader_and_stops_at_loops_and_the_limit() {
        let s = unavailable_with_meta("not the leader", "b:1");
        let mut f = failover(&["http://a:1"]);
        assert_eq!(f.next(&s, "http://a:1"), Hop::Follow("http://b:1".into()));
        // Pointing at itself: a loop, give up.
        assert_eq!(f.next(&s, "http://b:1"), Hop::Fail);
        let mut f = failover(&["http://a:1"]);
        for i in 0..MAX_HOPS {
            let s = unavailable_with_meta("not the leader", &format!("n{}:1", i + 1));
            assert!(matches!(
                f.next(&s, &format!("http://n{i}:1")),
                Hop::Follow(_)
            ));
        }
        let s = unavailable_with_meta("not the leader", "z:1");
        assert_eq!(f.next(&s, "http://y:1"), Hop::Fail);
    }

    #[test]
    fn a_tls_client_follows_the_leader_over_tls() {
        let s = unavailable_with_meta("not the leader", "10.0.0.2:7400");
        let mut f = failover(&["https://10.0.0.1:7400"]);
        assert_eq!(
            f.next(&s, "https://10.0.0.1:7400"),
            Hop::Follow("https://10.0.0.2:7400".into())
        );
    }

    #[test]
    fn unavailable_without_a_leader_or_mark_fails() {
        let s = Status::unavailable("agent h1 cannot be reached");
        assert_eq!(
            failover(&["http://a:1", "http://b:1"]).next(&s, "http://a:1"),
            Hop::Fail
        );
    }

    #[test]
    fn elections_and_dead_nodes_move_round_the_endpoints_then_pause() {
        let mut s = Status::unavailable("no quorum");
        s.metadata_mut()
            .insert(RETRY_METADATA, "1".parse().unwrap());
        assert!(retryable(&s));
        let mut f = failover(&["http://a:1", "http://b:1", "http://c:1"]);
        assert_eq!(
            f.next(&s, "http://a:1"),
            Hop::Retry("http://b:1".into(), std::time::Duration::ZERO)
        );
        assert_eq!(
            f.next(&s, "http://b:1"),
            Hop::Retry("http://c:1".into(), std::time::Duration::ZERO)
        );
        // All three failed in turn: pause before starting over.
        assert_eq!(
            f.next(&s, "http://c:1"),
            Hop::Retry("http://a:1".into(), RETRY_PAUSE)
        );
        let mut n = 3;
        while let Hop::Retry(..) = f.next(&s, "http://a:1") {
            n += 1;
        }
        assert_eq!(n, MAX_RETRIES);
    }

    /// A paused leader: the call timed out there; a follower that has not
    /// noticed still names it. The call does not go back to it while
    /// another endpoint may answer.
    #[test]
    fn a_node_that_did_not_answer_is_neither_followed_nor_retried_first() {
        let mut timeout = Status::unavailable("keep-alive timed out");
        timeout.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )));
        let mut f = failover(&["http://a:1", "http://b:1", "http://c:1"]);
        assert_eq!(
            f.next(&timeout, "http://a:1"),
            Hop::Retry("http://b:1".into(), std::time::Duration::ZERO)
        );
        let names_a = unavailable_with_meta("not the leader", "a:1");
        let mut retry = names_a.clone();
        retry
            .metadata_mut()
            .insert(RETRY_METADATA, "1".parse().unwrap());
        assert!(matches!(f.next(&retry, "http://b:1"), Hop::Retry(n, _) if n == "http://c:1"));
        // From c, the next is b again, not a.
        assert!(matches!(f.next(&retry, "http://c:1"), Hop::Retry(n, _) if n == "http://b:1"));
    }

    #[test]
    fn a_followed_leader_that_dies_sends_the_call_back_to_the_list() {
        let mut s = Status::unavailable("no quorum");
        s.metadata_mut()
            .insert(RETRY_METADATA, "1".parse().unwrap());
        let mut f = failover(&["http://a:1", "http://b:1"]);
        assert_eq!(
            f.next(&s, "http://z:1"),
            Hop::Retry("http://a:1".into(), std::time::Duration::ZERO)
        );
    }
}
