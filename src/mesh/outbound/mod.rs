//! The sending side: the task per peer that dials it and writes this
//! node's invalidations ([`link`]), the rules of a session ([`session`])
//! and between sessions ([`redial`]), and the synchronous replay ring with each peer's cursor
//! ([`ring`]).

pub(crate) mod link;
pub(crate) mod redial;
pub(crate) mod ring;
pub(crate) mod session;

pub(crate) use ring::OutLog;
