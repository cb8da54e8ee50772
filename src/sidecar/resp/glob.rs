//! Redis's glob patterns for `PSUBSCRIBE` and `PUBSUB CHANNELS`: `*`, `?`,
//! `[abc]`, `[^a]`, `[a-z]` and `\` escapes, over bytes.
//!
//! Matching keeps one backtracking point (the last `*`), which is enough
//! for globs and bounds the work by pattern length × subject length, where
//! naive recursion is exponential.

/// Whether `subject` matches `pattern`.
pub fn matches(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, subject
    // index it has consumed up to).
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        match one(pattern, p, subject[s]) {
            Step::Star => {
                // Runs of stars are one star.
                while pattern.get(p) == Some(&b'*') {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                star = Some((p, s));
                continue;
            }
            Step::Matched(next) => {
                p = next;
                s += 1;
                continue;
            }
            Step::Failed => {}
        }
        // Let the last star take one more byte and try again.
        match star {
            Some((sp, ss)) => {
                p = sp;
                s = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

enum Step {
    Star,
    /// The byte matched; the pattern goes on at this index.
    Matched(usize),
    Failed,
}

/// Matches one subject byte `c` against the pattern element at `p`.
fn one(pattern: &[u8], p: usize, c: u8) -> Step {
    let Some(&b) = pattern.get(p) else {
        return Step::Failed;
    };
    match b {
        b'*' => Step::Star,
        b'?' => Step::Matched(p + 1),
        b'\\' if p + 1 < pattern.len() => {
            if pattern[p + 1] == c {
                Step::Matched(p + 2)
            } else {
                Step::Failed
            }
        }
        b'[' => class(pattern, p + 1, c),
        _ if b == c => Step::Matched(p + 1),
        _ => Step::Failed,
    }
}

/// A `[...]` class starting after its `[`. As in Redis, an unterminated
/// class ends at the pattern's end, and a reversed range is swapped.
fn class(pattern: &[u8], mut p: usize, c: u8) -> Step {
    let negate = pattern.get(p) == Some(&b'^');
    if negate {
        p += 1;
    }
    let mut hit = false;
    loop {
        match pattern.get(p) {
            None => break,
            Some(b']') => {
                p += 1;
                break;
            }
            Some(b'\\') if p + 1 < pattern.len() => {
                hit |= pattern[p + 1] == c;
                p += 2;
            }
            Some(&lo) if pattern.get(p + 1) == Some(&b'-') && p + 2 < pattern.len() => {
                let hi = pattern[p + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                hit |= (lo..=hi).contains(&c);
                p += 3;
            }
            Some(&x) => {
                hit |= x == c;
                p += 1;
            }
        }
    }
    if hit != negate {
        Step::Matched(p)
    } else {
        Step::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn redis_examples() {
        let m = |p: &str, s: &str| matches(p.as_bytes(), s.as_bytes());
        assert!(m("h?llo", "hello") && m("h?llo", "hallo") && !m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo") && m("h*llo", "heeeello"));
        assert!(m("h[ae]llo", "hello") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo") && !m("h[a-b]llo", "hcllo"));
        assert!(m("h[b-a]llo", "hallo"), "reversed range");
        assert!(m("h\\*llo", "h*llo") && !m("h\\*llo", "hello"));
        assert!(m("*", "") && m("**", "abc") && !m("", "a") && m("", ""));
        assert!(m("dhis2_*", "dhis2_cache_invalidation"));
        assert!(m("*a*b", "xxaxxbxxb") && !m("*a*b", "xxaxxbxxc"));
        assert!(m("a*", "a") && !m("a?", "a"));
    }

    #[test]
    fn pathological_patterns_stay_quick() {
        let subject = vec![b'a'; 20_000];
        let mut pattern = b"*a".repeat(50);
        pattern.push(b'b');
        assert!(!matches(&pattern, &subject));
    }
}
