//! The optional state file: how this node's previous run ended.
//!
//! A run that invalidated something none of its peers ever received (it was
//! cut off, then crashed) leaves no trace at the peers; if the run before it
//! had said a clean goodbye, they would take the next start for a clean
//! restart and never flush. The file closes that gap: written "dirty" at
//! start and "clean" only when a graceful shutdown saw every peer
//! acknowledge everything, so a start after anything else begins with a
//! flush to every peer.

use std::ffi::OsString;
use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// The lock file beside the state file: `<state file>.lock`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the lock that makes the state file this run's own, held until the
/// returned file is dropped. Two runs sharing one state file (a copied
/// configuration on one machine) would overwrite each other's record and
/// could hide a crash from the peers, so the second one must not start.
/// (The state file itself is replaced on every write, so the lock lives in
/// a file of its own.)
pub(crate) fn lock(path: &Path) -> std::io::Result<File> {
    let lock_path = lock_path(path);
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(TryLockError::WouldBlock) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "in use by another running node ({} is locked); \
                 each node needs its own cachecast.state.file",
                lock_path.display()
            ),
        )),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// The temporary file a write goes through: `<state file>.tmp`, so that
/// two state files in one directory (`x.a`, `x.b`) never share one.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes the file atomically (a temporary file renamed over it), synced,
/// and the directory synced after the rename: without that, a power loss
/// can bring back the old file, and an old `clean = true` would skip the
/// flush the peers need. Blocking: call it off the async runtime.
pub(crate) fn write(path: &Path, incarnation: u64, clean: bool) -> std::io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "# cachecast node state: how the last run ended")?;
        writeln!(f, "incarnation={incarnation:016x}")?;
        writeln!(f, "clean={clean}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// [`write`] on a blocking thread, so that the fsyncs do not stall the
/// tasks sharing this runtime's threads.
pub(crate) async fn write_async(path: &Path, incarnation: u64, clean: bool) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write(&path, incarnation, clean))
        .await
        .map_err(std::io::Error::other)?
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

    /// Hazard: `x.a` and `x.b` used one temporary name (`x.tmp`), so two
    /// nodes writing at once could rename each other's record into place.
    #[test]
    fn two_state_files_in_one_directory_use_their_own_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("x.a"), dir.path().join("x.b"));
        assert_ne!(temp_path(&a), temp_path(&b));
        write(&a, 1, true).expect("write a");
        write(&b, 2, false).expect("write b");
        assert_eq!(read(&a).expect("read").map(|p| p.incarnation), Some(1));
        assert_eq!(read(&b).expect("read").map(|p| p.incarnation), Some(2));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "no temporary file left: {left:?}");
    }

    #[test]
    fn one_run_at_a_time_per_state_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state");
        let held = lock(&p).expect("first");
        let e = lock(&p).expect_err("second");
        assert!(
            e.to_string().contains("in use by another running node"),
            "{e}"
        );
        drop(held);
        lock(&p).expect("free again");
    }
}
