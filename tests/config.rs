//! The configuration contract (DESIGN.md section 1), rule by rule.
//!
//! Most rules are tables of cases: a `dhis.conf` text and what it must
//! give, either the exact cluster (this node and its peers, as `host:port`)
//! or a problem naming the key and the line. Every case also checks that
//! parsing never panics and that an invalid file always says why.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachecast::config::{
    self, ClusterConfig, ConfigError, Format, Loaded, NodeAddr, Problem, SecretSource, Severity,
};
use proptest::prelude::*;

/// What a case must give.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Valid, with exactly this node and these peers, and no problem at
    /// all (no warning, no note).
    Valid(&'static str, &'static [&'static str]),
    /// Valid, with exactly this node and these peers, and (among others)
    /// a problem of this severity naming this key ("" for none) on this
    /// line (when `Some`), whose message contains the text.
    With(
        &'static str,
        &'static [&'static str],
        Severity,
        &'static str,
        Option<usize>,
        &'static str,
    ),
    /// Invalid, with (among others) an error naming this key on this line
    /// (when `Some`), whose message contains the text.
    Error(&'static str, Option<usize>, &'static str),
}

use Severity::{Note, Warning};
use Want::{Error, Valid, With};

fn is_problem(p: &Problem, severity: Severity, key: &str, line: Option<usize>, text: &str) -> bool {
    p.severity == severity
        && p.key.as_deref() == (!key.is_empty()).then_some(key)
        && (line.is_none() || p.line == line)
        && p.message.contains(text)
}

fn listed(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("\n      {p}")).collect()
}

fn addresses(config: &ClusterConfig) -> (String, Vec<String>) {
    (
        config.node.to_string(),
        config.peers.iter().map(|p| p.addr.to_string()).collect(),
    )
}

/// Parses without letting a panic escape: a panic is a failed case.
fn parse(bytes: &[u8]) -> Result<Result<Loaded, ConfigError>, String> {
    std::panic::catch_unwind(|| config::parse_bytes(bytes)).map_err(|_| "panicked".to_string())
}

fn check(bytes: &[u8], want: Want) -> Result<(), String> {
    let result = parse(bytes)?;
    match (want, result) {
        (Valid(node, peers) | With(node, peers, ..), Ok(loaded)) => {
            let (n, p) = addresses(&loaded.config);
            if n != node || p != peers {
                return Err(format!(
                    "got node {n} peers {p:?}, want node {node} peers {peers:?}"
                ));
            }
            if let Some(p) = loaded
                .warnings
                .iter()
                .find(|p| p.severity == Severity::Error)
            {
                return Err(format!("an error among the warnings: {p}"));
            }
            match want {
                Valid(..) if !loaded.warnings.is_empty() => {
                    Err(format!("want no problem, got:{}", listed(&loaded.warnings)))
                }
                With(_, _, sev, key, line, text)
                    if !loaded
                        .warnings
                        .iter()
                        .any(|p| is_problem(p, sev, key, line, text)) =>
                {
                    Err(format!(
                        "want {sev:?} {key:?} line {line:?} containing {text:?}, got:{}",
                        listed(&loaded.warnings)
                    ))
                }
                _ => Ok(()),
            }
        }
        (Error(key, line, text), Err(ConfigError::Invalid { errors, warnings })) => {
            if errors
                .iter()
                .any(|p| is_problem(p, Severity::Error, key, line, text))
            {
                Ok(())
            } else {
                Err(format!(
                    "want an error {key:?} line {line:?} containing {text:?}, got:{}{}",
                    listed(&errors),
                    listed(&warnings)
                ))
            }
        }
        (Error(..), Ok(loaded)) => Err(format!(
            "want an error, got a valid config {:?}{}",
            addresses(&loaded.config),
            listed(&loaded.warnings)
        )),
        (_, Err(ConfigError::Invalid { errors, warnings })) => Err(format!(
            "want a valid config, got:{}{}",
            listed(&errors),
            listed(&warnings)
        )),
        (_, Err(e)) => Err(format!("unexpected {e:?}")),
    }
}

/// Runs a table; every failing case is reported, not only the first.
fn run<N: AsRef<str>, T: AsRef<str>>(cases: &[(N, T, Want)]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(name, text, want)| {
            let (name, text) = (name.as_ref(), text.as_ref());
            check(text.as_bytes(), *want)
                .err()
                .map(|e| format!("  {name}: {e}\n    text: {text:?}"))
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

fn valid(text: &str) -> Loaded {
    match config::parse_str(text) {
        Ok(loaded) => loaded,
        Err(e) => panic!("want valid, got {e}\n  text: {text:?}"),
    }
}

fn invalid(bytes: &[u8]) -> (Vec<Problem>, Vec<Problem>) {
    match config::parse_bytes(bytes) {
        Err(ConfigError::Invalid { errors, warnings }) => (errors, warnings),
        other => panic!("want invalid, got {other:?}"),
    }
}

// ---------------------------------------------------------------------
// cluster.instanceN

#[test]
fn instance_format() {
    run(&[
        (
            "two nodes",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4001"]),
        ),
        (
            "gap: instance1 and instance3, no instance2",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance3.hostname = 10.0.0.4\ncluster.instance3.cache.port = 4003\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4001", "10.0.0.4:4003"]),
        ),
        (
            "gap: instance4 alone",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance4.hostname = 10.0.0.5\n",
            Valid("10.0.0.1:4001", &["10.0.0.5:4001"]),
        ),
        (
            "five instances, in any order",
            "cluster.instance3.hostname = 10.0.0.4\ncluster.instance0.hostname = 10.0.0.1\n\
             cluster.instance4.hostname = 10.0.0.5\ncluster.instance2.hostname = 10.0.0.3\n\
             cluster.instance1.hostname = 10.0.0.2\n",
            Valid(
                "10.0.0.1:4001",
                &[
                    "10.0.0.2:4001",
                    "10.0.0.3:4001",
                    "10.0.0.4:4001",
                    "10.0.0.5:4001",
                ],
            ),
        ),
        (
            "N = 5",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance5.hostname = 10.0.0.6\n",
            Error("cluster.instance5.hostname", Some(2), "at most 5 instances"),
        ),
        (
            "N = 99",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance99.hostname = 10.0.0.6\n",
            Error(
                "cluster.instance99.hostname",
                Some(2),
                "at most 5 instances",
            ),
        ),
        (
            "30-digit N",
            "cluster.instance0.hostname = 10.0.0.1\n\
             cluster.instance123456789012345678901234567890.hostname = 10.0.0.6\n",
            Error(
                "cluster.instance123456789012345678901234567890.hostname",
                Some(2),
                "at most 5 instances",
            ),
        ),
        (
            "N = 5, port key only",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance5.cache.port = 4001\n",
            Error(
                "cluster.instance5.cache.port",
                Some(2),
                "at most 5 instances",
            ),
        ),
        (
            "N = 5 with an empty value: not set, only a warning",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance5.hostname =\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.instance5.hostname",
                Some(3),
                "not set",
            ),
        ),
        (
            "empty peer hostname: a warning, not used",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname =\n\
             cluster.instance2.hostname = 10.0.0.3\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.3:4001"],
                Warning,
                "cluster.instance1.hostname",
                Some(2),
                "not set",
            ),
        ),
        (
            "empty: white space only",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname =  \t \n\
             cluster.instance2.hostname = 10.0.0.3\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.3:4001"],
                Warning,
                "cluster.instance1.hostname",
                Some(2),
                "not set",
            ),
        ),
        (
            "empty: a key alone, no separator",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname\n\
             cluster.instance2.hostname = 10.0.0.3\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.3:4001"],
                Warning,
                "cluster.instance1.hostname",
                Some(2),
                "not set",
            ),
        ),
        (
            "empty port: the default applies, with a warning",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance0.cache.port =\n\
             cluster.instance1.hostname = 10.0.0.2\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.instance0.cache.port",
                Some(2),
                "not set",
            ),
        ),
        (
            "the template: every key empty",
            "cluster.instance0.hostname =\ncluster.instance0.cache.port =\n\
             cluster.instance1.hostname =\ncluster.instance1.cache.port =\n",
            Error("cluster.instance0.hostname", Some(1), "clustering is off"),
        ),
        (
            "instance0's own port",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance0.cache.port = 4010\n\
             cluster.instance1.hostname = 10.0.0.2\n",
            Valid("10.0.0.1:4010", &["10.0.0.2:4001"]),
        ),
        (
            "a port key without its hostname",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance2.cache.port = 4003\n",
            Error(
                "cluster.instance2.cache.port",
                Some(3),
                "without its host name",
            ),
        ),
        (
            "a port key with an empty hostname",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance2.hostname =\ncluster.instance2.cache.port = 4003\n",
            Error(
                "cluster.instance2.cache.port",
                Some(4),
                "without its host name",
            ),
        ),
        (
            "instance0's port without its hostname",
            "cluster.instance0.cache.port = 4001\ncluster.instance1.hostname = 10.0.0.2\n",
            Error(
                "cluster.instance0.cache.port",
                Some(1),
                "without its host name",
            ),
        ),
        (
            "missing instance0",
            "cluster.instance1.hostname = 10.0.0.2\ncluster.instance2.hostname = 10.0.0.3\n",
            Error("cluster.instance0.hostname", None, "clustering is off"),
        ),
        (
            "empty instance0",
            "cluster.instance0.hostname =\ncluster.instance1.hostname = 10.0.0.2\n",
            Error("cluster.instance0.hostname", Some(1), "clustering is off"),
        ),
        (
            "an empty file",
            "",
            Error("cluster.instance0.hostname", None, "clustering is off"),
        ),
        (
            "only the application's keys",
            "connection.url = jdbc:postgresql:dhis2\nconnection.username = dhis\n",
            Error("cluster.instance0.hostname", None, "clustering is off"),
        ),
        (
            "only instance0: valid, no peers",
            "cluster.instance0.hostname = 10.0.0.1\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.instance0",
                Some(1),
                "no peers",
            ),
        ),
        (
            "host names",
            "cluster.instance0.hostname = app1.example.org\ncluster.instance1.hostname = dhis2_web\n\
             cluster.instance2.hostname = App-3\n",
            Valid("app1.example.org:4001", &["dhis2_web:4001", "App-3:4001"]),
        ),
        (
            "a host name with a space",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = app 2\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "not a valid host name",
            ),
        ),
        (
            "a mistyped IPv4 address",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.256\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "not a valid IPv4 address",
            ),
        ),
        (
            "a truncated IPv4 address",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.1\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "not a valid IPv4 address",
            ),
        ),
        (
            "0.0.0.0 is no node's address",
            "cluster.instance0.hostname = 0.0.0.0\ncluster.instance1.hostname = 10.0.0.2\n",
            Error("cluster.instance0.hostname", Some(1), "unspecified address"),
        ),
        (
            ":: is no node's address",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = ::\n",
            Error("cluster.instance1.hostname", Some(2), "unspecified address"),
        ),
        (
            "a multicast address",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 224.0.0.1\n",
            Error("cluster.instance1.hostname", Some(2), "multicast"),
        ),
        (
            "a loopback node with a peer elsewhere: warning",
            "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            With(
                "127.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.instance0",
                Some(1),
                "loopback",
            ),
        ),
    ]);
}

