//! `cachecast check`: the built binary on sample `dhis.conf` files.
//!
//! The samples in `tests/data/` are copies of the shared ones in
//! `../shared/conf/` (compared when that directory is there); those in
//! `examples/conf/` add our loopback and state-file settings,
//! so the tests do not depend on anything outside the repository. Every
//! address in them is an IP literal: `check` looks nothing up and never
//! connects.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `cachecast check` with these arguments, `DHIS2_HOME` as given.
fn check_with(
    args: &[&std::ffi::OsStr],
    dhis2_home: Option<&Path>,
) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachecast"));
    cmd.arg("check").args(args).env_remove("DHIS2_HOME");
    if let Some(home) = dhis2_home {
        cmd.env("DHIS2_HOME", home);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run cachecast");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn check(path: &Path) -> (Option<i32>, String, String) {
    check_with(&["--config".as_ref(), path.as_os_str()], None)
}

/// This node and the peers, as `check` printed them.
fn cluster(stdout: &str) -> (String, Vec<String>) {
    let node = stdout
        .lines()
        .find_map(|l| l.strip_prefix("this node"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    let count: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peers"))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(usize::MAX);
    // The lines right after `peers N`, indented.
    let peers: Vec<String> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("peers"))
        .skip(1)
        .map_while(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert_eq!(count, peers.len(), "stdout:\n{stdout}");
    (node, peers)
}

#[test]
fn server_a() {
    let (code, out, err) = check(&repo("tests/data/server-a.conf"));
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        cluster(&out),
        (
            "193.157.199.131:4001".into(),
            vec!["193.157.199.132:4001".into()]
        )
    );
    assert!(out.contains("(cluster.instance1, line 17)"), "{out}");
    assert!(out.contains("listens on 0.0.0.0:4001"), "{out}");
    assert_eq!(out.lines().last(), Some("valid"), "{out}");
    // A clean file prints no problem but the one of every file without an
    // API token (see docs/security.md).
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warning: cachecast.api.token.file: not set"),
        "{err}"
    );
}

#[test]
fn server_b_ports_default_to_4001() {
    let (code, out, err) = check(&repo("tests/data/server-b.conf"));
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        cluster(&out),
        (
            "193.157.199.132:4001".into(),
            vec!["193.157.199.131:4001".into()]
        )
    );
    assert_eq!(out.lines().last(), Some("valid"), "{out}");
}

#[test]
fn too_many_instances() {
    let (code, out, err) = check(&repo("tests/data/too-many.conf"));
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("line 7: cluster.instance5.hostname: at most 5 instances"),
        "{err}"
    );
    assert!(err.contains("invalid"), "{err}");
}

#[test]
fn three_node_example_on_one_machine() {
    let (code, out, err) = check(&repo("examples/conf/node1.conf"));
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        cluster(&out),
        (
            "127.0.0.1:14001".into(),
            vec!["127.0.0.1:14002".into(), "127.0.0.1:14003".into()]
        )
    );
    assert!(out.contains("api        http://127.0.0.1:14101"), "{out}");
    for n in [2, 3] {
        let (code, out, err) = check(&repo(&format!("examples/conf/node{n}.conf")));
        assert_eq!(code, Some(0), "node{n}: stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(cluster(&out).0, format!("127.0.0.1:1400{n}"));
    }
}

#[test]
fn three_errors_are_all_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dhis.conf");
    std::fs::write(
        &path,
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = http://10.0.0.2\n\
         cluster.instance2.cache.port = 4003\ncachecast.buffer = lots\n",
    )
    .expect("write");
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    for expected in [
        "error: line 2: cluster.instance1.hostname: ",
        "error: line 3: cluster.instance2.cache.port: ",
        "error: line 4: cachecast.buffer: ",
        "3 error(s)",
    ] {
        assert!(err.contains(expected), "{expected:?} not in:\n{err}");
    }
}

