//! Where the sidecar keeps its state file when `cachecast.state.file` is
//! unset: crash safety is the default, and several sidecars on one machine
//! each get a file of their own without configuring one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::NodeAddr;

/// The folder the Debian package makes (owned by the `cachecast` user).
pub const PACKAGE_STATE_DIR: &str = "/var/lib/cachecast";

/// The default state file of `node` and why that folder: the first of
/// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), the package's
/// `/var/lib/cachecast` when it exists and this user may write there,
/// `$XDG_STATE_HOME/cachecast`, `$HOME/.local/state/cachecast`. The file
/// is named after the node's identity, so sidecars sharing a folder never
/// share a file. `env` reads the environment (a parameter, so that tests
/// need not change the process's own).
pub fn default_state_file(
    node: &NodeAddr,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<(PathBuf, &'static str), String> {
    let absolute = |v: OsString| {
        let p = PathBuf::from(v);
        p.is_absolute().then_some(p)
    };
    let (dir, why) = if let Some(dir) = env("STATE_DIRECTORY").and_then(|v| {
        // systemd joins several folders with ':'; the first is ours.
        let first = v.to_string_lossy().split(':').next().map(OsString::from)?;
        absolute(first)
    }) {
        (dir, "$STATE_DIRECTORY")
    } else if writable_dir(Path::new(PACKAGE_STATE_DIR)) {
        (
            PathBuf::from(PACKAGE_STATE_DIR),
            "the package's state folder",
        )
    } else if let Some(dir) = env("XDG_STATE_HOME").and_then(absolute) {
        (dir.join("cachecast"), "$XDG_STATE_HOME")
    } else if let Some(home) = env("HOME").and_then(absolute) {
        (home.join(".local/state/cachecast"), "$HOME")
    } else {
        return Err(format!(
            "no folder for the state file: none of $STATE_DIRECTORY, a writable {PACKAGE_STATE_DIR}, \
             $XDG_STATE_HOME or $HOME is set; set cachecast.state.file to a path \
             (or to none, accepting that a crash can lose invalidations silently)"
        ));
    };
    Ok((dir.join(file_name(node)), why))
}

/// `host_port.state`, with anything but letters, digits, `.` and `-`
/// replaced, so that an IPv6 address makes a plain file name.
fn file_name(node: &NodeAddr) -> String {
    let host: String = node
        .host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{host}_{}.state", node.port)
}

/// Whether `dir` is a folder this process can create files in (tried, since
/// ownership and ACLs decide, not the mode bits alone).
fn writable_dir(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    let probe = dir.join(format!(".cachecast-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(_) => false,
    }
}

/// Makes the folder of a default state file (only the owner may enter: the
/// file says how this node's runs ended).
pub fn make_state_dir(path: &Path) -> std::io::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn systemd_first_then_the_users_folders() {
        let node = NodeAddr::new("App1.example.org", 4001);
        let (p, why) = default_state_file(
            &node,
            env(&[("STATE_DIRECTORY", "/s/a:/s/b"), ("HOME", "/h")]),
        )
        .expect("path");
        assert_eq!(p, Path::new("/s/a/app1.example.org_4001.state"));
        assert_eq!(why, "$STATE_DIRECTORY");
        if !writable_dir(Path::new(PACKAGE_STATE_DIR)) {
            let (p, _) =
                default_state_file(&node, env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")]))
                    .expect("path");
            assert_eq!(p, Path::new("/x/cachecast/app1.example.org_4001.state"));
            let (p, _) = default_state_file(&node, env(&[("HOME", "/h")])).expect("path");
            assert_eq!(
                p,
                Path::new("/h/.local/state/cachecast/app1.example.org_4001.state")
            );
            // Relative values are not folders to trust.
            let e = default_state_file(&node, env(&[("HOME", "h")])).expect_err("none");
            assert!(e.contains("cachecast.state.file"), "{e}");
        }
    }

    #[test]
    fn two_nodes_on_one_machine_get_two_files() {
        let e = env(&[("STATE_DIRECTORY", "/s")]);
        let a = default_state_file(&NodeAddr::new("::1", 4001), &e)
            .expect("a")
            .0;
        let b = default_state_file(&NodeAddr::new("::1", 4011), &e)
            .expect("b")
            .0;
        assert_ne!(a, b);
        assert_eq!(a, Path::new("/s/__1_4001.state"));
    }
}