#[test]
fn ports() {
    let case = |port: &'static str, want: Want| -> (String, Want) {
        (
            format!(
                "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
                 cluster.instance1.cache.port ={port}\n"
            ),
            want,
        )
    };
    const KEY: &str = "cluster.instance1.cache.port";
    let cases = [
        case(" 0", Error(KEY, Some(3), "port 0")),
        case(" 65536", Error(KEY, Some(3), "out of range")),
        case(
            " 99999999999999999999999",
            Error(KEY, Some(3), "out of range"),
        ),
        case(" abc", Error(KEY, Some(3), "not a port number")),
        case(" -1", Error(KEY, Some(3), "not a port number")),
        case(" +4001", Error(KEY, Some(3), "not a port number")),
        case(" 4001.0", Error(KEY, Some(3), "not a port number")),
        case(" 0x0FA1", Error(KEY, Some(3), "not a port number")),
        case(" 40 01", Error(KEY, Some(3), "not a port number")),
        case("  4005  ", Valid("10.0.0.1:4001", &["10.0.0.2:4005"])),
        case("4005\t", Valid("10.0.0.1:4001", &["10.0.0.2:4005"])),
        case(" 1", Valid("10.0.0.1:4001", &["10.0.0.2:1"])),
        case(" 65535", Valid("10.0.0.1:4001", &["10.0.0.2:65535"])),
    ];
    let cases: Vec<(String, String, Want)> = cases
        .into_iter()
        .map(|(text, want)| {
            (
                text.lines().nth(2).unwrap_or_default().to_string(),
                text,
                want,
            )
        })
        .collect();
    run(&cases);
}

#[test]
fn duplicates_and_addresses() {
    run(&[
        (
            "this node as a peer",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.1\n",
            Error("cluster.instance1", Some(2), "cannot peer with itself"),
        ),
        (
            "this node as a peer, ports written out",
            "cluster.instance0.hostname = app1.example.org\ncluster.instance0.cache.port = 4001\n\
             cluster.instance2.hostname = app1.example.org\ncluster.instance2.cache.port = 4001\n",
            Error("cluster.instance2", Some(3), "cannot peer with itself"),
        ),
        (
            "this node as a peer, host differing in ASCII case",
            "cluster.instance0.hostname = App1.Example.ORG\ncluster.instance1.hostname = app1.example.org\n",
            Error("cluster.instance1", Some(2), "cannot peer with itself"),
        ),
        (
            "this node as a peer, IPv6 written two ways",
            "cluster.instance0.hostname = ::1\ncluster.instance1.hostname = 0:0:0:0:0:0:0:1\n",
            Error("cluster.instance1", Some(2), "cannot peer with itself"),
        ),
        (
            "this node as a peer, IPv4-mapped IPv6",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = ::ffff:10.0.0.1\n",
            Error("cluster.instance1", Some(2), "cannot peer with itself"),
        ),
        (
            "two identical peers",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance2.hostname = 10.0.0.2\n",
            Error("cluster.instance2", Some(3), "the same node twice"),
        ),
        (
            "two identical peers, by case",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = APP2.example.org\n\
             cluster.instance3.hostname = app2.EXAMPLE.org\n",
            Error("cluster.instance3", Some(3), "the same node twice"),
        ),
        (
            "one host, different ports: fine",
            "cluster.instance0.hostname = 127.0.0.1\ncluster.instance0.cache.port = 4001\n\
             cluster.instance1.hostname = 127.0.0.1\ncluster.instance1.cache.port = 4002\n\
             cluster.instance2.hostname = 127.0.0.1\ncluster.instance2.cache.port = 4003\n",
            Valid("127.0.0.1:4001", &["127.0.0.1:4002", "127.0.0.1:4003"]),
        ),
        (
            "a hostname holding a port",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2:4001\n",
            Error("cluster.instance1.hostname", Some(2), "holds a `:`"),
        ),
        (
            "a URL",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = http://10.0.0.2:4001/\n",
            Error("cluster.instance1.hostname", Some(2), "URL"),
        ),
        (
            "a URL with a name",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = https://app2.example.org\n",
            Error("cluster.instance1.hostname", Some(2), "URL"),
        ),
        (
            "IPv6: bare and bracketed",
            "cluster.instance0.hostname = ::1\ncluster.instance1.hostname = [::1]\n\
             cluster.instance1.cache.port = 4002\ncluster.instance2.hostname = [0:0::1]\n\
             cluster.instance2.cache.port = 4003\n",
            Valid("[::1]:4001", &["[::1]:4002", "[0:0::1]:4003"]),
        ),
        (
            "IPv6: bracketed node",
            "cluster.instance0.hostname = [::1]\ncluster.instance1.hostname = ::1\n\
             cluster.instance1.cache.port = 4002\n",
            Valid("[::1]:4001", &["[::1]:4002"]),
        ),
        (
            "IPv6 with a port in the hostname",
            "cluster.instance0.hostname = [::1]:4001\ncluster.instance1.hostname = 10.0.0.2\n",
            Error("cluster.instance0.hostname", Some(1), "holds a `:`"),
        ),
        (
            "IPv6 zone id, in a member",
            "cluster.hostname = 10.0.0.1\ncluster.members = [fe80::1%eth0]:4001\n",
            Error("cluster.members", Some(2), "zone ids"),
        ),
        (
            "IPv6 zone id, in an instance",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = fe80::1%eth0\n",
            Error("cluster.instance1.hostname", Some(2), "zone ids"),
        ),
    ]);
}