/// Runs `cachecast check --config PATH` with these environment variables
/// set and those removed, in the child only: the test process's own
/// environment is never changed (tests run in parallel).
fn check_env(path: &Path, set: &[(&str, &str)], unset: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachecast"));
    cmd.arg("check")
        .arg("--config")
        .arg(path)
        .env_remove("DHIS2_HOME");
    for name in unset {
        cmd.env_remove(name);
    }
    cmd.envs(set.iter().copied());
    let out = cmd.output().expect("run cachecast");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn conf(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dhis.conf");
    std::fs::write(&path, text).expect("write");
    (dir, path)
}

/// DHIS 2 replaces `${VAR}` in every value; `check` shows each value that
/// came from the environment, secrets masked.
#[test]
fn values_from_the_environment_are_shown_secrets_masked() {
    let (_dir, path) = conf(
        "cluster.instance0.hostname = 127.0.0.1\ncluster.instance0.cache.port = ${CC_TEST_PORT}\n\
         cluster.instance1.hostname = ${CC_TEST_PEER}\nredis.cache.invalidation.enabled = on\n\
         redis.port = 16379\nredis.password = ${CC_TEST_PW}\ncachecast.api.port = 14999\n",
    );
    let (code, out, err) = check_env(
        &path,
        &[
            ("CC_TEST_PORT", "14001"),
            ("CC_TEST_PEER", "127.0.0.2"),
            ("CC_TEST_PW", "pw-from-the-environment"),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        cluster(&out),
        ("127.0.0.1:14001".into(), vec!["127.0.0.2:4001".into()])
    );
    for line in [
        "environment cluster.instance0.cache.port = 14001 (line 2, from ${CC_TEST_PORT})",
        "environment cluster.instance1.hostname = 127.0.0.2 (line 3, from ${CC_TEST_PEER})",
        "environment redis.password = ******** (line 6, from ${CC_TEST_PW})",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
    }
    assert!(out.contains("password from redis.password"), "{out}");
    assert!(
        !out.contains("pw-from-the-environment") && !err.contains("pw-from-the-environment"),
        "the password is printed:\n{out}\n{err}"
    );
}

/// A variable DHIS 2 would leave as written is an error naming the key,
/// the line and the variable.
#[test]
fn a_variable_not_set_is_an_error() {
    let (_dir, path) = conf(
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = ${CC_TEST_UNSET}\n",
    );
    let (code, out, err) = check_env(&path, &[], &["CC_TEST_UNSET"]);
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains(
            "error: line 2: cluster.instance1.hostname: the environment variable CC_TEST_UNSET is not set"
        ),
        "{err}"
    );
}

/// DHIS 2 2.38 to 2.40 run Ehcache RMI replication on the
/// `cluster.hostname`/`cluster.members` form, on the port the sidecar
/// takes: `check` warns, and prints the same cluster as the
/// `cluster.instanceN` keys that DHIS 2 ignores.
#[test]
fn the_members_form_is_warned_about_with_the_keys_to_write() {
    let (_dir, path) = conf(
        "cluster.hostname = 10.0.0.1\ncluster.cache.port = 4005\n\
         cluster.members = 10.0.0.2:4005, 10.0.0.3\n",
    );
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains(
            "warning: line 1: cluster.hostname: with cluster.members, DHIS 2 2.38 to 2.40 starts Ehcache RMI replication listening on port 4005"
        ),
        "{err}"
    );
    assert!(err.contains("as cluster.instanceN keys"), "{err}");
    let keys: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("as instanceN keys"))
        .skip(1)
        .map_while(|l| l.strip_prefix("    "))
        .collect();
    assert_eq!(
        keys,
        [
            "cluster.instance0.hostname = 10.0.0.1",
            "cluster.instance0.cache.port = 4005",
            "cluster.instance1.hostname = 10.0.0.2",
            "cluster.instance1.cache.port = 4005",
            "cluster.instance2.hostname = 10.0.0.3",
            "cluster.instance2.cache.port = 4001",
        ],
        "{out}"
    );
    // Those keys, as printed, give the same cluster without the warning.
    let (_dir2, path2) = conf(&(keys.join("\n") + "\n"));
    let (code2, out2, err2) = check(&path2);
    assert_eq!(code2, Some(0), "stdout:\n{out2}\nstderr:\n{err2}");
    assert_eq!(cluster(&out2), cluster(&out));
    assert!(!err2.contains("RMI"), "{err2}");
}

#[test]
fn no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.conf");
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("no such file"), "{err}");
    assert!(err.contains("--config"), "{err}");
    assert_eq!(out, "");
}

#[test]
fn dhis2_home_is_used_and_config_wins() {
    let home = tempfile::tempdir().expect("tempdir");
    // DHIS2_HOME without a dhis.conf: the message names the path tried.
    let (code, _, err) = check_with(&[], Some(home.path()));
    assert_eq!(code, Some(2), "{err}");
    let tried = home.path().join("dhis.conf");
    assert!(err.contains(&tried.display().to_string()), "{err}");
    assert!(err.contains("DHIS2_HOME"), "{err}");

    std::fs::copy(repo("tests/data/server-b.conf"), &tried).expect("copy");
    let (code, out, err) = check_with(&[], Some(home.path()));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(cluster(&out).0, "193.157.199.132:4001");

    let a = repo("tests/data/server-a.conf");
    let (code, out, err) = check_with(&["--config".as_ref(), a.as_os_str()], Some(home.path()));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(cluster(&out).0, "193.157.199.131:4001");
}

