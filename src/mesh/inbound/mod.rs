//! The receiving side: the task that accepts a peer's connection, checks
//! its handshake and reads its stream ([`conn`]), the rules of a session
//! ([`session`]), and the synchronous record of what was applied from each
//! origin ([`origin`]).

pub(crate) mod conn;
pub(crate) mod origin;
pub(crate) mod session;

pub(crate) use conn::{Incoming, accept_loop, hello_for, identity_matches, parse_identity};
pub(crate) use origin::{DuplicateIdentity, OriginRecord};
