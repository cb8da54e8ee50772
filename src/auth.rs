//! Peer authentication with a shared secret: an HMAC-SHA256
//! challenge-response over both nonces, both identities and both
//! incarnations, in the handshake (`proto/PROTOCOL.md`, section 7.4).
//!
//! Each side's proof is bound to the other side's fresh nonce, so a
//! recorded handshake cannot be replayed, and to its role, so an acceptor's
//! proof cannot be reflected back as a dialer's.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::SecretSource;
use crate::wire::{MAC_LEN, NONCE_LEN};

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;

/// The shared secret (never printed).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why the secret could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret file could not be read.
    #[error("cannot read the secret file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The secret file can be read by every user of the machine.
    #[error(
        "the secret file {0} is readable by every user; run `chmod 600 {0}` (and chown it to the user cachecast runs as)"
    )]
    WorldReadable(String),
    /// The secret is too short to resist guessing.
    #[error(
        "the secret is {0} bytes long; at least {MIN_SECRET} are required (e.g. `openssl rand -hex 32`)"
    )]
    TooShort(usize),
}

impl Secret {
    /// A secret from bytes, checked for length.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SecretError> {
        if bytes.len() < MIN_SECRET {
            return Err(SecretError::TooShort(bytes.len()));
        }
        Ok(Secret(bytes))
    }

    /// Loads the secret from where the configuration says. A file must not
    /// be world-readable; surrounding whitespace (a trailing newline) is
    /// not part of the secret.
    pub fn load(source: &SecretSource) -> Result<Self, SecretError> {
        match source {
            SecretSource::Inline(s) => Secret::new(s.trim().as_bytes().to_vec()),
            SecretSource::File(path) => Secret::from_file(path),
        }
    }

    fn from_file(path: &Path) -> Result<Self, SecretError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
            path: shown.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o004 != 0 {
                return Err(SecretError::WorldReadable(shown));
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: shown,
            source,
        })?;
        let text = String::from_utf8_lossy(&bytes);
        Secret::new(text.trim().as_bytes().to_vec())
    }
}

/// Which side of a connection a proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that dialed.
    Dialer,
    /// The side that accepted.
    Acceptor,
}

/// What both sides said in their hellos; the proofs cover all of it.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The dialer's identity.
    pub dialer: &'a str,
    /// The dialer's nonce.
    pub dialer_nonce: &'a [u8; NONCE_LEN],
    /// The dialer's incarnation.
    pub dialer_incarnation: u64,
    /// The acceptor's identity.
    pub acceptor: &'a str,
    /// The acceptor's nonce.
    pub acceptor_nonce: &'a [u8; NONCE_LEN],
    /// The acceptor's incarnation.
    pub acceptor_incarnation: u64,
}

fn keyed(secret: &Secret, role: Role, t: &Transcript<'_>) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(&secret.0) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(b"cachecast auth v1\0");
    mac.update(match role {
        Role::Dialer => b"D",
        Role::Acceptor => b"A",
    });
    // Length-prefixed identities, so that no two transcripts share bytes.
    for (id, nonce, incarnation) in [
        (t.dialer, t.dialer_nonce, t.dialer_incarnation),
        (t.acceptor, t.acceptor_nonce, t.acceptor_incarnation),
    ] {
        mac.update(&(id.len() as u32).to_be_bytes());
        mac.update(id.as_bytes());
        mac.update(nonce);
        mac.update(&incarnation.to_be_bytes());
    }
    mac
}

/// The proof `role` sends.
pub fn prove(secret: &Secret, role: Role, t: &Transcript<'_>) -> [u8; MAC_LEN] {
    keyed(secret, role, t).finalize().into_bytes().into()
}

/// Checks the other side's proof, in constant time.
pub fn verify(secret: &Secret, role: Role, t: &Transcript<'_>, mac: &[u8; MAC_LEN]) -> bool {
    keyed(secret, role, t).verify_slice(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(dn: &'a [u8; 32], an: &'a [u8; 32]) -> Transcript<'a> {
        Transcript {
            dialer: "a:1",
            dialer_nonce: dn,
            dialer_incarnation: 1,
            acceptor: "b:2",
            acceptor_nonce: an,
            acceptor_incarnation: 2,
        }
    }

    #[test]
    fn proofs_are_bound_to_secret_role_and_nonces() {
        let s = Secret::new(b"0123456789abcdef".to_vec()).expect("secret");
        let other = Secret::new(b"0123456789abcdeX".to_vec()).expect("secret");
        let (dn, an, an2) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let mac = prove(&s, Role::Dialer, &t(&dn, &an));
        assert!(verify(&s, Role::Dialer, &t(&dn, &an), &mac));
        assert!(
            !verify(&other, Role::Dialer, &t(&dn, &an), &mac),
            "wrong secret"
        );
        assert!(!verify(&s, Role::Acceptor, &t(&dn, &an), &mac), "reflected");
        assert!(!verify(&s, Role::Dialer, &t(&dn, &an2), &mac), "replayed");
    }

    #[test]
    fn short_secrets_and_world_readable_files_are_refused() {
        assert!(matches!(
            Secret::new(b"short".to_vec()),
            Err(SecretError::TooShort(5))
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Secret::load(&SecretSource::File(path.clone())),
            Err(SecretError::WorldReadable(_))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let s = Secret::load(&SecretSource::File(path)).expect("loads");
        assert_eq!(s.0, b"0123456789abcdef0123", "trailing newline trimmed");
    }
}