#[test]
fn a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, err) = check(dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn copies_match_the_shared_samples() {
    let shared = repo("../shared/conf");
    if !shared.is_dir() {
        eprintln!("{} is absent: nothing to compare", shared.display());
        return;
    }
    for (copy, original) in [
        ("tests/data/server-a.conf", "server-a.conf"),
        ("tests/data/server-b.conf", "server-b.conf"),
        ("tests/data/too-many.conf", "too-many.conf"),
    ] {
        let original = shared.join(original);
        if let Ok(want) = std::fs::read(&original) {
            let got = std::fs::read(repo(copy)).expect(copy);
            assert!(got == want, "{copy} differs from {}", original.display());
        }
    }
}

#[test]
fn a_state_file_that_is_a_folder_is_an_error_as_run_would_find() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let path = dir.path().join("dhis.conf");
    std::fs::write(
        &path,
        format!(
            "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = 127.0.0.2\n\
             cachecast.state.file = {}\n",
            state.display()
        ),
    )
    .expect("write");
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("cachecast.state.file") && err.contains("is a folder"),
        "{err}"
    );
}

/// A node keeps a state file unless the file says `none`: `check` names the
/// default path (per node, under systemd's `$STATE_DIRECTORY`) and warns
/// about the opt-out.
#[test]
fn the_state_file_is_kept_by_default_and_none_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dhis.conf");
    let base = "cluster.instance0.hostname = 127.0.0.1\ncluster.instance0.cache.port = 4011\n\
                cluster.instance1.hostname = 127.0.0.2\n";
    std::fs::write(&path, base).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(["check", "--config"])
        .arg(&path)
        .env("STATE_DIRECTORY", dir.path())
        .output()
        .expect("run cachecast");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let want = format!(
        "state      {} (the default, from $STATE_DIRECTORY",
        dir.path().join("127.0.0.1_4011.state").display()
    );
    assert!(stdout.contains(&want), "{stdout}");

    std::fs::write(&path, format!("{base}cachecast.state.file = None\n")).expect("write");
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "a choice, not an error: {out}{err}");
    assert!(
        out.contains("state      none (cachecast.state.file = none"),
        "{out}"
    );
    assert!(
        err.contains("cachecast.state.file") && err.contains("lost silently"),
        "{err}"
    );
}

