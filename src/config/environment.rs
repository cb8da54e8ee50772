//! `${VAR}` in a value, replaced from the environment as DHIS 2 does.
//!
//! DHIS 2 (`DefaultDhisConfigurationProvider`, every release the drop-in
//! serves) runs every value of `dhis.conf` through Apache Commons Text's
//! `StringSubstitutor` over `System.getenv()`, then trims it. That
//! substitutor's defaults are what this module follows:
//! - `${NAME}` ends at the first `}`; no nesting inside a name;
//! - `${NAME:-default}` gives `default` when `NAME` is not set (set but
//!   empty is not "not set");
//! - `$${NAME}` is the text `${NAME}`, not substituted;
//! - a variable's value is substituted in turn, and a variable that
//!   refers back to itself stops DHIS 2 ("infinite loop in property
//!   interpolation");
//! - a variable that is not set, or a `${` with no `}` after it, is left
//!   as written (and nothing after such a `${` is substituted).
//!
//! DHIS 2 keeps what it leaves as written; the sidecar reports it
//! instead (see [`Substituted::problems`]), since `${REDIS_PW}` as a
//! password or host name is never what an operator meant.

use std::ffi::OsString;

/// Where variables are looked up: the process environment in
/// [`super::load`], a map in tests.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// The process environment, as Java's `System.getenv().get(name)` sees
/// it: a name that no variable can have is simply not set.
pub fn process_environment(name: &str) -> Option<OsString> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return None;
    }
    std::env::var_os(name)
}

/// A value after substitution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Substituted {
    /// The value as DHIS 2 has it (before trimming).
    pub(crate) value: String,
    /// The variables referred to, in order of first use, each once.
    pub(crate) variables: Vec<String>,
    /// What DHIS 2 leaves as written or stops on, one sentence each.
    pub(crate) problems: Vec<String>,
}

/// Deepest chain of variables whose values refer to further variables;
/// beyond it (never in a sane environment) substitution stops.
const MAX_DEPTH: usize = 32;

/// Longest value substitution may build, and most variables it may
/// replace in one value: variables whose values repeat other variables
/// can grow a value exponentially.
const MAX_CHARS: usize = 65_536;
const MAX_REPLACED: usize = 1_024;

/// Replaces `${VAR}` in `text` as DHIS 2 does.
pub(crate) fn substitute(text: &str, env: Lookup<'_>) -> Substituted {
    let mut out = Substituted::default();
    if !text.contains("${") {
        out.value = text.to_string();
        return out;
    }
    let mut buf: Vec<char> = text.chars().collect();
    let len = buf.len();
    let mut state = State {
        env,
        out: &mut out,
        prior: Vec::new(),
        stopped: false,
        replaced: 0,
    };
    state.range(&mut buf, 0, len);
    out.value = buf.into_iter().collect();
    out
}

struct State<'a, 'b> {
    env: Lookup<'a>,
    out: &'b mut Substituted,
    /// The variables being substituted, outermost first (to find cycles).
    prior: Vec<String>,
    /// A problem that stops DHIS 2 was met: nothing more is replaced.
    stopped: bool,
    /// Variables replaced so far.
    replaced: usize,
}

impl State<'_, '_> {
    fn problem(&mut self, message: String) {
        if !self.out.problems.contains(&message) {
            self.out.problems.push(message);
        }
    }

    fn uses(&mut self, name: &str) {
        if !self.out.variables.iter().any(|v| v == name) {
            self.out.variables.push(name.to_string());
        }
    }

