//! `dhis.conf` read as DHIS 2 reads it (DESIGN.md section 6a), rule by
//! rule against DHIS 2's documented behaviour:
//! - `${VAR}` in every value is replaced from the environment, then the
//!   value is trimmed (`DefaultDhisConfigurationProvider`, Apache Commons
//!   Text's `StringSubstitutor` over `System.getenv()`); what DHIS 2 leaves
//!   as written (a variable not set, a `${` with no `}`) is an error here;
//! - on/off keys are on for `on` or `true` in any case, anything else off
//!   (`DhisConfigurationProvider.isOn`);
//! - an absent key has DHIS 2's default (`ConfigurationKey`: `redis.host`
//!   `localhost`, `redis.port` 6379, `redis.password` empty, `redis.use.ssl`
//!   off), an empty one is the empty text;
//! - `cluster.hostname` with `cluster.members` starts RMI replication on
//!   DHIS 2 2.38 to 2.40, on the sidecar's port.
//!
//! The environment is a map handed to the parser: no test here changes
//! the process environment (tests run in parallel).

use std::ffi::OsString;

use cachecast::config::{self, ConfigError, Loaded, Problem, SecretSource, Severity};

const BASE: &str = "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n";
const ON: &str = "redis.cache.invalidation.enabled = on\n";