#[test]
fn check_into_a_closed_pipe_ends_quietly() {
    let (code, stderr) = common::procs::into_closed_pipe(
        Command::new(env!("CARGO_BIN_EXE_cachecast"))
            .arg("check")
            .arg("--config")
            .arg(repo("examples/conf/node1.conf")),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The unit docs/operations.md shows is the one the package installs.
#[test]
fn the_documented_unit_is_the_packaged_one() {
    let doc = std::fs::read_to_string(repo("docs/operations.md")).expect("operations.md");
    let section = &doc[doc.find("\n## systemd\n").expect("a systemd section")..];
    let start = section.find("```ini\n").expect("an ini block") + "```ini\n".len();
    let block = &section[start..];
    let block = &block[..block.find("```").expect("the block ends")];
    let unit = std::fs::read_to_string(repo("debian/cachecast.service")).expect("unit file");
    assert_eq!(
        block, unit,
        "docs/operations.md's unit differs from debian/cachecast.service"
    );
    // The lines the package and its docs rely on.
    for line in [
        "ExecStartPre=/usr/bin/cachecast check\n",
        "ExecStart=/usr/bin/cachecast run\n",
        "User=cachecast\n",
        "EnvironmentFile=-/etc/default/cachecast\n",
        "StateDirectory=cachecast\n",
        "NoNewPrivileges=yes\n",
        "ProtectSystem=strict\n",
        "LimitNOFILE=4096\n",
        "RestartPreventExitStatus=2\n",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
}

fn cachecast(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cachecast"))
        .args(args)
        .output()
        .expect("run cachecast");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = cachecast(&["completions".as_ref(), shell.as_ref()]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        for word in ["run", "check", "status", "demo", "config", "log-format"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
        // Hidden from users, so from completion too.
        assert!(
            !out.contains("manpages"),
            "{shell} completion offers manpages"
        );
    }
    let (code, _, err) = cachecast(&["completions".as_ref(), "tcsh".as_ref()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
}

#[test]
fn manual_pages_one_per_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("man");
    let (code, _, err) = cachecast(&["manpages".as_ref(), out_dir.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    let main = std::fs::read_to_string(out_dir.join("cachecast.1")).expect("cachecast.1");
    for section in [
        ".SH SYNOPSIS",
        ".SH SUBCOMMANDS",
        ".SH ENVIRONMENT",
        ".SH FILES",
    ] {
        assert!(main.contains(section), "cachecast.1 lacks {section}");
    }
    assert!(main.contains("/etc/default/cachecast"));
    for sub in ["run", "check", "status", "demo", "completions"] {
        let page = std::fs::read_to_string(out_dir.join(format!("cachecast-{sub}.1")))
            .unwrap_or_else(|e| panic!("cachecast-{sub}.1: {e}"));
        assert!(page.contains(".SH NAME"), "cachecast-{sub}.1");
    }
    assert!(!out_dir.join("cachecast-manpages.1").exists());
    // A path that cannot be a folder: an error that names it.
    let file = dir.path().join("file");
    std::fs::write(&file, "").expect("write");
    let (code, _, err) = cachecast(&["manpages".as_ref(), file.as_os_str()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot write the manual pages into"), "{err}");
}

/// Without `redis.password`, any local process may publish and fire the
/// flush hook through the Redis-protocol endpoint: `check` says so, and
/// says nothing once a password is set.
#[test]
fn an_endpoint_without_a_password_is_a_warning() {
    let base = "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = 127.0.0.2\n\
                redis.cache.invalidation.enabled = on\nredis.port = 16379\ncachecast.api.port = 14999\n";
    let (_dir, path) = conf(base);
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let text = format!("{out}{err}");
    assert!(
        err.contains("warning: redis.password: the Redis-protocol endpoint has no password"),
        "{text}"
    );
    // What a local process can then do, and what bounds the hook calls.
    for what in [
        "publish invalidations to every server",
        "read every invalidation",
        "a burst of 5 calls, then one per 10 s",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert!(out.contains("no password"), "{out}");
    let (_dir, path) = conf(&format!("{base}redis.password = s3cret\n"));
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        !format!("{out}{err}").contains("has no password"),
        "{out}{err}"
    );
}

/// `check` says whether the API's mutating calls need a token, and warns
/// when they do not: any local process could then make every server clear
/// its caches.
#[test]
fn check_shows_the_api_token_and_warns_without_one() {
    use std::os::unix::fs::PermissionsExt;
    let base = "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = 127.0.0.2\n\
                cachecast.api.port = 14999\n";
    let (dir, path) = conf(base);
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("api token  none"), "{out}");
    assert!(
        err.contains("cachecast.api.token.file")
            && err.contains(
                "any local process can make every server of the cluster clear its caches"
            ),
        "{err}"
    );
    let token = dir.path().join("api.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("write");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (_dir, path) = conf(&format!(
        "{base}cachecast.api.token.file = {}\n",
        token.display()
    ));
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("api token  from {}", token.display())),
        "{out}"
    );
    assert!(!err.contains("cachecast.api.token.file"), "{err}");
    std::fs::write(&token, "short\n").expect("write");
    let (code, _, err) = check(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at least 16"), "{err}");
}

/// docs/security.md says what a local process can do with each setting
/// missing: it quotes the warnings `check` gives, and the hook's rate as
/// the sidecar applies it.
#[test]
fn the_security_doc_says_what_a_local_process_can_do() {
    let doc = std::fs::read_to_string(repo("docs/security.md")).expect("security.md");
    let section = doc
        .split("\n## What a local process can and cannot do\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the section");
    let (_dir, path) = conf(
        "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = 127.0.0.2\n\
         redis.cache.invalidation.enabled = on\nredis.port = 16379\ncachecast.api.port = 14999\n",
    );
    let (code, out, err) = check(&path);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    for key in ["cachecast.api.token.file", "redis.password"] {
        let warning = err
            .lines()
            .find_map(|l| l.strip_prefix(&format!("warning: {key}: ")))
            .unwrap_or_else(|| panic!("no warning for {key}: {err}"));
        // The doc quotes each up to its first colon.
        let quoted = format!("{key}: {}", warning.split(':').next().unwrap_or(warning));
        let flat = section.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains(&quoted),
            "security.md does not quote `{quoted}`"
        );
    }
    let rate = format!(
        "a burst of {} calls, then one per {} seconds",
        cachecast::sidecar::SUBSCRIBER_BURST,
        cachecast::sidecar::SUBSCRIBER_REFILL.as_secs()
    );
    let flat = section.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains(&rate), "security.md does not say `{rate}`");
    for what in [
        "cachecast_api_unauthorized_total",
        "cachecast_flush_hook_rate_limited_total",
        "/v1/events",
        "SUBSCRIBE",
    ] {
        assert!(section.contains(what), "security.md does not name {what}");
    }
}