    /// Substitutes within `buf[offset..offset + length]`; returns how much
    /// longer (or shorter) that range became.
    fn range(&mut self, buf: &mut Vec<char>, offset: usize, length: usize) -> isize {
        let mut grown: isize = 0;
        let mut end = offset + length;
        let mut pos = offset;
        let mut escape: Option<usize> = None;
        'outer: while pos < end && !self.stopped {
            if !starts_variable(buf, pos, end) {
                pos += 1;
                continue;
            }
            if pos > offset && buf[pos - 1] == '$' {
                escape = Some(pos - 1);
            }
            let start = pos;
            pos += 2;
            while pos < end && buf[pos] != '}' {
                pos += 1;
            }
            if pos >= end {
                // No `}`: the substitutor gives up on the rest of the text.
                let rest: String = buf[start..end].iter().take(40).collect();
                if escape.is_none() {
                    self.problem(format!(
                        "`{rest}` has no closing `}}`: DHIS 2 reads it as written, and substitutes nothing after it"
                    ));
                }
                break;
            }
            if let Some(at) = escape.take() {
                // `$${X}`: drop one `$`, keep `${X}` as text.
                buf.remove(at);
                grown -= 1;
                end -= 1;
                pos = start + 1;
                continue 'outer;
            }
            let expr: String = buf[start + 2..pos].iter().collect();
            pos += 1;
            let var_end = pos;
            let (name, default) = split_default(&expr);
            if self.prior.contains(&name) {
                let chain = self
                    .prior
                    .iter()
                    .chain(std::iter::once(&name))
                    .map(|v| format!("${{{v}}}"))
                    .collect::<Vec<_>>()
                    .join(" → ");
                self.problem(format!(
                    "the environment variables refer to each other ({chain}): DHIS 2 stops at start (infinite loop in property interpolation)"
                ));
                self.stopped = true;
                return grown;
            }
            if self.prior.len() >= MAX_DEPTH {
                self.problem(format!(
                    "`${{{name}}}`: variables refer to further variables more than {MAX_DEPTH} deep; not substituted"
                ));
                self.stopped = true;
                return grown;
            }
            self.uses(&name);
            let value = match (self.env)(&name).map(OsString::into_string) {
                Some(Ok(v)) => Some(v),
                Some(Err(_)) => {
                    self.problem(format!(
                        "the environment variable {name} is not valid UTF-8"
                    ));
                    self.stopped = true;
                    return grown;
                }
                None => default,
            };
            let Some(value) = value else {
                self.problem(format!(
                    "the environment variable {name} is not set: DHIS 2 would read `${{{name}}}` as written (set it for the sidecar as for DHIS 2, or write `$${{{name}}}` for the text itself)"
                ));
                continue 'outer;
            };
            let chars: Vec<char> = value.chars().collect();
            let added = chars.len();
            self.replaced += 1;
            if buf.len() - (var_end - start) + added > MAX_CHARS || self.replaced > MAX_REPLACED {
                self.problem(format!(
                    "`${{{name}}}`: the value would grow beyond {MAX_CHARS} characters or {MAX_REPLACED} variables; not substituted"
                ));
                self.stopped = true;
                return grown;
            }
            buf.splice(start..var_end, chars);
            self.prior.push(name);
            let inner = self.range(buf, start, added);
            self.prior.pop();
            let change = inner + added as isize - (var_end - start) as isize;
            pos = pos.saturating_add_signed(change);
            end = end.saturating_add_signed(change);
            grown += change;
        }
        grown
    }
}

/// Whether `${` starts at `pos`, within `end`.
fn starts_variable(buf: &[char], pos: usize, end: usize) -> bool {
    pos + 1 < end && buf[pos] == '$' && buf[pos + 1] == '{'
}

/// `NAME:-default` → the name and the default; the search for `:-` stops
/// at a `${` inside the name, as the substitutor's does.
fn split_default(expr: &str) -> (String, Option<String>) {
    let chars: Vec<char> = expr.chars().collect();
    for i in 0..chars.len() {
        if starts_variable(&chars, i, chars.len()) {
            break;
        }
        if chars[i] == ':' && chars.get(i + 1) == Some(&'-') {
            return (
                chars[..i].iter().collect(),
                Some(chars[i + 2..].iter().collect()),
            );
        }
    }
    (expr.to_string(), None)
}

/// Java's `String.trim()`: every character up to U+0020 at either end,
/// control characters included, and nothing else (not U+00A0).
pub(crate) fn java_trim(s: &str) -> &str {
    s.trim_matches(|c: char| c <= ' ')
}

#[cfg(test)]
mod tests {
    //! The substitutor's rules, case by case. Each expected value is what
    //! Commons Text's `StringSubstitutor(System.getenv()).replace(..)`
    //! gives with the same environment.
    use super::*;