#[test]
fn ipv6_display_and_host() {
    let loaded = valid(
        "cluster.instance0.hostname = [::1]\ncluster.instance1.hostname = ::1\ncluster.instance1.cache.port = 4002\n",
    );
    assert_eq!(loaded.config.node, NodeAddr::new("::1", 4001));
    assert_eq!(loaded.config.node.to_string(), "[::1]:4001");
    assert_eq!(loaded.config.peers[0].addr, NodeAddr::new("::1", 4002));
    assert_eq!(loaded.config.format, Format::Instances);
}

#[test]
fn peers_carry_source_and_line() {
    let loaded = valid(
        "# server A\n\ncluster.instance0.hostname = 10.0.0.1\ncluster.instance3.hostname = \\\n   10.0.0.4\ncluster.instance1.hostname = 10.0.0.2\n",
    );
    let peers: Vec<(String, Option<usize>)> = loaded
        .config
        .peers
        .iter()
        .map(|p| (p.source.clone(), p.line))
        .collect();
    assert_eq!(
        peers,
        [
            ("cluster.instance1".to_string(), Some(6)),
            ("cluster.instance3".to_string(), Some(4))
        ]
    );
}

// ---------------------------------------------------------------------
// Java properties syntax

#[test]
fn properties_syntax() {
    const TWO: Want = Valid("10.0.0.1:4001", &["10.0.0.2:4001"]);
    run(&[
        (
            "a hostname split across lines",
            "cluster.instance0.hostname = 10.0.\\\n    0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "a continuation counts its lines",
            "cluster.instance0.hostname = 10.0.\\\n    0.1\ncluster.instance1.hostname = 10.0.0.2:4001\n",
            Error("cluster.instance1.hostname", Some(3), "holds a `:`"),
        ),
        (
            "an error in a continued value names its first line",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.\\\n  0.2:4001\n",
            Error("cluster.instance1.hostname", Some(2), "holds a `:`"),
        ),
        (
            "a key split across lines",
            "cluster.instance0.\\\n  hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "three lines, tab indentation",
            "cluster.instance0.hostname = \\\n\t10.\\\n \t 0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "a continuation on the last line, no newline",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\\",
            TWO,
        ),
        (
            "an even number of backslashes does not continue",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\\\\\n\
             cluster.instance2.hostname = 10.0.0.3\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "not a valid host name",
            ),
        ),
        (
            "an application key's continuation takes the next line along",
            "connection.url = jdbc:postgresql:dhis2 \\\ncluster.instance1.hostname = 10.0.0.9\n\
             cluster.instance0.hostname = 10.0.0.1\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.instance0",
                Some(3),
                "no peers",
            ),
        ),
        (
            "`:` separators",
            "cluster.instance0.hostname: 10.0.0.1\ncluster.instance1.hostname:10.0.0.2\n\
             cluster.instance1.cache.port :4002\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4002"]),
        ),
        (
            "space separators",
            "cluster.instance0.hostname 10.0.0.1\ncluster.instance1.hostname\t10.0.0.2\n\
             cluster.instance1.cache.port    4002\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4002"]),
        ),
        (
            "`=` without spaces",
            "cluster.instance0.hostname=10.0.0.1\ncluster.instance1.hostname=10.0.0.2\n",
            TWO,
        ),
        (
            "# and ! comments",
            "# cluster.instance2.hostname = 10.0.0.9\n! cluster.instance3.hostname = 10.0.0.8\n\
             \x20  # indented\n\t! indented\ncluster.instance0.hostname = 10.0.0.1\n\
             cluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "a comment ending in a backslash does not continue",
            "# a comment \\\ncluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "comments with backslashes and a malformed \\u",
            "# C:\\users\\dhis2\\u00zz\n! \\u\ncluster.instance0.hostname = 10.0.0.1\n\
             cluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "# after a value is part of it",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2 # B\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "not a valid host name",
            ),
        ),
        (
            "\\uXXXX escapes in values",
            "cluster.instance0.hostname = 10.0.0.\\u0031\ncluster.instance1.hostname = \\u0031\\u0030.0.0.2\n\
             cluster.instance1.cache.port = \\u0034002\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4002"]),
        ),
        (
            "\\uXXXX escapes in keys",
            "\\u0063luster.instance0.hostname = 10.0.0.1\ncluster.instance1.host\\u006eame = 10.0.0.2\n",
            TWO,
        ),
        (
            "a \\t escape is trimmed",
            "cluster.instance0.hostname = 10.0.0.1\\t\ncluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "a malformed \\u escape: not hex",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.\\u00zz\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "Malformed \\uxxxx encoding",
            ),
        ),
        (
            "a malformed \\u escape: too short",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.\\u03\n",
            Error(
                "cluster.instance1.hostname",
                Some(2),
                "Malformed \\uxxxx encoding",
            ),
        ),
        (
            "a malformed \\u escape in a continued line",
            "cluster.instance0.hostname = 10.0.0.1\n\ncluster.instance1.hostname = 10.0.\\\n  0.\\uXYZW\n",
            Error(
                "cluster.instance1.hostname",
                Some(3),
                "Malformed \\uxxxx encoding",
            ),
        ),
        (
            "a malformed \\u escape in a cachecast key's value",
            "cluster.instance0.hostname = 10.0.0.1\ncachecast.secret = s3\\u",
            Error("cachecast.secret", Some(2), "Malformed \\uxxxx encoding"),
        ),
        (
            "CRLF line endings",
            "cluster.instance0.hostname = 10.0.0.1\r\ncluster.instance1.hostname = 10.0.0.2\r\n\
             cluster.instance1.cache.port = 4002\r\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4002"]),
        ),
        (
            "CRLF and a continuation",
            "cluster.instance0.hostname = 10.0.\\\r\n  0.1\r\ncluster.instance1.hostname = 10.0.0.2\r\n",
            TWO,
        ),
        (
            "CRLF line numbers",
            "# A\r\ncluster.instance0.hostname = 10.0.0.1\r\ncluster.instance1.hostname = bad host\r\n",
            Error(
                "cluster.instance1.hostname",
                Some(3),
                "not a valid host name",
            ),
        ),
        (
            "CR alone ends a line too",
            "# A\rcluster.instance0.hostname = 10.0.0.1\rcluster.instance1.hostname = bad host\r",
            Error(
                "cluster.instance1.hostname",
                Some(3),
                "not a valid host name",
            ),
        ),
        (
            "trailing white space",
            "cluster.instance0.hostname = 10.0.0.1   \t\ncluster.instance1.hostname = 10.0.0.2 \n\
             cluster.instance1.cache.port = 4002 \t \n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4002"]),
        ),
        (
            "leading white space and blank lines",
            "\n   \n   cluster.instance0.hostname = 10.0.0.1\n\n\t\x0ccluster.instance1.hostname = 10.0.0.2\n\n",
            TWO,
        ),
        (
            "a byte-order mark",
            "\u{FEFF}cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            TWO,
        ),
        (
            "a duplicate key: warning, the last wins",
            "cluster.instance0.hostname = 10.0.0.9\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance0.hostname = 10.0.0.1\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.instance0.hostname",
                Some(3),
                "last value wins",
            ),
        ),
        (
            "a duplicate key: an empty last value wins too",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance1.hostname =\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.instance1.hostname",
                Some(3),
                "last value wins",
            ),
        ),
        (
            "the application's keys, with anything in them, are no concern",
            "connection.password = p\\uZZZZ=:#!\\\\ \\\nconnection.url = jdbc:postgresql://db:5432/dhis2?x=\\u00\n\
             redis.password\\u = x\nfilestore.container = \"quoted\"\n: a lonely colon\n=\n\
             \\ = \\\n\nencryption.password = \\u\ncluster.instance0.hostname = 10.0.0.1\n\
             cluster.instance1.hostname = 10.0.0.2\nserver.base.url = https://dhis2.example.org:8080/\n",
            TWO,
        ),
    ]);
}

