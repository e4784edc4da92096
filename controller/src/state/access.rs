//! Who may call: API keys and their roles, hosts' one-time join tokens and
//! host credentials, and the cluster CA that issues the agents'
//! certificates.
//!
//! A host's credential is an API key with role [`Role::Host`] bound to one
//! host id. It exists only after the host joined with a token an admin made
//! for that host id; joining again (with a new token) replaces it, and
//! revoking the host deletes it.

use ferro_pki::CaMaterial;

use super::{check_name, invalid, ClusterState, Output, Response, StateError, E};
use crate::model::{ApiKey, JoinToken, Role};

/// How long a join token lives at most.
pub const MAX_JOIN_TOKEN_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Check a host id: it names the host in its certificate, so it must be a
/// DNS label: 1 to 63 letters, digits and '-', not starting or ending with
/// '-'.
pub fn check_host_id(field: &str, id: &str) -> Result<(), StateError> {
    if ferro_pki::valid_host_id(id) {
        Ok(())
    } else {
        invalid(format!(
            "{field}: {id:?} is not a host id (1 to 63 letters, digits and '-', not starting or ending with '-')"
        ))
    }
}

impl ClusterState {
    /// The API key whose secret hashes to `sha256_hex`.
    pub fn api_key_by_hash(&self, sha256_hex: &str) -> Option<&ApiKey> {
        self.api_key_by_hash
            .get(sha256_hex)
            .and_then(|id| self.api_keys.get(id))
    }

    pub(super) fn create_api_key(&mut self, key: ApiKey) -> Response {
        check_name("name", &key.name)?;
        if key.role() == Role::Host {
            // Host keys come only from a join.
            check_host_id("host_id", &key.host_id)?;
        } else if !key.host_id.is_empty() {
            return invalid("host_id: only a host key names a host");
        }
        if self.api_keys.values().any(|k| k.name == key.name) {
            return Err(E::AlreadyExists(format!(
                "name: an API key {:?} exists",
                key.name
            )));
        }
        if self.api_keys.contains_key(&key.id)
            || self.api_key_by_hash.contains_key(&key.secret_sha256)
        {
            return Err(E::AlreadyExists("id: the API key exists".into()));
        }
        self.api_key_by_hash
            .insert(key.secret_sha256.clone(), key.id.clone());
        self.api_keys.insert(key.id.clone(), key.clone());
        Ok(Output::ApiKey(key))
    }

    pub(super) fn delete_api_key(&mut self, id: &str) -> Response {
        match self.api_keys.remove(id) {
            Some(k) => {
                self.api_key_by_hash.remove(&k.secret_sha256);
                Ok(Output::Done)
            }
            None => Err(E::NotFound(format!("id: no API key {id:?}"))),
        }
    }

    /// Keep the cluster CA; a CA already kept stays (the first wins).
    pub(super) fn set_cluster_ca(&mut self, ca: CaMaterial) -> Response {
        if self.ca.is_none() {
            self.ca = Some(ca);
        }
        Ok(Output::Done)
    }

