//! Alertmanager's label matchers: `name=value`, `name!=value`, `name=~regex`, `name!~regex`.
//!
//! The value may be double-quoted (with `\"` and `\\` escapes), as in Alertmanager's config. A
//! regular expression is anchored at both ends, as Alertmanager anchors it, so `severity=~"page"`
//! does not match `pager`. A label that is absent matches as the empty string.

use regex::Regex;

use crate::Labels;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Re,
    NotRe,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Re => "=~",
            Op::NotRe => "!~",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
    /// The anchored expression, for `=~` and `!~`.
    re: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, o: &Matcher) -> bool {
        (&self.name, self.op, &self.value) == (&o.name, o.op, &o.value)
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn unquote(v: &str) -> Result<String, String> {
    let Some(inner) = v.strip_prefix('"') else {
        return Ok(v.to_owned());
    };
    let Some(inner) = inner.strip_suffix('"') else {
        return Err(format!("{v} opens a quote it does not close"));
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some(e @ ('"' | '\\')) => out.push(e),
                Some(e) => {
                    // Regexes need their own escapes (`\d`): keep them as written.
                    out.push('\\');
                    out.push(e);
                }
                None => return Err(format!("{v} ends with a lone backslash")),
            },
            '"' => return Err(format!("{v} has an unescaped quote inside")),
            c => out.push(c),
        }
    }
    Ok(out)
}

impl Matcher {
    /// Parses one matcher, e.g. `severity=page` or `service=~"web|api"`.
    pub fn parse(text: &str) -> Result<Matcher, String> {
        let t = text.trim();
        let Some(at) = t.find(['=', '!']) else {
            return Err(format!(
                "{text:?} is not a matcher; write label=value, label!=value, label=~regex or label!~regex"
            ));
        };
        let name = t[..at].trim();
        let rest = &t[at..];
        let (op, value) = if let Some(v) = rest.strip_prefix("=~") {
            (Op::Re, v)
        } else if let Some(v) = rest.strip_prefix("!~") {
            (Op::NotRe, v)
        } else if let Some(v) = rest.strip_prefix("!=") {
            (Op::Ne, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            (Op::Eq, v)
        } else {
            return Err(format!("{text:?}: the operator is one of =, !=, =~ and !~"));
        };
        if !valid_name(name) {
            return Err(format!(
                "{name:?} is not a label name (letters, digits and _, not starting with a digit)"
            ));
        }
        let value = unquote(value.trim())?;
        let re = match op {
            Op::Re | Op::NotRe => Some(Regex::new(&format!("^(?:{value})$")).map_err(|e| {
                // regex explains over several lines; its last says what is wrong.
                let why = e.to_string();
                let last = why.lines().last().unwrap_or_default();
                format!(
                    "{value:?} is not a regular expression: {}",
                    last.trim_start_matches("error: ")
                )
            })?),
            Op::Eq | Op::Ne => None,
        };
        Ok(Matcher {
            name: name.to_owned(),
            op,
            value,
            re,
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.name).map_or("", String::as_str);
        match (self.op, &self.re) {
            (Op::Eq, _) => v == self.value,
            (Op::Ne, _) => v != self.value,
            (Op::Re, Some(re)) => re.is_match(v),
            (Op::NotRe, Some(re)) => !re.is_match(v),
            // A regex matcher is always built with its regex.
            (Op::Re | Op::NotRe, None) => false,
        }
    }
}

impl std::fmt::Display for Matcher {
    /// Alertmanager's form: `severity="page"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}{:?}", self.name, self.op.as_str(), self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn matcher_table() {
        let l = labels(&[("severity", "page"), ("service", "web"), ("team", "")]);
        let rows = [
            ("severity=page", true),
            ("severity = page", true),
            ("severity=\"page\"", true),
            ("severity!=page", false),
            ("severity=ticket", false),
            ("severity=~\"page|ticket\"", true),
            // Anchored: a substring is not a match.
            ("severity=~pag", false),
            ("severity=~\"pa.*\"", true),
            ("severity!~\"ticket\"", true),
            ("service=~\"web|api\"", true),
            // Absent or empty labels match the empty string.
            ("owner=\"\"", true),
            ("owner!=\"\"", false),
            ("team=", true),
            ("owner=~\".*\"", true),
            ("owner=~\".+\"", false),
            ("alertname=~\"High.*\"", false),
        ];
        for (text, want) in rows {
            let m = Matcher::parse(text).unwrap();
            assert_eq!(m.matches(&l), want, "{text}");
        }
        assert_eq!(
            Matcher::parse("severity=~\"page|ticket\"")
                .unwrap()
                .to_string(),
            "severity=~\"page|ticket\""
        );
        assert_eq!(
            Matcher::parse(r#"x="a\"b""#).unwrap().value,
            "a\"b",
            "escaped quote"
        );
    }

    #[test]
    fn bad_matchers_are_refused_with_a_reason() {
        let rows = [
            ("severity", "not a matcher"),
            ("1abc=x", "not a label name"),
            ("sev-erity=x", "not a label name"),
            ("severity=~\"(\"", "not a regular expression"),
            ("severity=\"page", "does not close"),
            ("severity!page", "operator"),
        ];
        for (text, says) in rows {
            match Matcher::parse(text) {
                Ok(m) => panic!("{text} parsed as {m}"),
                Err(e) => assert!(e.contains(says), "{text}: {e}"),
            }
        }
    }
}
