//! Ed25519 SSH key pairs for CreateKeyPair: the public key as an OpenSSH
//! `authorized_keys` line and the private key in the OpenSSH format
//! (`-----BEGIN OPENSSH PRIVATE KEY-----`, unencrypted), which `ssh -i`
//! reads as is. The private key is handed to the caller once and never
//! stored.

use base64::Engine;
use ed25519_dalek::SigningKey;

/// The OpenSSH name of the key type.
const KEY_TYPE: &str = "ssh-ed25519";

/// A freshly generated key pair.
pub struct GeneratedKey {
    /// `ssh-ed25519 AAAA... comment`.
    pub public_line: String,
    /// The public key blob (what fingerprints hash).
    pub public_blob: Vec<u8>,
    /// The private key, OpenSSH format, PEM-armoured.
    pub private_pem: String,
}

/// Appends an SSH `string` (u32 big-endian length, then the bytes).
fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The public key blob of a 32-byte Ed25519 public key.
fn public_blob(public: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(51);
    put_string(&mut blob, KEY_TYPE.as_bytes());
    put_string(&mut blob, public);
    blob
}

/// Builds the key pair of `seed` (32 random bytes) with `comment`;
/// `check` is the random check word of the private section.
pub fn from_seed(seed: &[u8; 32], check: u32, comment: &str) -> GeneratedKey {
    let signing = SigningKey::from_bytes(seed);
    let public = signing.verifying_key().to_bytes();
    let blob = public_blob(&public);
    let b64 = base64::engine::general_purpose::STANDARD;

    // The private section: check words, then the key, then padding to
    // the cipher block size (8 for "none").
    let mut private = Vec::new();
    private.extend_from_slice(&check.to_be_bytes());
    private.extend_from_slice(&check.to_be_bytes());
    put_string(&mut private, KEY_TYPE.as_bytes());
    put_string(&mut private, &public);
    let mut secret = Vec::with_capacity(64);
    secret.extend_from_slice(seed);
    secret.extend_from_slice(&public);
    put_string(&mut private, &secret);
    put_string(&mut private, comment.as_bytes());
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }

    let mut file = Vec::new();
    file.extend_from_slice(b"openssh-key-v1\0");
    put_string(&mut file, b"none"); // cipher
    put_string(&mut file, b"none"); // kdf
    put_string(&mut file, b""); // kdf options
    file.extend_from_slice(&1u32.to_be_bytes()); // one key
    put_string(&mut file, &blob);
    put_string(&mut file, &private);

    let body = b64.encode(&file);
    let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(70) {
        // Base64 output is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    let mut public_line = format!("{KEY_TYPE} {}", b64.encode(&blob));
    if !comment.is_empty() {
        public_line.push(' ');
        public_line.push_str(comment);
    }
    GeneratedKey {
        public_line,
        public_blob: blob,
        private_pem: pem,
    }
}

/// A new random key pair.
pub fn generate(comment: &str) -> GeneratedKey {
    let seed = crate::controller::random_bytes::<32>();
    let check = u32::from_be_bytes(crate::controller::random_bytes::<4>());
    from_seed(&seed, check, comment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn public_line_and_blob_agree() {
        let k = from_seed(&[7; 32], 1, "me");
        assert!(k
            .public_line
            .starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"));
        assert!(k.public_line.ends_with(" me"));
        let parsed = crate::api::convert::parse_public_key(&k.public_line).unwrap();
        assert_eq!(parsed, k.public_blob);
        assert_eq!(k.public_blob.len(), 51);
        // Different seeds, different keys.
        assert_ne!(from_seed(&[8; 32], 1, "me").public_line, k.public_line);
    }

    #[test]
    fn private_key_is_padded_and_armoured() {
        let k = from_seed(&[1; 32], 0xdead_beef, "a-comment");
        let lines: Vec<&str> = k.private_pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN OPENSSH PRIVATE KEY-----");
        assert_eq!(*lines.last().unwrap(), "-----END OPENSSH PRIVATE KEY-----");
        assert!(lines[1..lines.len() - 1].iter().all(|l| l.len() <= 70));
        let body: String = lines[1..lines.len() - 1].concat();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert!(raw.starts_with(b"openssh-key-v1\0"));
    }

    /// OpenSSH itself derives the same public key from our private key
    /// (`ssh-keygen -y`). ssh-keygen comes with openssh-client, which
    /// deploy/install-deps.sh installs.
    #[test]
    fn ssh_keygen_reads_the_private_key() {
        let k = generate("ferro-test");
        let path = std::env::temp_dir().join(format!("ferro-sshkey-{}", std::process::id()));
        std::fs::write(&path, &k.private_pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("precondition missing: ssh-keygen (Debian package openssh-client)");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "ssh-keygen refused the key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8_lossy(&out.stdout);
        let mut derived = derived.split_whitespace();
        let mut ours = k.public_line.split_whitespace();
        assert_eq!(derived.next(), ours.next());
        assert_eq!(derived.next(), ours.next());
    }
}