#[test]
fn a_malformed_escape_costs_one_error_only() {
    // The lines after it are still read, and instance0 is not reported
    // missing on top of it.
    let (errors, _) = invalid(
        b"cluster.instance0.hostname = 10.0.0.\\u3x\ncluster.instance1.hostname = 10.0.0.2\ncachecast.buffer = 0\n",
    );
    let keys: Vec<(Option<&str>, Option<usize>)> =
        errors.iter().map(|p| (p.key.as_deref(), p.line)).collect();
    assert_eq!(
        keys,
        [
            (Some("cluster.instance0.hostname"), Some(1)),
            (Some("cachecast.buffer"), Some(3))
        ],
        "{errors:#?}"
    );
}

// ---------------------------------------------------------------------
// The 2.29–2.40 format: cluster.hostname / cluster.members

#[test]
fn members_format_equals_instance_format() {
    let pairs = [
        (
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2:4001\n",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
        ),
        (
            "cluster.hostname = 10.0.0.1\ncluster.cache.port = 4005\n\
             cluster.members =  10.0.0.2:4005 ,\t10.0.0.3 ,app4.example.org:4010,10.0.0.5\n",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance0.cache.port = 4005\n\
             cluster.instance1.hostname = 10.0.0.2\ncluster.instance1.cache.port = 4005\n\
             cluster.instance2.hostname = 10.0.0.3\n\
             cluster.instance3.hostname = app4.example.org\ncluster.instance3.cache.port = 4010\n\
             cluster.instance4.hostname = 10.0.0.5\n",
        ),
        (
            "cluster.hostname = ::1\ncluster.members = [::1]:4002, [::1]:4003\n",
            "cluster.instance0.hostname = ::1\ncluster.instance1.hostname = [::1]\n\
             cluster.instance1.cache.port = 4002\ncluster.instance2.hostname = ::1\n\
             cluster.instance2.cache.port = 4003\n",
        ),
    ];
    for (members, instances) in pairs {
        let (a, b) = (valid(members).config, valid(instances).config);
        assert_eq!(a.format, Format::Members);
        assert_eq!(b.format, Format::Instances);
        assert_eq!(a.node, b.node, "\n{members}\n{instances}");
        let peers = |c: &ClusterConfig| c.peers.iter().map(|p| p.addr.clone()).collect::<Vec<_>>();
        assert_eq!(peers(&a), peers(&b), "\n{members}\n{instances}");
        assert_eq!(a.bind, b.bind);
    }
}

/// What the warning on the `cluster.hostname`/`cluster.members` form says
/// (DHIS 2 2.38 to 2.40 run RMI replication on the same port).
const RMI: &str = "DHIS 2 2.38 to 2.40 starts Ehcache RMI replication listening on port";

#[test]
fn members_format() {
    run(&[
        (
            "whitespace around commas, the default port",
            "cluster.hostname = 10.0.0.1\ncluster.members =  10.0.0.2 ,\t10.0.0.3:4002 , app4.example.org\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001", "10.0.0.3:4002", "app4.example.org:4001"],
                Warning,
                "cluster.hostname",
                Some(1),
                RMI,
            ),
        ),
        (
            "[::1]:4002",
            "cluster.hostname = ::1\ncluster.members = [::1]:4002\n",
            With(
                "[::1]:4001",
                &["[::1]:4002"],
                Warning,
                "cluster.hostname",
                Some(1),
                RMI,
            ),
        ),
        (
            "a bare IPv6 member: warning",
            "cluster.hostname = 10.0.0.1\ncluster.members = fe80::2\n",
            With(
                "10.0.0.1:4001",
                &["[fe80::2]:4001"],
                Warning,
                "cluster.members",
                Some(2),
                "brackets",
            ),
        ),
        (
            "four members is the most",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5\n",
            With(
                "10.0.0.1:4001",
                &[
                    "10.0.0.2:4001",
                    "10.0.0.3:4001",
                    "10.0.0.4:4001",
                    "10.0.0.5:4001",
                ],
                Warning,
                "cluster.hostname",
                Some(1),
                RMI,
            ),
        ),
        (
            "five members is too many",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6\n",
            Error("cluster.members", Some(2), "at most 5 instances"),
        ),
        (
            "an empty member entry",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2, ,10.0.0.3\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001", "10.0.0.3:4001"],
                Warning,
                "cluster.members",
                Some(2),
                "entry 2 is empty",
            ),
        ),
        (
            "a trailing comma",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2,\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.members",
                Some(2),
                "entry 2 is empty",
            ),
        ),
        (
            "a member with port 0",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2:0\n",
            Error("cluster.members", Some(2), "port 0"),
        ),
        (
            "a member with a bad port",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2:abc\n",
            Error("cluster.members", Some(2), "not a port number"),
        ),
        (
            "a member given as a URL",
            "cluster.hostname = 10.0.0.1\ncluster.members = http://10.0.0.2:4001\n",
            Error("cluster.members", Some(2), "URL"),
        ),
        (
            "a member with an unclosed bracket",
            "cluster.hostname = 10.0.0.1\ncluster.members = [::2:4002\n",
            Error("cluster.members", Some(2), "missing `]`"),
        ),
        (
            "members separated by spaces, not commas",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2 10.0.0.3\n",
            Error("cluster.members", Some(2), "entry 1"),
        ),
        (
            "this node among the members",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.1:4001, 10.0.0.2\n",
            Error("cluster.members[1]", Some(2), "cannot peer with itself"),
        ),
        (
            "a member twice",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2, 10.0.0.2:4001\n",
            Error("cluster.members[2]", Some(2), "the same node twice"),
        ),
        (
            "no cluster.hostname",
            "cluster.members = 10.0.0.2\n",
            Error("cluster.hostname", None, "clustering is off"),
        ),
        (
            "an empty cluster.hostname",
            "cluster.hostname =\ncluster.members = 10.0.0.2\n",
            Error("cluster.hostname", Some(1), "clustering is off"),
        ),
        (
            "nothing but an empty cluster.hostname",
            "cluster.hostname =\n",
            Error("cluster.hostname", Some(1), "clustering is off"),
        ),
        (
            "a bad cluster.cache.port",
            "cluster.hostname = 10.0.0.1\ncluster.cache.port = 70000\ncluster.members = 10.0.0.2\n",
            Error("cluster.cache.port", Some(2), "out of range"),
        ),
        (
            "cluster.cache.port without cluster.hostname",
            "cluster.cache.port = 4001\ncluster.members = 10.0.0.2\n",
            Error("cluster.cache.port", Some(1), "without its host name"),
        ),
        (
            "a bad cluster.hostname",
            "cluster.hostname = 10.0.0.1:4001\ncluster.members = 10.0.0.2\n",
            Error("cluster.hostname", Some(1), "holds a `:`"),
        ),
        (
            "only this node",
            "cluster.hostname = 10.0.0.1\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.hostname",
                Some(1),
                "no peers",
            ),
        ),
        (
            "mixed formats: instanceN first",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.members = 10.0.0.2\n",
            Error("cluster.members", Some(2), "mixes both cluster formats"),
        ),
        (
            "mixed formats: members first",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2\ncluster.instance1.hostname = 10.0.0.3\n",
            Error(
                "cluster.instance1.hostname",
                Some(3),
                "mixes both cluster formats",
            ),
        ),
        (
            "mixed formats: cluster.cache.port with instanceN keys",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncluster.cache.port = 4001\n",
            Error("cluster.cache.port", Some(3), "mixes both cluster formats"),
        ),
        (
            "not mixed: an empty key of the other format",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncluster.members =\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.members",
                Some(3),
                "not set",
            ),
        ),
        (
            "the RMI port: a note",
            "cluster.hostname = 10.0.0.1\ncluster.cache.port = 4001\ncluster.cache.remote.object.port = 5001\n\
             cluster.members = 10.0.0.2:4001\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Note,
                "cluster.cache.remote.object.port",
                Some(3),
                "ignored",
            ),
        ),
        (
            "instanceN's RMI port: a note",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n\
             cluster.instance1.cache.remote.object.port = 5001\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Note,
                "cluster.instance1.cache.remote.object.port",
                Some(3),
                "ignored",
            ),
        ),
        (
            "RMI ports of either format are no mix",
            "cluster.hostname = 10.0.0.1\ncluster.members = 10.0.0.2\n\
             cluster.instance0.cache.remote.object.port = 5001\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Note,
                "cluster.instance0.cache.remote.object.port",
                Some(3),
                "ignored",
            ),
        ),
    ]);
}

