//! The API token (`cachecast.api.token.file`): what a local process must
//! show to make the API change anything. Without it, any process of the
//! machine that reaches the API can make every server of the cluster clear
//! its caches.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest token accepted, in bytes: as for the shared secret, short
/// enough to guess is not a token.
pub const MIN_TOKEN: usize = 16;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It could not be read.
    #[error("cannot read the API token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Every user of the machine can read it.
    #[error(
        "the API token file {0} is readable by every user; run `chmod 600 {0}` (and chown it to the user cachecast runs as, with the application's user in its group)"
    )]
    WorldReadable(String),
    /// It holds something a client cannot send in a header.
    #[error(
        "the API token file {0} must hold the token on one line, printable ASCII without spaces (e.g. `openssl rand -hex 32`)"
    )]
    Malformed(String),
    /// Too short to resist guessing.
    #[error(
        "the API token in {path} is {len} bytes long; at least {MIN_TOKEN} are required (e.g. `openssl rand -hex 32`)"
    )]
    TooShort {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// The token; only its digest is kept, so that a comparison takes the
/// same time whatever the length or content of a guess.
#[derive(Clone)]
pub struct ApiToken([u8; 32]);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl ApiToken {
    /// Reads the token from a file that only its owner and group may read
    /// (the rules of the secret file); white space around it is trimmed.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let shown = path.display().to_string();
        let bytes = crate::auth::read_private_as(
            path,
            |path, source| TokenError::Read { path, source },
            TokenError::WorldReadable,
        )?;
        let token = bytes.trim_ascii();
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Malformed(shown));
        }
        if token.len() < MIN_TOKEN {
            return Err(TokenError::TooShort {
                path: shown,
                len: token.len(),
            });
        }
        Ok(ApiToken(Sha256::digest(token).into()))
    }

    /// Whether an `Authorization` header's value bears the token
    /// (`Bearer <token>`, the scheme in any case). Constant time in the
    /// token: the digests are compared, never the texts.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let given = match value.split_at_checked(7) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
            _ => return false,
        };
        Sha256::digest(given).ct_eq(&self.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::test_file as file;

    #[test]
    fn the_token_file_follows_the_secret_file_rules() {
        let ok = file("0123456789abcdef0123\n", 0o640);
        let token = ApiToken::load(ok.path()).expect("valid");
        assert!(token.admits(Some(b"Bearer 0123456789abcdef0123")));
        assert!(token.admits(Some(b"bearer 0123456789abcdef0123")));
        for wrong in [
            &b"Bearer 0123456789abcdef012"[..],
            b"Bearer 0123456789abcdef01234",
            b"Basic 0123456789abcdef0123",
            b"0123456789abcdef0123",
            b"Bearer ",
            b"",
        ] {
            assert!(!token.admits(Some(wrong)), "{wrong:?}");
        }
        assert!(!token.admits(None));
        let open = file("0123456789abcdef0123", 0o644);
        assert!(matches!(
            ApiToken::load(open.path()),
            Err(TokenError::WorldReadable(_))
        ));
        let short = file("0123456789", 0o600);
        assert!(matches!(
            ApiToken::load(short.path()),
            Err(TokenError::TooShort { len: 10, .. })
        ));
        for bad in [
            "0123456789 abcdef0123",
            "0123456789abcdef\n0123",
            "é0123456789abcdef",
        ] {
            let f = file(bad, 0o600);
            assert!(
                matches!(ApiToken::load(f.path()), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ApiToken::load(Path::new("/nonexistent/token")),
            Err(TokenError::Read { .. })
        ));
    }
}