    /// Store a join token for `host_id`, replacing one not yet used.
    pub(super) fn create_join_token(
        &mut self,
        host_id: &str,
        token_sha256: String,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Response {
        check_host_id("host_id", host_id)?;
        if expires_at_ms <= now_ms || expires_at_ms - now_ms > MAX_JOIN_TOKEN_TTL_MS {
            return invalid("ttl: must be more than 0 and at most 7 days");
        }
        self.join_tokens.retain(|_, t| t.host_id != host_id);
        // Expired tokens of other hosts go too.
        self.join_tokens.retain(|_, t| t.expires_at_ms > now_ms);
        self.join_tokens.insert(
            token_sha256,
            JoinToken {
                host_id: host_id.to_string(),
                expires_at_ms,
                created_at_ms: now_ms,
            },
        );
        Ok(Output::Done)
    }

    /// Trade a join token for host `host_id`'s credential `key`: the token
    /// must exist, be for that host and not have expired; it is used up,
    /// and the host's previous credential stops working.
    pub(super) fn join_host(
        &mut self,
        host_id: &str,
        token_sha256: &str,
        now_ms: u64,
        key: ApiKey,
    ) -> Response {
        let denied = || {
            Err(E::PermissionDenied(format!(
                "join token: not a valid token for host {host_id:?} (unknown, used, expired or made for another host)"
            )))
        };
        match self.join_tokens.get(token_sha256) {
            Some(t) if t.host_id == host_id && t.expires_at_ms > now_ms => {}
            _ => return denied(),
        }
        if key.role() != Role::Host || key.host_id != host_id {
            return invalid("key: a join makes a host key for the joining host");
        }
        self.join_tokens.remove(token_sha256);
        self.revoke_host_keys(host_id);
        self.create_api_key(key)
    }

    /// Delete host `host_id`'s credential and its unused join tokens.
    pub(super) fn revoke_host(&mut self, host_id: &str) -> Response {
        let tokens = self.join_tokens.len();
        self.join_tokens.retain(|_, t| t.host_id != host_id);
        let revoked = self.revoke_host_keys(host_id);
        if revoked == 0 && tokens == self.join_tokens.len() {
            return Err(E::NotFound(format!(
                "host_id: host {host_id:?} has no credential and no join token"
            )));
        }
        Ok(Output::Done)
    }

    fn revoke_host_keys(&mut self, host_id: &str) -> usize {
        let ids: Vec<String> = self
            .api_keys
            .values()
            .filter(|k| k.role() == Role::Host && k.host_id == host_id)
            .map(|k| k.id.clone())
            .collect();
        for id in &ids {
            let _ = self.delete_api_key(id);
        }
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::bootstrapped;
    use super::super::{sha256_hex, Command};
    use super::*;
    use ferro_raft::StateMachine;

    fn host_key(id: &str, host: &str, secret: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: format!("host-{host}-{id}"),
            secret_sha256: sha256_hex(secret.as_bytes()),
            admin: false,
            created_at_ms: 5,
            role: Some(Role::Host),
            host_id: host.into(),
            ec2_secret: String::new(),
        }
    }

    fn token(s: &mut ClusterState, host: &str, tok: &str, expires: u64) -> Response {
        s.apply(Command::CreateJoinToken {
            host_id: host.into(),
            token_sha256: sha256_hex(tok.as_bytes()),
            expires_at_ms: expires,
            now_ms: 1000,
        })
    }

    fn join(s: &mut ClusterState, host: &str, tok: &str, now: u64, key: ApiKey) -> Response {
        s.apply(Command::JoinHost {
            host_id: host.into(),
            token_sha256: sha256_hex(tok.as_bytes()),
            now_ms: now,
            key,
        })
    }

    #[test]
    fn a_token_works_once_for_its_host_until_it_expires() {
        let mut s = bootstrapped();
        token(&mut s, "h1", "t1", 10_000).unwrap();
        // Another host's id, an unknown token, an expired one: refused.
        let e = join(&mut s, "h2", "t1", 2000, host_key("ak-1", "h2", "s1")).unwrap_err();
        assert!(matches!(e, E::PermissionDenied(_)), "{e:?}");
        let e = join(&mut s, "h1", "nope", 2000, host_key("ak-1", "h1", "s1")).unwrap_err();
        assert!(matches!(e, E::PermissionDenied(_)), "{e:?}");
        let e = join(&mut s, "h1", "t1", 10_000, host_key("ak-1", "h1", "s1")).unwrap_err();
        assert!(matches!(e, E::PermissionDenied(_)), "{e:?}");
        // The right host in time: a host key; the token is used up.
        join(&mut s, "h1", "t1", 2000, host_key("ak-1", "h1", "s1")).unwrap();
        let k = s.api_key_by_hash(&sha256_hex(b"s1")).unwrap();
        assert_eq!((k.role(), k.host_id.as_str()), (Role::Host, "h1"));
        let e = join(&mut s, "h1", "t1", 2000, host_key("ak-2", "h1", "s2")).unwrap_err();
        assert!(matches!(e, E::PermissionDenied(_)), "{e:?}");
        // Rejoining with a new token replaces the credential.
        token(&mut s, "h1", "t2", 10_000).unwrap();
        join(&mut s, "h1", "t2", 2000, host_key("ak-2", "h1", "s2")).unwrap();
        assert!(s.api_key_by_hash(&sha256_hex(b"s1")).is_none());
        assert!(s.api_key_by_hash(&sha256_hex(b"s2")).is_some());
        // Revoked: gone; revoking again is NOT_FOUND.
        s.apply(Command::RevokeHost {
            host_id: "h1".into(),
        })
        .unwrap();
        assert!(s.api_key_by_hash(&sha256_hex(b"s2")).is_none());
        let e = s
            .apply(Command::RevokeHost {
                host_id: "h1".into(),
            })
            .unwrap_err();
        assert!(matches!(e, E::NotFound(_)), "{e:?}");
    }

    #[test]
    fn bad_tokens_and_host_ids_are_refused() {
        let mut s = bootstrapped();
        for bad in ["", "h.1", "h_1", "-h", "h-"] {
            let e = token(&mut s, bad, "t", 10_000).unwrap_err();
            assert!(e.to_string().contains("host_id"), "{bad}: {e}");
        }
        let e = token(&mut s, "h1", "t", 1000).unwrap_err();
        assert!(e.to_string().contains("ttl"), "{e}");
        let e = token(&mut s, "h1", "t", 1000 + MAX_JOIN_TOKEN_TTL_MS + 1).unwrap_err();
        assert!(e.to_string().contains("ttl"), "{e}");
        // A join must make a host key for the joining host.
        token(&mut s, "h1", "t", 10_000).unwrap();
        let e = join(&mut s, "h1", "t", 2000, host_key("ak-1", "h9", "s")).unwrap_err();
        assert!(matches!(e, E::InvalidArgument(_)), "{e:?}");
        // Keys of older state (no role) read as admin or user.
        let mut old = host_key("ak-7", "", "x");
        old.role = None;
        assert_eq!(old.role(), Role::User);
        old.admin = true;
        assert_eq!(old.role(), Role::Admin);
        let v: ApiKey = serde_json::from_str(
            r#"{"id":"ak-9","name":"n","secret_sha256":"00","admin":false,"created_at_ms":1}"#,
        )
        .unwrap();
        assert_eq!(v.role(), Role::User);
    }

    #[test]
    fn the_first_ca_stays() {
        let mut s = bootstrapped();
        let a = CaMaterial {
            common_name: "a".into(),
            cert_pem: "A".into(),
            key_pem: "a".into(),
        };
        let b = CaMaterial {
            common_name: "b".into(),
            ..a.clone()
        };
        s.apply(Command::SetClusterCa { ca: a.clone() }).unwrap();
        s.apply(Command::SetClusterCa { ca: b }).unwrap();
        assert_eq!(s.ca.as_ref(), Some(&a));
    }
}