// ---------------------------------------------------------------------
// Typos and unknown keys

#[test]
fn typos_and_unknown_keys() {
    const I01: &str =
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n";
    run(&[
        (
            "hostnme",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostnme = 10.0.0.2\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.instance1.hostnme",
                Some(2),
                "did you mean `cluster.instance1.hostname`?",
            ),
        ),
        (
            "cache.prot",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncluster.instance1.cache.prot = 4002\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cluster.instance1.cache.prot",
                Some(3),
                "did you mean `cluster.instance1.cache.port`?",
            ),
        ),
        (
            "instance01",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance01.hostname = 10.0.0.2\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.instance01.hostname",
                Some(2),
                "did you mean `cluster.instance1.hostname`?",
            ),
        ),
        (
            "instanse",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instanse1.hostname = 10.0.0.2\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.instanse1.hostname",
                Some(2),
                "did you mean `cluster.instanceN.hostname`?",
            ),
        ),
        (
            "keys are case-sensitive",
            "cluster.instance0.hostname = 10.0.0.1\nCluster.Instance1.Hostname = 10.0.0.2\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "Cluster.Instance1.Hostname",
                Some(2),
                "did you mean `cluster.instance1.hostname`?",
            ),
        ),
        (
            "cluster.member",
            "cluster.hostname = 10.0.0.1\ncluster.member = 10.0.0.2\n",
            With(
                "10.0.0.1:4001",
                &[],
                Warning,
                "cluster.member",
                Some(2),
                "did you mean `cluster.members`?",
            ),
        ),
        (
            "cachecast.bufer",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncachecast.bufer = 1024\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cachecast.bufer",
                Some(3),
                "did you mean `cachecast.buffer`?",
            ),
        ),
        (
            "cachecast.secert",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncachecast.secert = x\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cachecast.secert",
                Some(3),
                "did you mean `cachecast.secret`?",
            ),
        ),
        (
            "an unknown cachecast key",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncachecast.frobnicate = yes\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Warning,
                "cachecast.frobnicate",
                Some(3),
                "not a key cachecast reads",
            ),
        ),
        (
            "an unknown cluster key unlike ours: a note",
            "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\ncluster.some.other.setting = 1\n",
            With(
                "10.0.0.1:4001",
                &["10.0.0.2:4001"],
                Note,
                "cluster.some.other.setting",
                Some(3),
                "not a key cachecast reads",
            ),
        ),
        (
            "keys outside cluster. and cachecast.: silence",
            "clusters.instance1.hostname = x\ncachecasts = y\nmy.cluster.instance1.hostname = z\n\
             cluster = 1\ncluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n",
            Valid("10.0.0.1:4001", &["10.0.0.2:4001"]),
        ),
    ]);
    // And the typo'd key was not used.
    let loaded = valid(&format!("{I01}cluster.instance2.hostnam = 10.0.0.3\n"));
    assert_eq!(loaded.config.peers.len(), 1);
}

// ---------------------------------------------------------------------
// cachecast.* keys

