//! The handshake's checks as plain functions of the two hellos (sans-IO),
//! run the same way by the dialer and the acceptor (`proto/PROTOCOL.md`,
//! sections 7.2 to 7.4). The tasks only move the frames; what is checked,
//! in which order, and what each refusal says lives here.

use crate::auth::{self, Role, Secret};
use crate::mesh::LinkError;
use crate::mesh::error::Violation;
use crate::wire::{Hello, MAC_LEN, MAGIC, Message, Opener, PROTOCOL_VERSION, Sealer};

/// Why a handshake was refused. The text is the reason a Reject carries
/// (and the log line), naming both nodes where the other side logs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Not a cachecast peer.
    #[error("bad magic: not a cachecast peer")]
    BadMagic,
    /// A version older than ours (each side sends its highest; both use
    /// the lower, and this node speaks only version 1).
    #[error("unsupported protocol version {0} (this node speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// This side has a secret, the other does not.
    #[error("{me} requires a shared secret (cachecast.secret) and {them} has none")]
    SecretMissingThere { me: String, them: String },
    /// The other side has a secret, this side does not.
    #[error("{them} has a shared secret (cachecast.secret) and {me} has none")]
    SecretMissingHere { me: String, them: String },
    /// The other side's proof is wrong.
    #[error("authentication failed for {them}: wrong shared secret (cachecast.secret differs?)")]
    WrongSecret { them: String },
}

/// The first checks of the other side's hello, before its identity: the
/// magic, then the version.
pub(crate) fn check_hello(theirs: &Hello) -> Result<(), HandshakeError> {
    if theirs.magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    if theirs.version < PROTOCOL_VERSION {
        return Err(HandshakeError::Version(theirs.version));
    }
    Ok(())
}

/// The last check of the other side's hello, once its identity `them` is
/// known: both sides have a secret, or neither.
pub(crate) fn check_secrets(
    have: bool,
    theirs: &Hello,
    me: &str,
    them: &str,
) -> Result<(), HandshakeError> {
    let (me, them) = (me.to_string(), them.to_string());
    match (have, theirs.auth) {
        (true, false) => Err(HandshakeError::SecretMissingThere { me, them }),
        (false, true) => Err(HandshakeError::SecretMissingHere { me, them }),
        _ => Ok(()),
    }
}

/// The other side's frame at a step of the handshake: the one awaited (as
/// `take` finds it), its refusal, or anything else, which breaks the
/// protocol.
pub(crate) fn answer<T>(
    msg: Message,
    expected: &'static str,
    take: impl FnOnce(Message) -> Option<T>,
) -> Result<T, LinkError> {
    match msg {
        Message::Reject { reason } => Err(LinkError::Rejected(reason)),
        other => {
            let got = other.kind();
            take(other).ok_or(LinkError::Protocol(Violation::Unexpected { expected, got }))
        }
    }
}

/// The dialer's checks of the acceptor's hello, in order: the magic and
/// version, that the node at `dialed` says it is that node (`named`: as
/// the caller resolved it), and that both sides have a secret or neither.
pub(crate) fn judge_acceptor(
    theirs: &Hello,
    dialed: &str,
    named: bool,
    have_secret: bool,
    me: &str,
) -> Result<(), LinkError> {
    check_hello(theirs)?;
    if !named {
        return Err(Violation::WrongNode {
            dialed: dialed.to_string(),
            said: theirs.node.clone(),
        }
        .into());
    }
    check_secrets(have_secret, theirs, me, dialed)?;
    Ok(())
}

/// Both hellos, and who this side is in the handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hellos<'a> {
    pub role: Role,
    pub ours: &'a Hello,
    pub theirs: &'a Hello,
}

impl<'a> Hellos<'a> {
    fn transcript(&self) -> auth::Transcript<'a> {
        match self.role {
            Role::Dialer => auth::Transcript {
                dialer: self.ours,
                acceptor: self.theirs,
            },
            Role::Acceptor => auth::Transcript {
                dialer: self.theirs,
                acceptor: self.ours,
            },
        }
    }

    fn other(&self) -> Role {
        match self.role {
            Role::Dialer => Role::Acceptor,
            Role::Acceptor => Role::Dialer,
        }
    }

    /// The proof of the secret this side sends.
    pub(crate) fn proof(&self, secret: &Secret) -> [u8; MAC_LEN] {
        auth::prove(secret, self.role, &self.transcript())
    }

    /// Checks the other side's proof of the secret.
    pub(crate) fn check_proof(
        &self,
        secret: &Secret,
        mac: &[u8; MAC_LEN],
        them: &str,
    ) -> Result<(), HandshakeError> {
        if auth::verify(secret, self.other(), &self.transcript(), mac) {
            Ok(())
        } else {
            Err(HandshakeError::WrongSecret {
                them: them.to_string(),
            })
        }
    }
}

