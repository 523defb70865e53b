//! containerd's filter syntax for List, over snapshot infos.
//!
//! A request carries several filter strings; a snapshot is listed if any of
//! them matches (no strings: everything). One string is a `,`-separated
//! conjunction of selectors, each `fieldpath [op value]`:
//!
//! - fieldpath: fields joined by `.`, a field bare (`[A-Za-z0-9_]+`) or
//!   quoted (`"containerd.io/gc.root"`); for labels everything after
//!   `labels.` is the label key;
//! - op: `==`, `!=`, `~=` (regular expression), or none (field present);
//! - value: quoted (`"..."`, `/.../` or `|...|` for regular expressions) or
//!   bare up to the next `,`.
//!
//! Fields of a snapshot: `name`, `parent`, `kind` (`active`, `view`,
//! `committed`) and `labels.KEY`.

use regex::Regex;

use crate::metastore::Info;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid filter {filter:?} at byte {at}: {reason}")]
    Syntax {
        filter: String,
        at: usize,
        reason: &'static str,
    },
    #[error("invalid filter regular expression {pattern:?}")]
    Regex {
        pattern: String,
        source: regex::Error,
    },
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filter strings: any conjunction may match.
#[derive(Debug, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Self, Error> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.trim().is_empty() {
                continue;
            }
            any.push(Parser { s: f, pos: 0 }.conjunction()?);
        }
        Ok(Filter { any })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|sel| sel.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            // containerd compares against "" when the field is absent.
            Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

fn field(info: &Info, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "name" => Some(info.name.clone()),
        "parent" => Some(info.parent.clone().unwrap_or_default()),
        "kind" => Some(info.kind.as_str().to_owned()),
        "labels" if path.len() > 1 => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> Error {
        Error::Syntax {
            filter: self.s.to_owned(),
            at: self.pos,
            reason,
        }
    }

    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn conjunction(&mut self) -> Result<Vec<Selector>, Error> {
        let mut all = vec![self.selector()?];
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(_) => return Err(self.err("expected ',' or end of filter")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, Error> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_ws();
            if self.peek() == Some('.') {
                self.pos += 1;
                path.push(self.field()?);
            } else {
                break;
            }
        }
        self.skip_ws();
        let op = if let Some(op) = ["==", "!=", "~="]
            .into_iter()
            .find(|o| self.rest().starts_with(o))
        {
            self.pos += 2;
            self.skip_ws();
            let value = self.value()?;
            match op {
                "==" => Op::Equal(value),
                "!=" => Op::NotEqual(value),
                _ => Op::Matches(Regex::new(&value).map_err(|source| Error::Regex {
                    pattern: value.clone(),
                    source,
                })?),
            }
        } else {
            Op::Present
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, Error> {
        self.skip_ws();
        if self.peek() == Some('"') {
            return self.quoted('"');
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.err("expected a field name"));
        }
        let f = self.rest()[..len].to_owned();
        self.pos += len;
        Ok(f)
    }

    fn value(&mut self) -> Result<String, Error> {
        match self.peek() {
            Some(q @ ('"' | '/' | '|')) => self.quoted(q),
            _ => {
                let len = self.rest().find(',').unwrap_or(self.rest().len());
                let v = self.rest()[..len].trim_end().to_owned();
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(self.err("expected a value"));
                }
                self.pos += len;
                Ok(v)
            }
        }
    }

    /// A string between `q`s; backslash escapes the next character (for
    /// `"` also `\n`, `\t`).
    fn quoted(&mut self, q: char) -> Result<String, Error> {
        self.pos += q.len_utf8();
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            if c == q {
                self.pos += i + c.len_utf8();
                return Ok(out);
            }
            if c == '\\' {
                let Some((_, e)) = chars.next() else { break };
                match (q, e) {
                    ('"', 'n') => out.push('\n'),
                    ('"', 't') => out.push('\t'),
                    // In a regular expression keep the escape unless it
                    // escapes the delimiter.
                    ('/' | '|', e) if e != q => {
                        out.push('\\');
                        out.push(e);
                    }
                    (_, e) => out.push(e),
                }
                continue;
            }
            out.push(c);
        }
        Err(self.err("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use super::*;
    use crate::metastore::Kind;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }

    fn m(filters: &[&str], i: &Info) -> bool {
        Filter::parse(filters).unwrap().matches(i)
    }

    #[test]
    fn fields_and_operators() {
        let i = info(
            "default/1/a",
            Some("sha256:p"),
            Kind::Committed,
            &[("containerd.io/gc.root", "x"), ("tag", "v1.2")],
        );
        assert!(m(&[], &i));
        assert!(m(&["name==default/1/a"], &i));
        assert!(m(&[r#"name=="default/1/a""#], &i));
        assert!(!m(&["name==default/1/b"], &i));
        assert!(m(&["parent==sha256:p"], &i));
        assert!(m(&["kind==committed"], &i));
        assert!(!m(&["kind==active"], &i));
        assert!(m(&[r#"labels."containerd.io/gc.root"==x"#], &i));
        assert!(m(&[r#"labels."containerd.io/gc.root""#], &i));
        assert!(m(&["labels.tag==v1.2"], &i));
        assert!(!m(&["labels.missing"], &i));
        assert!(m(&["labels.missing!=x"], &i));
        assert!(m(&["labels.tag~=^v1\\."], &i));
        assert!(m(&["labels.tag~=/^v1\\.2$/"], &i));
        assert!(!m(&["labels.tag~=^v2"], &i));
    }

    #[test]
    fn comma_is_and_strings_are_or() {
        let i = info("a", None, Kind::Active, &[("x", "1")]);
        assert!(m(&["kind==active, labels.x==1"], &i));
        assert!(!m(&["kind==active,labels.x==2"], &i));
        assert!(m(&["kind==view", "labels.x==1"], &i));
        assert!(!m(&["kind==view", "labels.x==2"], &i));
        assert!(m(&["parent==\"\""], &i), "no parent compares as empty");
    }

    #[test]
    fn syntax_errors_are_reported() {
        for bad in [
            "==x",
            "name==",
            "name==a b",
            "labels.\"open==x",
            "a.",
            "name==a,",
            "name~=(",
        ] {
            assert!(Filter::parse(&[bad]).is_err(), "{bad:?} should not parse");
        }
    }
}