/// What a `cachecast.*` case must give.
#[derive(Debug, Clone, Copy)]
enum Ext {
    /// Valid, listening on this address.
    Bind(&'static str),
    /// Valid, the API on this address (and whether `api.bind` was given).
    Api(&'static str, bool),
    /// Valid, this buffer.
    Buffer(usize),
    /// Invalid: an error naming the key and line, containing the text.
    Error(&'static str, Option<usize>, &'static str),
    /// Valid, with a warning naming the key, containing the text.
    Warn(&'static str, &'static str),
}

#[test]
fn cachecast_keys() {
    // Lines 1 and 2; the case's own lines start at 3.
    const BASE: &str =
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n";
    let cases: &[(&str, Ext)] = &[
        ("", Ext::Bind("0.0.0.0:4001")),
        ("", Ext::Api("127.0.0.1:4002", false)),
        ("", Ext::Buffer(65_536)),
        ("cachecast.bind = 127.0.0.1", Ext::Bind("127.0.0.1:4001")),
        (
            "cachecast.bind = 127.0.0.1:5000",
            Ext::Bind("127.0.0.1:5000"),
        ),
        ("cachecast.bind = [::1]:5000", Ext::Bind("[::1]:5000")),
        ("cachecast.bind = ::1", Ext::Bind("[::1]:4001")),
        ("cachecast.bind = [::1]", Ext::Bind("[::1]:4001")),
        ("cachecast.bind =   0.0.0.0  ", Ext::Bind("0.0.0.0:4001")),
        (
            "cluster.instance0.cache.port = 4010",
            Ext::Bind("0.0.0.0:4010"),
        ),
        (
            "cachecast.bind = app1.example.org",
            Ext::Error("cachecast.bind", Some(3), "not a name"),
        ),
        (
            "cachecast.bind = localhost:5000",
            Ext::Error("cachecast.bind", Some(3), "not a name"),
        ),
        (
            "cachecast.bind = 127.0.0.1:0",
            Ext::Error("cachecast.bind", Some(3), "port 0"),
        ),
        (
            "cachecast.bind = 127.0.0.1:70000",
            Ext::Error("cachecast.bind", Some(3), "out of range"),
        ),
        (
            "cachecast.bind = [127.0.0.1]",
            Ext::Error("cachecast.bind", Some(3), "not `address`"),
        ),
        (
            "cachecast.api.port = 5002",
            Ext::Api("127.0.0.1:5002", false),
        ),
        (
            "cachecast.api.port = 0",
            Ext::Error("cachecast.api.port", Some(3), "port 0"),
        ),
        (
            "cachecast.api.port = abc",
            Ext::Error("cachecast.api.port", Some(3), "not a port number"),
        ),
        (
            "cachecast.api.port = 65536",
            Ext::Error("cachecast.api.port", Some(3), "out of range"),
        ),
        (
            "cachecast.api.port = -5",
            Ext::Error("cachecast.api.port", Some(3), "not a port number"),
        ),
        (
            "cachecast.api.port = 4001",
            Ext::Error("cachecast.api.port", Some(3), "share port 4001"),
        ),
        (
            "cluster.instance0.cache.port = 4002",
            Ext::Error("cachecast.api.port", None, "share port 4002"),
        ),
        (
            "cachecast.api.bind = 127.0.0.2",
            Ext::Api("127.0.0.2:4002", true),
        ),
        ("cachecast.api.bind = [::1]", Ext::Api("[::1]:4002", true)),
        (
            "cachecast.api.bind = ::1\ncachecast.api.port = 4100",
            Ext::Api("[::1]:4100", true),
        ),
        (
            "cachecast.api.bind = 10.0.0.1",
            Ext::Warn("cachecast.api.bind", "not a loopback address"),
        ),
        (
            "cachecast.api.bind = localhost",
            Ext::Error("cachecast.api.bind", Some(3), "not an IP address"),
        ),
        (
            "cachecast.api.bind = 127.0.0.1:4100",
            Ext::Error("cachecast.api.bind", Some(3), "not an IP address"),
        ),
        (
            "cachecast.webhook.url = https://127.0.0.1:8080/x",
            Ext::Error("cachecast.webhook.url", Some(3), "not an http:// URL"),
        ),
        (
            "cachecast.webhook.url = http://127.0.0.1:99999/x",
            Ext::Error("cachecast.webhook.url", Some(3), "invalid port number"),
        ),
        (
            "cachecast.webhook.url = http://127.0.0.1:0/x",
            Ext::Error("cachecast.webhook.url", Some(3), "port 0"),
        ),
        (
            "cachecast.webhook.url = http://:8080/x",
            Ext::Error("cachecast.webhook.url", Some(3), "empty host"),
        ),
        (
            "cachecast.webhook.url = http://10.0.0.9:8080/x",
            Ext::Error("cachecast.webhook.url", Some(3), "not a loopback address"),
        ),
        (
            "cachecast.webhook.url = http://10.0.0.9:8080/x\ncachecast.webhook.remote = true",
            Ext::Warn("cachecast.webhook.url", "off this machine"),
        ),
        (
            "cachecast.webhook.url = HTTP://[::1]:8080/x",
            Ext::Bind("0.0.0.0:4001"),
        ),
        ("cachecast.buffer = 1024", Ext::Buffer(1024)),
        ("cachecast.buffer = 16777216", Ext::Buffer(16 * 1024 * 1024)),
        (
            "cachecast.buffer = 0",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer = abc",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer = 16777217",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer = 99999999999999999999999",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer = -1",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer = +5",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer = 1e6",
            Ext::Error("cachecast.buffer", Some(3), "from 1 to"),
        ),
        (
            "cachecast.buffer =",
            Ext::Warn("cachecast.buffer", "not set"),
        ),
        (
            "cachecast.secret = s3cret\ncachecast.secret.file = /etc/dhis2/secret",
            Ext::Error("cachecast.secret", Some(3), "keep one"),
        ),
        (
            "cachecast.tls.cert = /etc/c.pem",
            Ext::Error("cachecast.tls.key", None, "mutual TLS needs all three"),
        ),
        (
            "cachecast.tls.cert = /etc/c.pem",
            Ext::Error("cachecast.tls.ca", None, "cachecast.tls.cert (line 3)"),
        ),
        (
            "cachecast.tls.cert = /etc/c.pem\ncachecast.tls.key = /etc/k.pem",
            Ext::Error("cachecast.tls.ca", None, "mutual TLS needs all three"),
        ),
        (
            "cachecast.tls.ca = /etc/ca.pem\ncachecast.tls.key =",
            Ext::Error("cachecast.tls.cert", None, "cachecast.tls.ca (line 3) is"),
        ),
    ];
    let mut failures = Vec::new();
    for (extra, want) in cases {
        let text = format!("{BASE}{extra}\n");
        let outcome = match parse(text.as_bytes()) {
            Err(e) => Err(e),
            Ok(result) => match (want, result) {
                (Ext::Error(key, line, msg), r) => check(text.as_bytes(), Error(key, *line, msg))
                    .map_err(|e| format!("{e} ({})", r.is_ok())),
                (_, Err(e)) => Err(format!("want valid, got {e}")),
                (Ext::Bind(b), Ok(l)) if l.config.bind.to_string() != *b => {
                    Err(format!("bind {} want {b}", l.config.bind))
                }
                (Ext::Api(a, explicit), Ok(l))
                    if l.config.api.to_string() != *a
                        || l.config.api_bind_explicit != *explicit =>
                {
                    Err(format!(
                        "api {} ({}) want {a} ({explicit})",
                        l.config.api, l.config.api_bind_explicit
                    ))
                }
                (Ext::Buffer(n), Ok(l)) if l.config.buffer != *n => {
                    Err(format!("buffer {} want {n}", l.config.buffer))
                }
                (Ext::Warn(key, msg), Ok(l))
                    if !l
                        .warnings
                        .iter()
                        .any(|p| is_problem(p, Warning, key, Some(3), msg)) =>
                {
                    Err(format!(
                        "want a warning {key} {msg:?}, got:{}",
                        listed(&l.warnings)
                    ))
                }
                _ => Ok(()),
            },
        };
        if let Err(e) = outcome {
            failures.push(format!("  {extra:?}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn cachecast_values() {
    const BASE: &str =
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n";
    let c = valid(&format!(
        "{BASE}cachecast.secret =  s3cret value \ncachecast.tls.cert = /etc/cachecast/node.pem\n\
         cachecast.tls.key = /etc/cachecast/node.key\ncachecast.tls.ca = /etc/cachecast/ca.pem\n\
         cachecast.webhook.url = http://127.0.0.1:8080/api/cache\n"
    ))
    .config;
    assert_eq!(c.secret, Some(SecretSource::Inline("s3cret value".into())));
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "Debug must not print the secret"
    );
    let tls = c.tls.expect("tls");
    assert_eq!(tls.cert, PathBuf::from("/etc/cachecast/node.pem"));
    assert_eq!(tls.key, PathBuf::from("/etc/cachecast/node.key"));
    assert_eq!(tls.ca, PathBuf::from("/etc/cachecast/ca.pem"));
    assert_eq!(
        c.webhook_url.as_deref(),
        Some("http://127.0.0.1:8080/api/cache")
    );

    let c = valid(&format!(
        "{BASE}cachecast.secret.file = /etc/dhis2/cachecast.secret\n"
    ))
    .config;
    assert_eq!(
        c.secret,
        Some(SecretSource::File("/etc/dhis2/cachecast.secret".into()))
    );
    let c = valid(BASE).config;
    assert_eq!((c.secret, c.tls, c.webhook_url), (None, None, None));
}

#[test]
fn every_problem_is_listed() {
    // Problems of different kinds, none hiding another: a format mix, a
    // bad buffer, half a TLS setup, a bad API address.
    let (errors, _) = invalid(
        b"cluster.instance0.hostname = 10.0.0.1\ncluster.members = 10.0.0.2\n\
          cachecast.buffer = lots\ncachecast.tls.cert = /c.pem\ncachecast.api.bind = localhost\n",
    );
    let keys: Vec<&str> = errors.iter().filter_map(|p| p.key.as_deref()).collect();
    for key in [
        "cluster.members",
        "cachecast.buffer",
        "cachecast.tls.key",
        "cachecast.tls.ca",
        "cachecast.api.bind",
    ] {
        assert!(keys.contains(&key), "{key} missing from {errors:#?}");
    }
    // No instance0 and a bad peer port: both.
    let (errors, _) = invalid(
        b"cluster.instance1.hostname = 10.0.0.2\ncluster.instance1.cache.port = x\ncachecast.bind = a name\n",
    );
    let mut keys: Vec<&str> = errors.iter().filter_map(|p| p.key.as_deref()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "cachecast.bind",
            "cluster.instance0.hostname",
            "cluster.instance1.cache.port"
        ],
        "{errors:#?}"
    );
}

// ---------------------------------------------------------------------
// Files

const SERVER_A: &str =
    "cluster.instance0.hostname = 193.157.199.131\ncluster.instance1.hostname = 193.157.199.132\n";

#[test]
fn ten_megabytes_of_other_keys() {
    let mut text = String::with_capacity(10_500_000);
    let mut i = 0usize;
    while text.len() < 10_000_000 {
        use std::fmt::Write;
        let _ = match i % 4 {
            0 => writeln!(
                text,
                "app.setting.{i} = some value of moderate length, number {i}"
            ),
            1 => writeln!(text, "# comment {i}: C:\\users\\dhis2 \\uZZZZ"),
            2 => writeln!(text, "system.long.{i}=part one \\\n    part two {i}"),
            _ => writeln!(
                text,
                "\tconnection.option{i} : jdbc:postgresql://db/dhis2?x={i}\r"
            ),
        };
        i += 1;
    }
    text.push_str("cluster.instance0.hostname = 10.0.0.1\ncluster.instance0.cache.port = 4011\n");
    text.push_str("cluster.instance1.hostname = 10.0.0.2\n");
    let lines = text.lines().count();
    let start = Instant::now();
    let loaded = valid(&text);
    let took = start.elapsed();
    assert_eq!(
        addresses(&loaded.config),
        (
            "10.0.0.1:4011".to_string(),
            vec!["10.0.0.2:4001".to_string()]
        )
    );
    assert_eq!(loaded.config.peers[0].line, Some(lines));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(took < Duration::from_secs(2), "10 MB took {took:?}");
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dhis.conf");
    match config::load(&path) {
        Err(e @ ConfigError::Read { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(
                msg.contains("--config") && msg.contains("DHIS2_HOME"),
                "{msg}"
            );
        }
        other => panic!("want ConfigError::Read, got {other:?}"),
    }
}

#[test]
fn a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    match config::load(dir.path()) {
        Err(e @ ConfigError::NotAFile { .. }) => {
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        other => panic!("want ConfigError::NotAFile, got {other:?}"),
    }
}

#[test]
fn a_file_that_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dhis.conf");
    std::fs::write(&path, SERVER_A).expect("write");
    let loaded = config::load(&path).expect("valid");
    assert_eq!(loaded.config.node.to_string(), "193.157.199.131:4001");
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn an_unreadable_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let path = dir.path().join("dhis.conf");
    std::fs::write(&path, SERVER_A).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).expect("chmod file");
    if is_root() {
        // Root reads anything: run the binary as nobody. A copy of it sits
        // in the temporary directory, so that nobody can surely run it.
        let bin = dir.path().join("cachecast");
        std::fs::copy(env!("CARGO_BIN_EXE_cachecast"), &bin).expect("copy the binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("setpriv (util-linux) must be installed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
        assert!(stderr.contains("permission denied"), "stderr: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "stderr: {stderr}"
        );
    } else {
        match config::load(&path) {
            Err(e @ ConfigError::Read { .. }) => {
                assert!(e.to_string().contains("permission denied"), "{e}");
            }
            other => panic!("want ConfigError::Read, got {other:?}"),
        }
    }
}

#[test]
fn invalid_utf8_on_a_cluster_line() {
    let (errors, _) = invalid(
        b"# A\ncluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.\xff\n",
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].key.as_deref(), Some("cluster.instance1.hostname"));
    assert_eq!(errors[0].line, Some(3));
    assert!(errors[0].message.contains("UTF-8"), "{}", errors[0]);

    // On the continuation line of a cluster key: the error names the
    // entry's first line.
    let (errors, _) = invalid(
        b"cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.\\\n  0.\xe9\n",
    );
    assert!(
        errors.iter().any(|p| is_problem(
            p,
            Severity::Error,
            "cluster.instance1.hostname",
            Some(2),
            "UTF-8"
        )),
        "{errors:#?}"
    );

    // In instance0's line: one error, not also "clustering is off".
    let (errors, _) =
        invalid(b"cluster.instance0.hostname = caf\xe9\ncluster.instance1.hostname = 10.0.0.2\n");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].line, Some(1));
}

#[test]
fn invalid_utf8_on_other_lines() {
    // Latin-1: a password, and comments in Norwegian.
    let loaded = config::parse_bytes(
        b"connection.password = s\xe6cret\n# Tjener A, \xf8st\ncluster.instance0.hostname = 10.0.0.1\n\
          cluster.instance1.hostname = 10.0.0.2\n# \xe5\n",
    )
    .expect("valid");
    assert_eq!(addresses(&loaded.config).1, ["10.0.0.2:4001"]);
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    let w = &loaded.warnings[0];
    assert_eq!((w.severity, w.line), (Warning, Some(1)));
    assert!(
        w.message.contains("UTF-8") && w.message.contains("also lines 2, 5"),
        "{w}"
    );
}

// ---------------------------------------------------------------------
// locate()

#[test]
fn locate() {
    let explicit = Path::new("/etc/cachecast/dhis.conf");
    let home = std::ffi::OsStr::new("/home/dhis2");
    let empty = std::ffi::OsStr::new("");
    let cases: [(Option<&Path>, Option<&std::ffi::OsStr>, &str); 5] = [
        (Some(explicit), Some(home), "/etc/cachecast/dhis.conf"),
        (Some(explicit), None, "/etc/cachecast/dhis.conf"),
        (None, Some(home), "/home/dhis2/dhis.conf"),
        (None, None, "/opt/dhis2/dhis.conf"),
        (None, Some(empty), "/opt/dhis2/dhis.conf"),
    ];
    for (flag, env, want) in cases {
        assert_eq!(
            config::locate(flag, env),
            PathBuf::from(want),
            "{flag:?} {env:?}"
        );
    }
    assert_eq!(config::DEFAULT_PATH, "/opt/dhis2/dhis.conf");
}

// ---------------------------------------------------------------------
// resolve()

const RESOLVE_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn resolve_same_address_same_port() {
    let loaded =
        valid("cluster.instance0.hostname = localhost\ncluster.instance1.hostname = 127.0.0.1\n");
    let (_, problems) = config::resolve(&loaded.config, RESOLVE_WITHIN);
    assert!(
        problems.iter().any(|p| is_problem(
            p,
            Severity::Error,
            "cluster.instance1",
            Some(2),
            "cannot peer with itself"
        )),
        "{problems:#?}"
    );

    let loaded = valid(
        "cluster.instance0.hostname = 127.0.0.1\ncluster.instance0.cache.port = 4001\n\
         cluster.instance1.hostname = localhost\ncluster.instance1.cache.port = 4002\n\
         cluster.instance2.hostname = 127.0.0.1\ncluster.instance2.cache.port = 4002\n",
    );
    let (_, problems) = config::resolve(&loaded.config, RESOLVE_WITHIN);
    assert!(
        problems.iter().any(|p| is_problem(
            p,
            Severity::Error,
            "cluster.instance2",
            Some(5),
            "the same node twice"
        )),
        "{problems:#?}"
    );
}

#[test]
fn resolve_same_address_different_ports() {
    let loaded = valid(
        "cluster.instance0.hostname = localhost\ncluster.instance1.hostname = 127.0.0.1\n\
         cluster.instance1.cache.port = 4002\n",
    );
    let (resolved, problems) = config::resolve(&loaded.config, RESOLVE_WITHIN);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(resolved.len(), 2);
    let lo: IpAddr = "127.0.0.1".parse().expect("ip");
    assert_eq!(resolved[1].ips.as_deref(), Ok(&[lo][..]));
    assert!(resolved[0].ips.as_ref().is_ok_and(|ips| ips.contains(&lo)));
}

#[test]
fn resolve_unknown_name_is_a_warning() {
    // `.invalid` is reserved (RFC 2606): it never resolves.
    let loaded = valid(
        "cluster.instance0.hostname = 127.0.0.1\ncluster.instance1.hostname = nosuchhost.invalid\n",
    );
    let (resolved, problems) = config::resolve(&loaded.config, RESOLVE_WITHIN);
    assert!(resolved[1].ips.is_err());
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        is_problem(
            &problems[0],
            Warning,
            "cluster.instance1",
            Some(2),
            "does not resolve"
        ),
        "{problems:#?}"
    );
}