/// The frame tags of a connection under a shared secret (section 7.6 of
/// the protocol), from both hellos' nonces: what this side sends, and what
/// it receives.
pub(crate) fn session(
    secret: &Secret,
    ours: &Hello,
    theirs: &Hello,
    role: Role,
) -> (Sealer, Opener) {
    let (dialer, acceptor) = match role {
        Role::Dialer => (ours, theirs),
        Role::Acceptor => (theirs, ours),
    };
    crate::wire::session(
        secret.bytes(),
        &dialer.nonce,
        &acceptor.nonce,
        role == Role::Dialer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: &str, auth: bool) -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node: node.into(),
            incarnation: 7,
            nonce: [node.len() as u8; 32],
            last_applied: None,
            auth,
        }
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).expect("secret")
    }

    #[test]
    fn an_answer_is_the_awaited_frame_or_a_refusal() {
        let hello_of = |m: Message| match m {
            Message::Hello(h) => Some(h),
            _ => None,
        };
        let h = hello("b:2", false);
        assert_eq!(
            answer(Message::Hello(h.clone()), "Hello", hello_of).ok(),
            Some(h)
        );
        assert!(matches!(
            answer(Message::Reject { reason: "no".into() }, "Hello", hello_of),
            Err(LinkError::Rejected(r)) if r == "no"
        ));
        assert!(matches!(
            answer(Message::Ping, "Hello", hello_of),
            Err(LinkError::Protocol(Violation::Unexpected {
                expected: "Hello",
                got: "Ping"
            }))
        ));
    }

    #[test]
    fn the_dialer_checks_version_then_name_then_secrets() {
        let mut old = hello("b:2", true);
        old.version = 1;
        // The version first, whatever else is wrong.
        assert!(matches!(
            judge_acceptor(&old, "b:2", false, false, "a:1"),
            Err(LinkError::Handshake(HandshakeError::Version(1)))
        ));
        // Another node at the dialed address.
        assert!(matches!(
            judge_acceptor(&hello("c:3", true), "b:2", false, false, "a:1"),
            Err(LinkError::Protocol(Violation::WrongNode { dialed, said })) if dialed == "b:2" && said == "c:3"
        ));
        // The node, with a secret where this side has none.
        assert!(matches!(
            judge_acceptor(&hello("b:2", true), "b:2", true, false, "a:1"),
            Err(LinkError::Handshake(
                HandshakeError::SecretMissingHere { .. }
            ))
        ));
        assert!(judge_acceptor(&hello("b:2", true), "b:2", true, true, "a:1").is_ok());
    }

    #[test]
    fn magic_then_version() {
        let mut h = hello("a:1", false);
        h.version = 0;
        assert_eq!(check_hello(&h), Err(HandshakeError::Version(0)));
        // Version 1 cannot carry positions bound to content or tagged
        // frames: stepping down to it would undo them.
        h.version = 1;
        assert_eq!(
            check_hello(&h).map_err(|e| e.to_string()),
            Err("unsupported protocol version 1 (this node speaks 2)".to_string())
        );
        h.magic = *b"HTTP";
        assert_eq!(check_hello(&h), Err(HandshakeError::BadMagic));
        h = hello("a:1", false);
        h.version = 9;
        assert_eq!(check_hello(&h), Ok(()), "a newer peer steps down");
    }

    #[test]
    fn both_sides_prove_and_check_each_other() {
        let s = secret("0123456789abcdef0123");
        let (d, a) = (hello("d:1", true), hello("acc:2", true));
        let dialer = Hellos {
            role: Role::Dialer,
            ours: &d,
            theirs: &a,
        };
        let acceptor = Hellos {
            role: Role::Acceptor,
            ours: &a,
            theirs: &d,
        };
        let (dm, am) = (dialer.proof(&s), acceptor.proof(&s));
        assert_eq!(acceptor.check_proof(&s, &dm, "d:1"), Ok(()));
        assert_eq!(dialer.check_proof(&s, &am, "acc:2"), Ok(()));
        // A proof reflected back is not the other role's.
        assert!(acceptor.check_proof(&s, &am, "d:1").is_err());
        let other = secret("another secret of 20b");
        assert_eq!(
            acceptor.check_proof(&other, &dm, "d:1"),
            Err(HandshakeError::WrongSecret { them: "d:1".into() })
        );
    }

    #[test]
    fn a_secret_on_one_side_only_is_named_from_either_side() {
        let (d, a) = (hello("d:1", false), hello("acc:2", true));
        assert_eq!(
            check_secrets(true, &d, "acc:2", "d:1"),
            Err(HandshakeError::SecretMissingThere {
                me: "acc:2".into(),
                them: "d:1".into()
            })
        );
        let e = check_secrets(false, &a, "d:1", "acc:2").expect_err("refused");
        assert_eq!(
            e.to_string(),
            "acc:2 has a shared secret (cachecast.secret) and d:1 has none"
        );
        assert_eq!(check_secrets(true, &a, "d:1", "acc:2"), Ok(()));
    }
}
