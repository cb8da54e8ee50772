//! Reading the properties file: its lines, keys and values as the Java
//! properties format has them, what each key is, and how problems are
//! reported (named by key and line).

use std::collections::BTreeMap;

use super::*;

/// A value read from the file, with its line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    /// The value as DHIS 2 has it: unescaped, `${VAR}` substituted, then
    /// trimmed.
    pub(crate) value: String,
    /// The first physical line of the entry.
    pub(crate) line: usize,
    /// The line could not be read (bad UTF-8, a malformed escape); an
    /// error was reported, and the value must not be used.
    pub(crate) broken: bool,
    /// The environment variables the value refers to (`check` lists
    /// them), empty when it refers to none.
    pub(crate) variables: Vec<String>,
    /// What substitution left as written or stopped on: reported where
    /// the value is used (DHIS 2 would read the text as written).
    pub(crate) unresolved: Vec<String>,
}

impl Entry {
    /// Whether the key counts as set: a non-empty value, or one that was
    /// there but could not be read.
    pub(crate) fn present(&self) -> bool {
        self.broken || !self.value.is_empty()
    }
}

/// Longest message a problem keeps: messages quote values, and a value
/// can be a megabyte long.
pub(crate) const MAX_MESSAGE: usize = 400;

/// Cuts a message to [`MAX_MESSAGE`] bytes (on a character boundary),
/// saying how much was left out.
pub(crate) fn shorten(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut cut = MAX_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let left = message.len() - cut;
    message.truncate(cut);
    message.push_str(&format!("… ({left} more bytes)"));
    message
}

/// Collects problems while the file is read.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) problems: Vec<Problem>,
}

impl Report {
    pub(crate) fn push(
        &mut self,
        severity: Severity,
        key: &str,
        line: Option<usize>,
        message: String,
    ) {
        self.problems.push(Problem {
            severity,
            key: (!key.is_empty()).then(|| key.to_string()),
            line,
            message: shorten(message),
        });
    }
    pub(crate) fn error(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.push(Severity::Error, key, line, message.into());
    }
    pub(crate) fn warn(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.push(Severity::Warning, key, line, message.into());
    }
    pub(crate) fn note(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.push(Severity::Note, key, line, message.into());
    }
}

/// The file's physical lines. As in Java, `\n`, `\r\n` and a lone `\r`
/// each end a line. (`str::split_inclusive` and `contains` search with
/// `memchr`, which keeps a 10 MB file quick even in a debug build.)
pub(crate) fn physical_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    for piece in text.split_inclusive('\n') {
        let body = match piece.strip_suffix('\n') {
            Some(body) => body.strip_suffix('\r').unwrap_or(body),
            None => piece,
        };
        if body.contains('\r') {
            lines.extend(body.split('\r'));
        } else {
            lines.push(body);
        }
    }
    lines
}

/// Java's white space in a properties file: space, tab, form feed.
pub(crate) const WHITE: [char; 3] = [' ', '\t', '\x0c'];

/// Whether a physical line continues on the next (an odd number of
/// trailing backslashes).
pub(crate) fn continues(line: &str) -> bool {
    (line.len() - line.trim_end_matches('\\').len()) % 2 == 1
}