#[test]
fn resolve_ip_literals_without_lookup() {
    let loaded = valid(SERVER_A);
    let (resolved, problems) = config::resolve(&loaded.config, RESOLVE_WITHIN);
    assert!(problems.is_empty(), "{problems:#?}");
    let ips: Vec<String> = resolved
        .iter()
        .flat_map(|r| r.ips.clone().unwrap_or_default())
        .map(|ip| ip.to_string())
        .collect();
    assert_eq!(ips, ["193.157.199.131", "193.157.199.132"]);
}

// ---------------------------------------------------------------------
// Never a panic; an invalid file always says why.

fn invariants(bytes: &[u8]) -> Result<(), String> {
    match parse(bytes)? {
        Ok(loaded) => match loaded
            .warnings
            .iter()
            .find(|p| p.severity == Severity::Error)
        {
            Some(p) => Err(format!("an error among the warnings: {p}")),
            None => Ok(()),
        },
        Err(ConfigError::Invalid { errors, warnings }) => {
            if errors.is_empty() {
                Err("invalid, with no error".into())
            } else if let Some(p) = errors.iter().find(|p| p.severity != Severity::Error) {
                Err(format!("a non-error among the errors: {p}"))
            } else if let Some(p) = warnings.iter().find(|p| p.severity == Severity::Error) {
                Err(format!("an error among the warnings: {p}"))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(format!("unexpected {e:?}")),
    }
}

#[test]
fn every_truncation_of_a_file() {
    let text = "\u{FEFF}# A\r\ncluster.instance0.hostname = 10.0.\\\r\n 0.1\r\ncluster.instance0.cache.port : 4001\n\
                cluster.instance1.hostname [::1]\ncluster.instance1.cache.port=\\u0034002\n\
                cachecast.secret = \\u00e9t\u{e9}\ncachecast.tls.cert /c\n! end\\";
    let bytes = text.as_bytes();
    for n in 0..=bytes.len() {
        if let Err(e) = invariants(&bytes[..n]) {
            panic!("{e}\n  bytes: {:?}", String::from_utf8_lossy(&bytes[..n]));
        }
    }
}

fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "cluster.instance",
        "0",
        "1",
        "4",
        "5",
        "99",
        ".hostname",
        ".cache.port",
        ".hostnme",
        ".cache.remote.object.port",
        "cluster.hostname",
        "cluster.members",
        "cluster.cache.port",
        "cachecast.bind",
        "cachecast.api.port",
        "cachecast.tls.cert",
        "cachecast.buffer",
        " = ",
        "=",
        ":",
        " ",
        "\t",
        "\n",
        "\r\n",
        "\r",
        "\\",
        "\\u",
        "\\u0031",
        "00",
        "#",
        "!",
        ",",
        "[",
        "]",
        "::1",
        "10.0.0.1",
        "10.0.0.2",
        "localhost",
        "4001",
        "65536",
        "\u{e9}",
        "\u{FEFF}",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(invariants(&bytes), Ok(()));
    }

    #[test]
    fn never_panics_on_near_configs(tokens in prop::collection::vec(token(), 0..40)) {
        let text = tokens.concat();
        prop_assert_eq!(invariants(text.as_bytes()), Ok(()), "{:?}", text);
    }
}