    fn env(name: &str) -> Option<OsString> {
        let value = match name {
            "HOST" => "10.0.0.2",
            "PW" => "s3cret",
            "EMPTY" => "",
            "NESTED" => "${HOST}",
            "SELF" => "${SELF}",
            "A" => "${B}",
            "B" => "${A}",
            "SPACED" => "  x  ",
            "DOLLAR" => "$${HOST}",
            _ => return None,
        };
        Some(value.into())
    }

    fn sub(text: &str) -> Substituted {
        substitute(text, &env)
    }

    #[test]
    fn cases() {
        // (written, value, variables, problem text or "")
        let cases: &[(&str, &str, &[&str], &str)] = &[
            ("plain", "plain", &[], ""),
            ("${HOST}", "10.0.0.2", &["HOST"], ""),
            ("a${HOST}b${PW}", "a10.0.0.2bs3cret", &["HOST", "PW"], ""),
            ("${EMPTY}", "", &["EMPTY"], ""),
            ("${NESTED}", "10.0.0.2", &["NESTED", "HOST"], ""),
            ("${SPACED}", "  x  ", &["SPACED"], ""),
            (
                "${MISSING}",
                "${MISSING}",
                &["MISSING"],
                "MISSING is not set",
            ),
            ("${MISSING:-dflt}", "dflt", &["MISSING"], ""),
            ("${MISSING:-}", "", &["MISSING"], ""),
            ("${HOST:-dflt}", "10.0.0.2", &["HOST"], ""),
            ("${EMPTY:-dflt}", "", &["EMPTY"], ""),
            ("$${HOST}", "${HOST}", &[], ""),
            ("$$${HOST}", "$${HOST}", &[], ""),
            ("$HOST", "$HOST", &[], ""),
            ("${HOST", "${HOST", &[], "no closing"),
            ("${HOST} ${PW", "10.0.0.2 ${PW", &["HOST"], "no closing"),
            ("${PW ${HOST}", "${PW ${HOST}", &["PW ${HOST"], "not set"),
            ("${}", "${}", &[""], "not set"),
            ("${DOLLAR}", "${HOST}", &["DOLLAR"], ""),
            ("${SELF}", "", &["SELF"], "refer to each other"),
            ("${A}", "", &["A", "B"], "refer to each other"),
            ("${HOST}${HOST}", "10.0.0.210.0.0.2", &["HOST"], ""),
        ];
        for (written, value, variables, problem) in cases {
            let s = sub(written);
            if !problem.contains("refer to each other") {
                assert_eq!(s.value, *value, "{written}");
            }
            assert_eq!(s.variables, *variables, "{written}");
            match *problem {
                "" => assert!(s.problems.is_empty(), "{written}: {:?}", s.problems),
                p => assert!(
                    s.problems.iter().any(|m| m.contains(p)),
                    "{written}: want {p:?}, got {:?}",
                    s.problems
                ),
            }
        }
    }

    #[test]
    fn growth_is_bounded() {
        let doubling = |name: &str| -> Option<OsString> {
            let n: usize = name.strip_prefix('V')?.parse().ok()?;
            Some(match n {
                0 => "xxxxxxxxxxxxxxxx".into(),
                n => format!("${{V{}}}${{V{}}}", n - 1, n - 1).into(),
            })
        };
        let s = substitute("${V30}", &doubling);
        assert!(s.value.len() <= MAX_CHARS, "{}", s.value.len());
        assert!(s.problems.iter().any(|p| p.contains("grow beyond")));
        // Far fewer variables, each a long value: the length bound.
        let long = |_: &str| -> Option<OsString> { Some("y".repeat(40_000).into()) };
        let s = substitute("${X}${X}", &long);
        assert!(s.problems.iter().any(|p| p.contains("grow beyond")));
    }

    #[test]
    fn java_trim_keeps_no_break_space() {
        assert_eq!(java_trim("\t x \x0b\x01"), "x");
        assert_eq!(java_trim("\u{a0}x\u{a0}"), "\u{a0}x\u{a0}");
    }
}
