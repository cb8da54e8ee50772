//! The optional state file: how this node's previous run ended.
//!
//! A run that invalidated something none of its peers ever received (it was
//! cut off, then crashed) leaves no trace at the peers; if the run before it
//! had said a clean goodbye, they would take the next start for a clean
//! restart and never flush. The file closes that gap: written "dirty" at
//! start and "clean" only when a graceful shutdown saw every peer
//! acknowledge everything, so a start after anything else begins with a
//! flush to every peer.

use std::io::Write;
use std::path::Path;

/// How the previous run ended, as the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Previous {
    pub incarnation: u64,
    pub clean: bool,
}

/// Reads the file: `Ok(None)` when there is none yet; a file that cannot be
/// understood counts as a run that did not end cleanly.
pub(crate) fn read(path: &Path) -> std::io::Result<Option<Previous>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut incarnation = None;
    let mut clean = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("incarnation", v)) => incarnation = u64::from_str_radix(v.trim(), 16).ok(),
            Some(("clean", v)) => clean = Some(v.trim() == "true"),
            _ => {}
        }
    }
    Ok(Some(Previous {
        incarnation: incarnation.unwrap_or(0),
        clean: incarnation.is_some() && clean == Some(true),
    }))
}

/// Writes the file atomically (a temporary file renamed over it), synced.
pub(crate) fn write(path: &Path, incarnation: u64, clean: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "# cachecast node state: how the last run ended")?;
        writeln!(f, "incarnation={incarnation:016x}")?;
        writeln!(f, "clean={clean}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_distrusts_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state");
        assert_eq!(read(&p).expect("read"), None);
        write(&p, 0xabc, false).expect("write");
        assert_eq!(
            read(&p).expect("read"),
            Some(Previous {
                incarnation: 0xabc,
                clean: false
            })
        );
        write(&p, 0xabc, true).expect("write");
        assert!(read(&p).expect("read").is_some_and(|p| p.clean));
        std::fs::write(&p, "clean=true\n").expect("write");
        assert!(
            read(&p).expect("read").is_some_and(|p| !p.clean),
            "no incarnation: not trusted"
        );
    }
}