#[test]
fn a_huge_value_is_quoted_shortened() {
    let text = format!(
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance0.cache.port = {}\n",
        "9".repeat(100_000)
    );
    let (errors, _) = invalid(text.as_bytes());
    let e = errors
        .iter()
        .find(|p| p.key.as_deref() == Some("cluster.instance0.cache.port"))
        .expect("the port error");
    assert!(e.message.len() < 500, "{} bytes", e.message.len());
    assert!(e.message.ends_with("more bytes)"), "{}", e.message);
}

/// DHIS 2's `redis.*` keys and ours decide the Redis-protocol endpoint.
#[test]
fn the_redis_protocol_endpoint() {
    const BASE: &str =
        "cluster.instance0.hostname = 10.0.0.1\ncluster.instance1.hostname = 10.0.0.2\n";
    const ON: &str = "redis.cache.invalidation.enabled = on\n";
    // (extra lines, listen addresses or "" for off, password, text of `why`)
    let on: &[(&str, &str, Option<&str>, &str)] = &[
        ("", "", None, "off: neither"),
        (
            "redis.host = localhost\nredis.port = 6380\n",
            "",
            None,
            "off: neither",
        ),
        (ON, "127.0.0.1:6379 [::1]:6379", None, "on: redis.cache"),
        (
            "redis.cache.invalidation.enabled = true\nredis.host = 127.0.0.1\nredis.port = 7000\nredis.password = pw\n",
            "127.0.0.1:7000",
            Some("pw"),
            "on: redis.cache",
        ),
        (
            "redis.cache.invalidation.enabled = on\nredis.host = ::1\n",
            "[::1]:6379",
            None,
            "on",
        ),
        (
            "redis.cache.invalidation.enabled = on\nredis.host = redis.example.org\n",
            "",
            None,
            "is not this machine",
        ),
        (
            "redis.cache.invalidation.enabled = on\nredis.enabled = on\n",
            "",
            None,
            "redis.enabled = on",
        ),
        (
            "redis.cache.invalidation.enabled = off\n",
            "",
            None,
            "off: neither",
        ),
        (
            "cachecast.resp.port = 6390\n",
            "127.0.0.1:6390",
            None,
            "cachecast.resp.port is set",
        ),
        (
            "cachecast.resp.port = 6390\ncachecast.resp.bind = 127.0.0.5\nredis.password = x\n",
            "127.0.0.5:6390",
            Some("x"),
            "cachecast.resp.port",
        ),
        (
            "redis.cache.invalidation.enabled = on\nredis.enabled = on\ncachecast.resp.port = 6390\n",
            "127.0.0.1:6390",
            None,
            "cachecast.resp.port",
        ),
        (
            "redis.cache.invalidation.enabled = on\ncachecast.resp.bind = 127.0.0.9\n",
            "127.0.0.9:6379",
            None,
            "on",
        ),
        // An escaped or misspelt redis key is the application's business.
        (
            "redis.cache.invalidation.enabled = on\nredis.hots = elsewhere\nredis.other = 1\n",
            "127.0.0.1:6379 [::1]:6379",
            None,
            "on",
        ),
    ];
    for (extra, listen, password, why) in on {
        let loaded = valid(&format!("{BASE}{extra}"));
        let c = loaded.config;
        let addrs = c
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
        assert_eq!(addrs, *listen, "{extra:?}");
        assert_eq!(
            c.resp.as_ref().and_then(|r| r.password.as_deref()),
            *password,
            "{extra:?}"
        );
        assert!(c.resp_why.contains(why), "{extra:?}: {}", c.resp_why);
        if let Some(p) = password {
            assert!(
                !format!("{c:?}").contains(&format!("\"{p}\"")),
                "Debug must not print the password"
            );
        }
        assert!(
            loaded
                .warnings
                .iter()
                .all(|w| !w.key.as_deref().unwrap_or("").starts_with("redis.h")),
            "{extra:?}: {:?}",
            loaded.warnings
        );
    }
    let errors: &[(&str, &str, usize, &str)] = &[
        (
            "redis.cache.invalidation.enabled = on\nredis.use.ssl = true\n",
            "redis.use.ssl",
            4,
            "speak TLS to its sidecar",
        ),
        // DHIS 2 reads redis.use.ssl with `isOn`, as every on/off key.
        (
            "redis.cache.invalidation.enabled = on\nredis.use.ssl = on\n",
            "redis.use.ssl",
            4,
            "speak TLS to its sidecar",
        ),
        (
            "redis.cache.invalidation.enabled = on\nredis.port = 70000\n",
            "redis.port",
            4,
            "out of range",
        ),
        (
            "cachecast.resp.port = 4001\n",
            "cachecast.resp.port",
            3,
            "the listener for peers",
        ),
        (
            "cachecast.resp.port = 4002\n",
            "cachecast.resp.port",
            3,
            "the sidecar's API",
        ),
        (
            "cachecast.resp.port = x\n",
            "cachecast.resp.port",
            3,
            "not a port number",
        ),
        (
            "cachecast.resp.port = 6390\ncachecast.resp.bind = localhost\n",
            "cachecast.resp.bind",
            4,
            "not an IP address",
        ),
        (
            "redis.cache.invalidation.enabled = on\nredis.port = 4001\n",
            "redis.port",
            4,
            "would share port 4001",
        ),
        (
            "cachecast.flush.url = ftp://127.0.0.1/x\n",
            "cachecast.flush.url",
            3,
            "not an http:// or https:// URL",
        ),
        (
            "cachecast.flush.url = http://admin:district@127.0.0.1/x\n",
            "cachecast.flush.url",
            3,
            "holds credentials",
        ),
        (
            "cachecast.flush.url = http://127.0.0.1:0/x\n",
            "cachecast.flush.url",
            3,
            "port 0",
        ),
    ];
    for (extra, key, line, msg) in errors {
        let text = format!("{BASE}{extra}");
        if let Err(e) = check(text.as_bytes(), Error(key, Some(*line), msg)) {
            panic!("{extra:?}: {e}");
        }
    }
    let loaded = valid(&format!(
        "{BASE}cachecast.flush.url = http://10.0.0.5:8080/api/maintenance/cacheClear\ncachecast.flush.credentials.file = /etc/cachecast/flush\n"
    ));
    let hook = loaded.config.flush_hook.expect("hook");
    assert_eq!(hook.url, "http://10.0.0.5:8080/api/maintenance/cacheClear");
    assert_eq!(
        hook.credentials,
        Some(PathBuf::from("/etc/cachecast/flush"))
    );
    assert!(
        loaded.warnings.iter().any(|w| is_problem(
            w,
            Warning,
            "cachecast.flush.url",
            Some(3),
            "clear text"
        )),
        "{:?}",
        loaded.warnings
    );
    let loaded = valid(&format!(
        "{BASE}cachecast.flush.url = https://dhis2.example.org/api/maintenance/cacheClear\n"
    ));
    assert!(
        !loaded
            .warnings
            .iter()
            .any(|w| w.message.contains("clear text"))
    );
    assert!(
        loaded.warnings.iter().any(|w| is_problem(
            w,
            Warning,
            "cachecast.flush.url",
            Some(3),
            "without authentication"
        )),
        "{:?}",
        loaded.warnings
    );
    // redis.* keys that do not point here are the application's, whatever
    // they hold.
    let loaded = valid(&format!(
        "{BASE}redis.port = 70000\nredis.host = redis.example.org\n"
    ));
    assert!(loaded.config.resp.is_none());
    // An explicit port that DHIS 2 does not use is reported.
    let loaded = valid(&format!(
        "{BASE}redis.cache.invalidation.enabled = on\ncachecast.resp.port = 6390\n"
    ));
    assert!(
        loaded.warnings.iter().any(|w| is_problem(
            w,
            Warning,
            "cachecast.resp.port",
            Some(4),
            "will not reach the sidecar"
        )),
        "{:?}",
        loaded.warnings
    );
}