/// What a case must give.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Valid; this node and these peers.
    Nodes(&'static str, &'static [&'static str]),
    /// Valid; the Redis-protocol endpoint on these addresses ("" for
    /// off), with this password, and `check`'s reason containing the text.
    Resp(&'static str, Option<&'static str>, &'static str),
    /// Valid; this inline `cachecast.secret`.
    Secret(&'static str),
    /// Valid, with a warning naming this key on this line, containing
    /// the text.
    Warns(&'static str, usize, &'static str),
    /// Valid, and no warning at all about this key.
    Quiet(&'static str),
    /// Valid, and no warning contains this text.
    Lacks(&'static str),
    /// Invalid, with an error naming this key on this line, containing
    /// the text.
    Fails(&'static str, usize, &'static str),
}

use Want::*;

/// (rule, text, environment, what it must give)
type Case = (
    &'static str,
    String,
    &'static [(&'static str, &'static str)],
    Want,
);

fn parse(text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let lookup = |name: &str| -> Option<OsString> {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| OsString::from(v))
    };
    config::parse_str_with_env(text, &lookup)
}

fn names(p: &Problem, severity: Severity, key: &str, line: usize, text: &str) -> bool {
    p.severity == severity
        && p.key.as_deref() == Some(key)
        && p.line == Some(line)
        && p.message.contains(text)
}

fn listed(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("\n      {p}")).collect()
}

fn verdict(text: &str, env: &[(&str, &str)], want: Want) -> Result<(), String> {
    let loaded = match (parse(text, env), want) {
        (Err(ConfigError::Invalid { errors, .. }), Fails(key, line, msg)) => {
            return if errors
                .iter()
                .any(|p| names(p, Severity::Error, key, line, msg))
            {
                Ok(())
            } else {
                Err(format!(
                    "want an error {key} line {line} containing {msg:?}, got:{}",
                    listed(&errors)
                ))
            };
        }
        (Ok(loaded), Fails(..)) => {
            return Err(format!(
                "want an error, got a valid config:{}",
                listed(&loaded.warnings)
            ));
        }
        (Ok(loaded), _) => loaded,
        (Err(e), _) => return Err(format!("want valid, got {e}")),
    };
    let c = &loaded.config;
    match want {
        Nodes(node, peers) => {
            let got: Vec<String> = c.peers.iter().map(|p| p.addr.to_string()).collect();
            if c.node.to_string() != node || got != peers {
                return Err(format!("got {} {got:?}", c.node));
            }
        }
        Resp(addrs, password, why) => {
            let got = c
                .resp
                .as_ref()
                .map(|r| {
                    r.addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let pw = c.resp.as_ref().and_then(|r| r.password.as_deref());
            if got != addrs || pw != password || !c.resp_why.contains(why) {
                return Err(format!("got {got:?} password {pw:?} why {:?}", c.resp_why));
            }
        }
        Secret(want) => {
            if c.secret != Some(SecretSource::Inline(want.to_string())) {
                return Err(format!("got secret {:?}", c.secret));
            }
        }
        Warns(key, line, msg) => {
            if !loaded
                .warnings
                .iter()
                .any(|p| names(p, Severity::Warning, key, line, msg))
            {
                return Err(format!(
                    "want a warning {key} line {line} containing {msg:?}, got:{}",
                    listed(&loaded.warnings)
                ));
            }
        }
        Quiet(key) => {
            if let Some(p) = loaded
                .warnings
                .iter()
                .find(|p| p.key.as_deref() == Some(key))
            {
                return Err(format!("want nothing about {key}, got: {p}"));
            }
        }
        Lacks(text) => {
            if let Some(p) = loaded.warnings.iter().find(|p| p.message.contains(text)) {
                return Err(format!("want nothing saying {text:?}, got: {p}"));
            }
        }
        Fails(..) => unreachable!("handled above"),
    }
    Ok(())
}

fn run(cases: &[Case]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(rule, text, env, want)| {
            verdict(text, env, *want)
                .err()
                .map(|e| format!("  {rule}: {e}\n    text: {text:?} env: {env:?}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn on(extra: &str) -> String {
    format!("{BASE}{ON}{extra}")
}

#[test]
fn environment_variables_in_every_value() {
    let pw: &[(&str, &str)] = &[("REDIS_PW", "s3cret")];
    run(&[
        (
            "a cluster host",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = ${PEER_HOST}\n"
                .into(),
            &[("PEER_HOST", "10.0.0.2")],
            Nodes("10.0.0.1:4001", &["10.0.0.2:4001"]),
        ),
        (
            "a port",
            format!("{BASE}cluster.instance0.cache.port = ${{MESH_PORT}}\n"),
            &[("MESH_PORT", "4010")],
            Nodes("10.0.0.1:4010", &["10.0.0.2:4001"]),
        ),
        (
            "part of a value, and the members list",
            "cluster.hostname = 10.0.0.${N}\ncluster.members = ${MEMBERS}\n".into(),
            &[("N", "1"), ("MEMBERS", "10.0.0.2:4002, 10.0.0.3")],
            Nodes("10.0.0.1:4001", &["10.0.0.2:4002", "10.0.0.3:4001"]),
        ),
        (
            "trimmed after substitution",
            "cluster.instance0.hostname = ${PADDED}\ncluster.instance1.hostname = 10.0.0.2\n"
                .into(),
            &[("PADDED", " \t10.0.0.1  ")],
            Nodes("10.0.0.1:4001", &["10.0.0.2:4001"]),
        ),
        (
            "a default after `:-`",
            format!("{BASE}cluster.instance2.hostname = ${{THIRD:-10.0.0.3}}\n"),
            &[],
            Nodes("10.0.0.1:4001", &["10.0.0.2:4001", "10.0.0.3:4001"]),
        ),
        (
            "redis.password",
            on("redis.password = ${REDIS_PW}\n"),
            pw,
            Resp("127.0.0.1:6379 [::1]:6379", Some("s3cret"), "on"),
        ),
        (
            "`$${` is the text itself, as DHIS 2 reads it",
            on("redis.password = $${REDIS_PW}\n"),
            pw,
            Resp("127.0.0.1:6379 [::1]:6379", Some("${REDIS_PW}"), "on"),
        ),
        (
            "redis.host and redis.port",
            format!("{BASE}{ON}redis.host = ${{REDIS_HOST}}\nredis.port = ${{REDIS_PORT}}\n"),
            &[("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", "6380")],
            Resp("127.0.0.1:6380", None, "on"),
        ),
        (
            "an on/off key",
            format!("{BASE}redis.cache.invalidation.enabled = ${{INVALIDATION}}\n"),
            &[("INVALIDATION", "On")],
            Resp("127.0.0.1:6379 [::1]:6379", None, "on"),
        ),
        (
            "cachecast.secret",
            format!("{BASE}cachecast.secret = ${{MESH_SECRET}}\n"),
            &[("MESH_SECRET", "0123456789abcdef0123")],
            Secret("0123456789abcdef0123"),
        ),
        (
            "a variable in a value, another's value",
            format!("{BASE}cachecast.secret = ${{OUTER}}\n"),
            &[("OUTER", "${INNER}x"), ("INNER", "0123456789abcdef")],
            Secret("0123456789abcdefx"),
        ),
    ]);
}

#[test]
fn what_dhis2_leaves_as_written_is_an_error() {
    run(&[
        (
            "a variable not set, in a cluster host",
            format!("{BASE}cluster.instance2.hostname = ${{PEER3}}\n"),
            &[],
            Fails(
                "cluster.instance2.hostname",
                3,
                "the environment variable PEER3 is not set",
            ),
        ),
        (
            "not set, in a port",
            format!("{BASE}cluster.instance1.cache.port = ${{PORT}}\n"),
            &[],
            Fails("cluster.instance1.cache.port", 3, "PORT is not set"),
        ),
        (
            "not set, in redis.password with the endpoint on",
            on("redis.password = ${REDIS_PW}\n"),
            &[],
            Fails("redis.password", 4, "REDIS_PW is not set"),
        ),
        (
            "not set, in redis.host with DHIS 2's invalidation on",
            on("redis.host = ${REDIS_HOST}\n"),
            &[],
            Fails("redis.host", 4, "REDIS_HOST is not set"),
        ),
        (
            "not set, in cachecast.secret",
            format!("{BASE}cachecast.secret = ${{MESH_SECRET}}\n"),
            &[],
            Fails("cachecast.secret", 3, "MESH_SECRET is not set"),
        ),
        (
            "a `${` with no `}`",
            on("redis.password = pre${REDIS_PW\n"),
            &[("REDIS_PW", "x")],
            Fails("redis.password", 4, "no closing `}`"),
        ),
        (
            "variables that refer to each other (DHIS 2 does not start)",
            format!("{BASE}cluster.instance2.hostname = ${{A}}\n"),
            &[("A", "${B}"), ("B", "${A}")],
            Fails("cluster.instance2.hostname", 3, "refer to each other"),
        ),
        (
            "set but empty is no error: an empty value",
            format!("{BASE}cluster.instance2.hostname = ${{EMPTY}}\n"),
            &[("EMPTY", "")],
            Warns("cluster.instance2.hostname", 3, "not set"),
        ),
        (
            "a redis.* key the sidecar does not use: a warning only",
            format!("{BASE}redis.enabled = on\nredis.password = ${{REDIS_PW}}\n"),
            &[],
            Warns(
                "redis.password",
                4,
                "REDIS_PW is not set: DHIS 2 would read `${REDIS_PW}` as written",
            ),
        ),
        (
            "a key of ours the sidecar ignores: nothing",
            format!("{BASE}cluster.instance1.cache.remote.object.port = ${{RMI}}\n"),
            &[],
            Nodes("10.0.0.1:4001", &["10.0.0.2:4001"]),
        ),
    ]);
}

/// A variable left as written is reported once, as such: not also as a
/// bad port or a bad on/off word.
#[test]
fn an_unset_variable_is_reported_once() {
    for (extra, key) in [
        ("redis.port = ${REDIS_PORT}\n", "redis.port"),
        ("redis.use.ssl = ${SSL}\n", "redis.use.ssl"),
        ("redis.enabled = ${RE}\n", "redis.enabled"),
    ] {
        let text = on(extra);
        let problems = match parse(&text, &[]) {
            Err(ConfigError::Invalid { errors, warnings }) => [errors, warnings].concat(),
            other => panic!("{extra:?}: want an error, got {other:?}"),
        };
        let about: Vec<&Problem> = problems
            .iter()
            .filter(|p| p.key.as_deref() == Some(key))
            .collect();
        assert!(
            about.len() == 1 && about[0].message.contains("is not set"),
            "{extra:?}: {about:?}"
        );
    }
}

#[test]
fn a_variable_that_is_not_utf8_is_an_error() {
    use std::os::unix::ffi::OsStringExt;
    let lookup = |name: &str| (name == "BAD").then(|| OsString::from_vec(vec![0x66, 0xff]));
    let text = format!("{BASE}cluster.instance2.hostname = ${{BAD}}\n");
    match config::parse_str_with_env(&text, &lookup) {
        Err(ConfigError::Invalid { errors, .. }) => assert!(
            errors.iter().any(|p| names(
                p,
                Severity::Error,
                "cluster.instance2.hostname",
                3,
                "BAD is not valid UTF-8"
            )),
            "{errors:?}"
        ),
        other => panic!("want an error, got {other:?}"),
    }
}

#[test]
fn on_off_keys_as_dhis2_is_on() {
    let endpoint_on = Resp("127.0.0.1:6379 [::1]:6379", None, "on: redis.cache");
    let endpoint_off = Resp("", None, "off: neither");
    let mut cases: Vec<Case> = Vec::new();
    for word in ["on", "ON", "On", "true", "TRUE", "True"] {
        cases.push((
            "on",
            format!("{BASE}redis.cache.invalidation.enabled = {word}\n"),
            &[],
            endpoint_on,
        ));
        cases.push((
            "redis.enabled on: the endpoint stays off",
            format!("{BASE}{ON}redis.enabled = {word}\n"),
            &[],
            Resp("", None, "off: redis.enabled = on"),
        ));
        cases.push((
            "redis.use.ssl on: DHIS 2 would speak TLS",
            format!("{BASE}{ON}redis.use.ssl = {word}\n"),
            &[],
            Fails("redis.use.ssl", 4, "speak TLS"),
        ));
    }
    for word in ["off", "OFF", "false", "False", ""] {
        cases.push((
            "off, quietly",
            format!("{BASE}redis.cache.invalidation.enabled = {word}\n"),
            &[],
            endpoint_off,
        ));
        cases.push((
            "off, quietly",
            format!("{BASE}redis.cache.invalidation.enabled = {word}\n"),
            &[],
            Quiet("redis.cache.invalidation.enabled"),
        ));
        cases.push((
            "redis.use.ssl off",
            format!("{BASE}{ON}redis.use.ssl = {word}\n"),
            &[],
            endpoint_on,
        ));
    }
    for word in ["yes", "1", "enabled", "onn"] {
        cases.push((
            "neither word: off to DHIS 2, with a warning",
            format!("{BASE}redis.cache.invalidation.enabled = {word}\n"),
            &[],
            endpoint_off,
        ));
        cases.push((
            "neither word: off to DHIS 2, with a warning",
            format!("{BASE}redis.cache.invalidation.enabled = {word}\n"),
            &[],
            Warns(
                "redis.cache.invalidation.enabled",
                3,
                "DHIS 2 reads it as off",
            ),
        ));
        cases.push((
            "redis.use.ssl neither word: off, with a warning",
            format!("{BASE}{ON}redis.use.ssl = {word}\n"),
            &[],
            Warns("redis.use.ssl", 4, "DHIS 2 reads it as off"),
        ));
    }
    // Ours, read with the same words.
    for word in ["on", "TRUE"] {
        cases.push((
            "cachecast.webhook.remote",
            format!(
                "{BASE}cachecast.webhook.url = http://10.0.0.9:8080/x\ncachecast.webhook.remote = {word}\n"
            ),
            &[],
            Warns("cachecast.webhook.url", 3, "off this machine"),
        ));
    }
    run(&cases);
}

#[test]
fn dhis2_defaults_and_empty_values() {
    run(&[
        (
            "redis.host absent: localhost",
            on(""),
            &[],
            Resp("127.0.0.1:6379 [::1]:6379", None, "redis.host = localhost"),
        ),
        (
            "redis.host empty: the empty host name, not localhost",
            on("redis.host =\n"),
            &[],
            Resp("", None, "off: redis.host is empty"),
        ),
        (
            "redis.host empty: DHIS 2 does not start",
            on("redis.host =\n"),
            &[],
            Warns("redis.host", 4, "does not start"),
        ),
        (
            "redis.host empty from the environment",
            on("redis.host = ${REDIS_HOST}\n"),
            &[("REDIS_HOST", " ")],
            Resp("", None, "off: redis.host is empty"),
        ),
        (
            "redis.port empty: no number to DHIS 2",
            on("redis.port =\n"),
            &[],
            Warns("redis.port", 4, "NumberFormatException"),
        ),
        (
            "redis.port empty: the endpoint stays off",
            on("redis.port =\n"),
            &[],
            Resp("", None, "off: redis.port is empty"),
        ),
        (
            "redis.password empty: no password, as absent",
            on("redis.password =\n"),
            &[],
            Resp("127.0.0.1:6379 [::1]:6379", None, "on"),
        ),
        (
            "redis.use.ssl empty: off",
            on("redis.use.ssl =\n"),
            &[],
            Quiet("redis.use.ssl"),
        ),
        (
            "an empty redis.host is no concern with DHIS 2's invalidation off",
            format!("{BASE}redis.host =\n"),
            &[],
            Quiet("redis.host"),
        ),
    ]);
}

#[test]
fn the_form_dhis2_2_38_to_2_40_replicates_with() {
    const RMI: &str = "DHIS 2 2.38 to 2.40 starts Ehcache RMI replication listening on port 4005";
    run(&[
        (
            "cluster.hostname with cluster.members",
            "cluster.hostname = 10.0.0.1\ncluster.cache.port = 4005\ncluster.members = 10.0.0.2:4005\n"
                .into(),
            &[],
            Warns("cluster.hostname", 1, RMI),
        ),
        (
            "the warning says what to write instead",
            "cluster.hostname = 10.0.0.1\ncluster.cache.port = 4005\ncluster.members = 10.0.0.2:4005\n"
                .into(),
            &[],
            Warns("cluster.hostname", 1, "as cluster.instanceN keys"),
        ),
        (
            "cluster.instanceN: DHIS 2 2.29 and later ignore it",
            BASE.into(),
            &[],
            Lacks("RMI"),
        ),
        (
            "cluster.hostname without members: DHIS 2 replicates nothing",
            "cluster.hostname = 10.0.0.1\n".into(),
            &[],
            Lacks("RMI"),
        ),
    ]);
    // The message is whole, not cut.
    let loaded = parse(
        "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2\n",
        &[],
    )
    .expect("valid");
    let w = loaded
        .warnings
        .iter()
        .find(|p| p.message.contains("RMI"))
        .expect("the RMI warning");
    assert!(w.message.ends_with("need no change"), "{}", w.message);
}

#[test]
fn substituted_values_are_listed_and_secrets_masked() {
    let text = format!(
        "{BASE}cluster.instance2.hostname = ${{PEER3}}\n{ON}redis.password = ${{REDIS_PW}}\ncachecast.secret = ${{MESH_SECRET}}\n"
    );
    let loaded = parse(
        &text,
        &[
            ("PEER3", "10.0.0.3"),
            ("REDIS_PW", "pw-from-env"),
            ("MESH_SECRET", "0123456789abcdef-secret"),
        ],
    )
    .expect("valid");
    let shown: Vec<String> = loaded
        .config
        .from_environment
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(
        shown,
        [
            "cluster.instance2.hostname = 10.0.0.3 (line 3, from ${PEER3})",
            "redis.password = ******** (line 5, from ${REDIS_PW})",
            "cachecast.secret = ******** (line 6, from ${MESH_SECRET})",
        ]
    );
    let debug = format!("{:?}", loaded.config);
    assert!(!debug.contains("pw-from-env") && !debug.contains("abcdef-secret"));
}