/// The key of a logical line as written (escapes not yet undone): up to
/// the first unescaped `=`, `:` or white space.
pub(crate) fn raw_key(line: &str) -> &str {
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '=' | ':' | ' ' | '\t' | '\x0c' => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Whether `key` starts with `prefix`, ignoring ASCII case.
pub(crate) fn starts_with_ci(key: &str, prefix: &str) -> bool {
    key.len() >= prefix.len()
        && key.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Whether a key is ours to read: under `cluster.` or `cachecast.`. The
/// case is ignored here so that `Cluster.instance0.hostname` is reported
/// (keys are case-sensitive) rather than silently skipped.
pub(crate) fn is_ours(key: &str) -> bool {
    starts_with_ci(key, CLUSTER) || starts_with_ci(key, OURS) || REDIS_KEYS.contains(&key)
}

/// Whether a key written with escapes may turn out to be ours: the text
/// before its first `\` is literal, so `redis.pass\u` cannot be, while
/// `\u0063luster.x` or `cluster.instance0.host\u006eame` can. (DHIS 2's
/// `redis.*` keys are read only as written plainly: they are the
/// application's, and a malformed escape in one is none of ours.)
pub(crate) fn could_be_ours(raw: &str) -> bool {
    let literal = raw.split('\\').next().unwrap_or_default();
    [CLUSTER, OURS]
        .iter()
        .any(|p| starts_with_ci(literal, p) || starts_with_ci(p, literal))
}

/// One logical line, parsed by `java-properties`: its key and value with
/// escapes undone.
pub(crate) fn parse_entry(text: &str) -> Result<(String, String), String> {
    let mut lines =
        java_properties::PropertiesIter::new_with_encoding(text.as_bytes(), encoding_rs::UTF_8);
    match lines.next() {
        Some(Ok(line)) => match line.consume_content() {
            java_properties::LineContent::KVPair(key, value) => Ok((key, value)),
            java_properties::LineContent::Comment(_) => Err("not a `key = value` line".into()),
        },
        Some(Err(e)) => {
            // The crate's message ends with its own line number, which
            // counts from this one line: drop it, ours is in the problem.
            let text = e.to_string();
            Err(match text.find(" (line_number") {
                Some(i) => text[..i].to_string(),
                None => text,
            })
        }
        None => Err("not a `key = value` line".into()),
    }
}

/// Our keys with their values and lines; the last of a repeated key wins,
/// with a warning.
///
/// The file is split into logical lines here (comments, `\` continuations,
/// any line ending); only a line whose key is ours goes through the
/// `java-properties` parser. So nothing in the rest of the file (a comment
/// holding `C:\users`, a password with a stray `\u`) can stop the cluster
/// keys from being read, and a 10 MB file costs little.
pub(crate) fn read_keys(
    bytes: &[u8],
    env: Lookup<'_>,
    report: &mut Report,
) -> BTreeMap<String, Entry> {
    let (text, lossy) = match std::str::from_utf8(bytes) {
        Ok(text) => (std::borrow::Cow::Borrowed(text), false),
        Err(_) => (String::from_utf8_lossy(bytes), true),
    };
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let lines = physical_lines(text);
    // dhis.conf is UTF-8 in practice. A line that is not is an error if it
    // belongs to one of our keys, else only a warning (it may be a Latin-1
    // comment or password of the application's, which is none of ours).
    let bad_utf8: Vec<usize> = if lossy {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(char::REPLACEMENT_CHARACTER))
            .map(|(i, _)| i + 1)
            .collect()
    } else {
        Vec::new()
    };
    let mut bad_ours: Vec<usize> = Vec::new();
    let mut keys: BTreeMap<String, Entry> = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let number = i + 1;
        let first = lines[i].trim_start_matches(WHITE);
        if first.is_empty() || first.starts_with(['#', '!']) {
            i += 1;
            continue;
        }
        // Join continuation lines; a `\` on the file's last line is
        // dropped, as Java does.
        let mut last = i;
        let mut logical = std::borrow::Cow::Borrowed(first);
        while continues(lines[last]) {
            logical.to_mut().pop();
            if last + 1 == lines.len() {
                break;
            }
            last += 1;
            logical
                .to_mut()
                .push_str(lines[last].trim_start_matches(WHITE));
        }
        i = last + 1;

        let raw = raw_key(&logical);
        let key = if raw.contains('\\') {
            if !could_be_ours(raw) {
                continue;
            }
            match parse_entry(raw) {
                Ok((key, _)) => key,
                Err(e) => {
                    report.warn(
                        "",
                        Some(number),
                        format!(
                            "the key `{raw}` has a malformed escape ({e}); the line is ignored"
                        ),
                    );
                    continue;
                }
            }
        } else if is_ours(raw) {
            raw.to_string()
        } else {
            continue;
        };
        if !is_ours(&key) {
            continue;
        }
        let span = number..=last + 1;
        let entry = if bad_utf8.iter().any(|l| span.contains(l)) {
            bad_ours.extend(bad_utf8.iter().filter(|l| span.contains(l)));
            report.error(
                &key,
                Some(number),
                "not valid UTF-8 (save the file as UTF-8); the value is not used",
            );
            if key.contains(char::REPLACEMENT_CHARACTER) {
                continue;
            }
            Entry {
                line: number,
                broken: true,
                ..Entry::default()
            }
        } else {
            match parse_entry(&logical) {
                Ok((_, value)) => {
                    // As DHIS 2: substitute, then trim as Java does.
                    let s = substitute(&value, env);
                    Entry {
                        value: java_trim(&s.value).to_string(),
                        line: number,
                        broken: false,
                        variables: s.variables,
                        unresolved: s.problems,
                    }
                }
                Err(e) => {
                    report.error(&key, Some(number), format!("{e}; the value is not used"));
                    Entry {
                        line: number,
                        broken: true,
                        ..Entry::default()
                    }
                }
            }
        };
        if let Some(old) = keys.insert(key.clone(), entry) {
            report.warn(
                &key,
                Some(number),
                format!(
                    "set again (first on line {}); the last value wins",
                    old.line
                ),
            );
        }
    }
    let others: Vec<usize> = bad_utf8
        .into_iter()
        .filter(|l| !bad_ours.contains(l))
        .collect();
    if let Some((&first, rest)) = others.split_first() {
        let also = match rest.len() {
            0 => String::new(),
            n if n <= 10 => format!(
                " (also line{} {})",
                if n == 1 { "" } else { "s" },
                rest.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            n => format!(" (and {n} more lines)"),
        };
        report.warn(
            "",
            Some(first),
            format!("not valid UTF-8{also}; not a cluster key, so it is ignored"),
        );
    }
    keys
}

/// The value of a key: `Ok(None)` when absent or empty ("not set", warned
/// about once, in [`build`]); `Err` when it could not be read (reported).
pub(crate) fn value<'a>(
    keys: &'a BTreeMap<String, Entry>,
    key: &str,
) -> Result<Option<&'a Entry>, ()> {
    match keys.get(key) {
        Some(e) if e.broken => Err(()),
        Some(e) if !e.value.is_empty() => Ok(Some(e)),
        _ => Ok(None),
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The key of ours an unknown key was probably meant to be, concrete:
/// `cluster.instance1.hostnme` → `cluster.instance1.hostname`.
pub(crate) fn suggestion(key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    // Compare `cluster.instance3.hostnme` as `cluster.instanceN.hostnme`.
    let (normalised, number) = match lower.strip_prefix("cluster.instance") {
        Some(rest) => {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let n = rest[..digits].trim_start_matches('0');
            let n = if n.is_empty() { "0" } else { n };
            (
                format!("cluster.instanceN{}", &rest[digits..]),
                (digits > 0).then(|| n.to_string()),
            )
        }
        None => (lower.clone(), None),
    };
    let (_, best) = KNOWN_KEYS
        .iter()
        .map(|k| (distance(&normalised, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()?;
    let concrete = match (best.strip_prefix("cluster.instanceN"), number) {
        (Some(field), Some(n)) => format!("cluster.instance{n}{field}"),
        _ => best.to_string(),
    };
    (concrete != key).then_some(concrete)
}

/// An unknown key under one of our prefixes: a warning when it looks like
/// one of ours (a typo, a case slip) or sits in our own namespace, else a
/// note (`cluster.` is DHIS 2's, which may have keys we do not read).
pub(crate) fn unknown_key(key: &str, entry: &Entry, report: &mut Report) {
    const IGNORED: &str = "not a key cachecast reads, ignored";
    match suggestion(key) {
        Some(s) => report.warn(
            key,
            Some(entry.line),
            format!("{IGNORED} (did you mean `{s}`?)"),
        ),
        None if starts_with_ci(key, OURS) || starts_with_ci(key, "cluster.instance") => {
            report.warn(key, Some(entry.line), IGNORED)
        }
        None => report.note(key, Some(entry.line), IGNORED),
    }
}

pub(crate) fn warn_empty(key: &str, entry: &Entry, report: &mut Report) {
    if !entry.present() {
        report.warn(key, Some(entry.line), "empty value: treated as not set");
    }
}

/// Keeps the entry with the lowest line.
pub(crate) fn first_of<'a>(seen: &mut Option<(&'a str, usize)>, key: &'a str, line: usize) {
    if seen.is_none_or(|(_, l)| line < l) {
        *seen = Some((key, line));
    }
}
