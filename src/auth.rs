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
use crate::wire::{Hello, MAC_LEN};

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
    /// The key bytes (the session key of section 7.6 derives from them).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

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
        let bytes = read_private_as(
            path,
            |path, source| SecretError::Read { path, source },
            SecretError::WorldReadable,
        )?;
        // The bytes as they are, whitespace around them trimmed: a binary
        // secret keeps every byte.
        Secret::new(bytes.trim_ascii().to_vec())
    }
}

/// Why a file that only its owner should read could not be used.
pub(crate) enum PrivateFile {
    /// It could not be read.
    Read(std::io::Error),
    /// Every user of the machine can read it.
    WorldReadable,
}

/// [`read_private`], its failure told in the caller's own error: `read`
/// for a file that could not be read, `world` for one every user can read
/// (each given the path as shown).
pub(crate) fn read_private_as<E>(
    path: &Path,
    read: impl FnOnce(String, std::io::Error) -> E,
    world: impl FnOnce(String) -> E,
) -> Result<Vec<u8>, E> {
    let shown = || path.display().to_string();
    read_private(path).map_err(|e| match e {
        PrivateFile::Read(source) => read(shown(), source),
        PrivateFile::WorldReadable => world(shown()),
    })
}

/// Reads a file of secrets (the shared secret, the flush hook's
/// credentials), refusing one that every user of the machine can read.
pub(crate) fn read_private(path: &Path) -> Result<Vec<u8>, PrivateFile> {
    let meta = std::fs::metadata(path).map_err(PrivateFile::Read)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o004 != 0 {
            return Err(PrivateFile::WorldReadable);
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    std::fs::read(path).map_err(PrivateFile::Read)
}

/// Which side of a connection a proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that dialed.
    Dialer,
    /// The side that accepted.
    Acceptor,
}

/// Both hellos: the proofs cover every field of both, but the magic.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The dialer's hello.
    pub dialer: &'a Hello,
    /// The acceptor's hello.
    pub acceptor: &'a Hello,
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
    // Fixed-width and length-prefixed, so that no two transcripts share
    // bytes; `last_applied` is covered so that nobody on the path can make
    // a dialer skip what its peer never applied.
    for h in [t.dialer, t.acceptor] {
        mac.update(&(h.node.len() as u32).to_be_bytes());
        mac.update(h.node.as_bytes());
        mac.update(&h.nonce);
        mac.update(&h.incarnation.to_be_bytes());
        mac.update(&h.version.to_be_bytes());
        mac.update(&[u8::from(h.auth)]);
        match h.last_applied {
            None => mac.update(&[0]),
            Some(p) => {
                mac.update(&[1]);
                mac.update(&p.incarnation.to_be_bytes());
                mac.update(&p.seq.to_be_bytes());
            }
        }
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

    use crate::wire::{MAGIC, Position};

    fn hello(node: &str, nonce: u8, incarnation: u64, last: Option<Position>) -> Hello {
        Hello {
            magic: MAGIC,
            version: 1,
            node: node.into(),
            incarnation,
            nonce: [nonce; 32],
            last_applied: last,
            auth: true,
        }
    }

    fn hex(mac: &[u8; 32]) -> String {
        mac.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn proofs_are_bound_to_secret_role_nonces_and_positions() {
        let s = Secret::new(b"0123456789abcdef".to_vec()).expect("secret");
        let other = Secret::new(b"0123456789abcdeX".to_vec()).expect("secret");
        let d = hello("10.0.0.2:4001", 0xaa, 65_536, None);
        let pos = Position {
            incarnation: 65_536,
            seq: 41,
        };
        let a = hello("10.0.0.1:4001", 0xbb, 0x0123_4567_89ab_cdef, Some(pos));
        let t = Transcript {
            dialer: &d,
            acceptor: &a,
        };
        // The worked example of proto/PROTOCOL.md, section 12.4.
        assert_eq!(
            hex(&prove(&s, Role::Acceptor, &t)),
            "633202226e67fbc06396669194811d46b2401b31b906f925e79b956f61df139a"
        );
        let mac = prove(&s, Role::Dialer, &t);
        assert_eq!(
            hex(&mac),
            "1dabd017ebd582fac711255bc4e728a045a14b801e579d10c024fd58b1563e46"
        );
        assert!(verify(&s, Role::Dialer, &t, &mac));
        assert!(!verify(&other, Role::Dialer, &t, &mac), "wrong secret");
        assert!(!verify(&s, Role::Acceptor, &t, &mac), "reflected");
        let replayed = hello("10.0.0.1:4001", 0xcc, 0x0123_4567_89ab_cdef, Some(pos));
        let t2 = Transcript {
            dialer: &d,
            acceptor: &replayed,
        };
        assert!(!verify(&s, Role::Dialer, &t2, &mac), "replayed");
        let moved = Position { seq: 99, ..pos };
        let altered = hello("10.0.0.1:4001", 0xbb, 0x0123_4567_89ab_cdef, Some(moved));
        let t3 = Transcript {
            dialer: &d,
            acceptor: &altered,
        };
        assert!(!verify(&s, Role::Dialer, &t3, &mac), "altered position");
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
