//! Following this host's network state: `Hosts.WatchHostNetwork`, a
//! stream of whole states (one on connect, one after every change).
//!
//! The call goes through `ferro-client` (leader following, TLS, the host's
//! bearer key, HTTP/2 keep-alive). When the stream breaks or the leader
//! changes, the loop reconnects with back-off and jitter. The last state
//! stays in the channel meanwhile: an unreachable controller never tears
//! the dataplane down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferro_client::{Client, ClientConfig};
use ferro_proto::compute::v1::hosts_client::HostsClient;
use ferro_proto::compute::v1::{HostNetwork, WatchHostNetworkRequest};
use tokio::sync::watch;

use crate::config::Config;

/// First pause after a failure; doubled per failure in a row.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why a session with the controller ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The host's key could not be read (not joined yet?).
    #[error("cannot read the host's key {0} (has the host joined?)")]
    Key(String, #[source] std::io::Error),
    /// The call could not be made or was refused.
    #[error(transparent)]
    Call(#[from] ferro_client::CallError),
    /// The stream broke.
    #[error("the state stream broke: {}", .0.message())]
    Stream(tonic::Status),
    /// The controller ended the stream.
    #[error("the controller ended the state stream")]
    Ended,
}

/// Failures in a row: logged once, then once a minute with a count.
#[derive(Debug, Default)]
pub struct FailureLog {
    in_a_row: u32,
    since_log: u32,
    logged_at: Option<Instant>,
}

impl FailureLog {
    /// One more failure; logs it when due.
    pub fn failed(&mut self, e: &WatchError) {
        self.in_a_row += 1;
        self.since_log += 1;
        if self
            .logged_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            let denied = matches!(e, WatchError::Call(c) if c.status().is_some_and(|s|
                matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)));
            if denied {
                tracing::error!(
                    failures = self.since_log,
                    "the controller refused this host's key: {}",
                    chain(e)
                );
            } else {
                tracing::warn!(
                    failures = self.since_log,
                    "cannot follow the host's network state (keeping the last one): {}",
                    chain(e)
                );
            }
            self.logged_at = Some(Instant::now());
            self.since_log = 0;
        }
    }

    /// A state arrived.
    pub fn succeeded(&mut self) {
        if self.in_a_row > 0 {
            tracing::info!(
                failures = self.in_a_row,
                "following the host's network state again"
            );
        }
        *self = Self::default();
    }

    /// The pause before the next attempt.
    pub fn backoff(&self) -> Duration {
        let exp = self.in_a_row.saturating_sub(1).min(8);
        ferro_client::jitter(MIN_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    crate::chain(e)
}

/// Follow the state forever, publishing every state into `tx`.
pub async fn follow(cfg: Arc<Config>, tx: watch::Sender<Option<HostNetwork>>) {
    let mut failures = FailureLog::default();
    loop {
        let e = session(&cfg, &tx, &mut failures).await;
        failures.failed(&e);
        tokio::time::sleep(failures.backoff()).await;
    }
}

/// One connection: returns why it ended.
async fn session(
    cfg: &Config,
    tx: &watch::Sender<Option<HostNetwork>>,
    failures: &mut FailureLog,
) -> WatchError {
    let key_file = &cfg.credentials.api_key_file;
    let key = match std::fs::read_to_string(key_file) {
        Ok(k) => k.trim().to_string(),
        Err(e) => return WatchError::Key(key_file.display().to_string(), e),
    };
    let mut ccfg = ClientConfig::new(cfg.controllers.clone(), Some(key));
    ccfg.ca_pem = cfg
        .credentials
        .ca_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok());
    // One round of the controllers per attempt; the loop backs off.
    ccfg.max_retries = cfg.controllers.len();
    ccfg.call_timeout = Duration::from_secs(10);
    let mut client = match Client::new(ccfg) {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    let req = WatchHostNetworkRequest {
        underlay_ip: cfg.underlay_ip.to_string(),
    };
    let stream = client
        .call(|ch| {
            let req = req.clone();
            async move { HostsClient::new(ch).watch_host_network(req).await }
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    tracing::debug!(
        controller = client.endpoint(),
        "following the host's network state"
    );
    loop {
        match stream.message().await {
            Ok(Some(net)) => {
                failures.succeeded();
                if net.host_id != cfg.host_id && !net.host_id.is_empty() {
                    tracing::warn!(host_id = %net.host_id, "the controller sent another host's state; ignored");
                    continue;
                }
                tx.send_replace(Some(net));
            }
            Ok(None) => return WatchError::Ended,
            Err(s) => return WatchError::Stream(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut f = FailureLog::default();
        f.failed(&WatchError::Ended);
        assert!(f.backoff() < MIN_BACKOFF * 2);
        for _ in 0..20 {
            f.failed(&WatchError::Ended);
        }
        let b = f.backoff();
        assert!(b >= MAX_BACKOFF / 2 && b < MAX_BACKOFF * 3 / 2, "{b:?}");
        f.succeeded();
        assert_eq!(f.in_a_row, 0);
    }
}
