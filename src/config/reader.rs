//! Reading a configuration file: every key checked, every problem named
//! with its file and key, and reported all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::{Table, Value};

/// Everything wrong with one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One configuration problem: where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `broker.urls[1]`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} configuration error{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.key.is_empty() {
                writeln!(f, "  - {}", p.message)?;
            } else {
                writeln!(
                    f,
                    "  - {}: key `{}`: {}",
                    self.file.display(),
                    p.key,
                    p.message
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads a table key by key, collecting every problem instead of stopping at
/// the first, and reporting the keys nobody asked for as unknown.
pub struct Reader<'a> {
    table: &'a Table,
    prefix: String,
    seen: BTreeSet<String>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(table: &'a Table, prefix: &str, problems: &'a mut Vec<Problem>) -> Self {
        Reader {
            table,
            prefix: prefix.to_string(),
            seen: BTreeSet::new(),
            problems,
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    pub fn problem(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    /// Whether the table has `key` (an optional section's presence).
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Whether a problem was reported for `key` already.
    pub fn has_problem(&self, key: &str) -> bool {
        let key = self.key(key);
        self.problems.iter().any(|p| p.key == key)
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.seen.insert(key.to_string());
        self.table.get(key)
    }

    pub fn string(&mut self, key: &str, required: bool, what: &str) -> Option<String> {
        match self.get(key) {
            None if required => {
                self.problem(key, format!("missing; expected {what}"));
                None
            }
            None => None,
            Some(Value::String(s)) => match expand_env(s) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.problem(key, e);
                    None
                }
            },
            Some(other) => {
                self.problem(key, format!("expected {what}, found {}", other.type_str()));
                None
            }
        }
    }

    pub fn integer(
        &mut self,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        what: &str,
    ) -> Option<i64> {
        match self.get(key)? {
            Value::Integer(n) if range.contains(n) => Some(*n),
            Value::Integer(n) => {
                self.problem(
                    key,
                    format!(
                        "{n} is out of range; expected {what} between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
            other => {
                self.problem(key, format!("expected {what}, found {}", other.type_str()));
                None
            }
        }
    }

    pub fn millis(&mut self, key: &str, default: u64, max: u64) -> Duration {
        Duration::from_millis(
            self.integer(key, 1..=max as i64, "a number of milliseconds")
                .map(|n| n as u64)
                .unwrap_or(default),
        )
    }

    pub fn strings(&mut self, key: &str, what: &str) -> Option<Vec<String>> {
        match self.get(key)? {
            Value::String(s) => match expand_env(s) {
                Ok(s) => Some(vec![s]),
                Err(e) => {
                    self.problem(key, e);
                    None
                }
            },
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => match expand_env(s) {
                            Ok(s) => out.push(s),
                            Err(e) => self.problem(&format!("{key}[{i}]"), e),
                        },
                        other => self.problem(
                            &format!("{key}[{i}]"),
                            format!("expected {what}, found {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.problem(
                    key,
                    format!("expected a list of {what}, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// Checks that `value` (read from `key`) can name a database object
    /// sitesync creates: lowercase letters, digits and _, at most 63.
    pub fn identifier(&mut self, key: &str, value: &str, what: &str) {
        let ok = !value.is_empty()
            && value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !value.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            self.problem(
                key,
                format!("`{value}` is not a valid {what}: use lowercase letters, digits and _, at most 63 characters"),
            );
        }
    }

    /// Takes every key of this table as read: when what would read them
    /// cannot (a `[database]` of an unknown `kind`), they are not reported
    /// as unknown on top of the real problem.
    pub fn skip_rest(&mut self) {
        self.seen.extend(self.table.keys().cloned());
    }

    pub fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.problem(
                    key,
                    format!("expected true or false, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A table of strings (`{ username = "user_name" }`).
    pub fn string_map(&mut self, key: &str, what: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self.get(key) {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        other => self.problem(
                            &format!("{key}.{k}"),
                            format!("expected {what}, found {}", other.type_str()),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                key,
                format!(
                    "expected a table such as {{ field = \"column\" }}, found {}",
                    other.type_str()
                ),
            ),
        }
        out
    }

    /// A table of values, as JSON (`{ source = "sitesync", version = 2 }`).
    pub fn value_map(&mut self, key: &str) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        match self.get(key) {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    match serde_json::to_value(v) {
                        Ok(json) => {
                            out.insert(k.clone(), json);
                        }
                        Err(e) => self.problem(
                            &format!("{key}.{k}"),
                            format!("not representable as JSON: {e}"),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                key,
                format!(
                    "expected a table such as {{ column = value }}, found {}",
                    other.type_str()
                ),
            ),
        }
        out
    }

    /// An array of tables (`[[sink.routes]]`), each read by `f`.
    pub fn table_array<T>(&mut self, key: &str, mut f: impl FnMut(&mut Reader<'_>) -> T) -> Vec<T> {
        let prefix = self.key(key);
        let items = match self.get(key) {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.problem(
                    key,
                    format!("expected [[{prefix}]] tables, found {}", other.type_str()),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Table(t) => {
                    let mut sub = Reader::new(t, &format!("{prefix}[{i}]"), self.problems);
                    out.push(f(&mut sub));
                    sub.finish();
                }
                other => self.problem(
                    &format!("{key}[{i}]"),
                    format!("expected a table, found {}", other.type_str()),
                ),
            }
        }
        out
    }

    /// A sub-table, read by `f`; an absent table reads as empty.
    pub fn section<T>(&mut self, key: &str, f: impl FnOnce(&mut Reader<'_>) -> T) -> T {
        static EMPTY: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(Table::new);
        let prefix = self.key(key);
        let table = match self.get(key) {
            Some(Value::Table(t)) => t,
            None => empty,
            Some(other) => {
                self.problem(
                    key,
                    format!("expected a table [{prefix}], found {}", other.type_str()),
                );
                empty
            }
        };
        let mut sub = Reader::new(table, &prefix, self.problems);
        let out = f(&mut sub);
        sub.finish();
        out
    }

    pub(crate) fn finish(self) {
        let expected: Vec<&str> = self.seen.iter().map(String::as_str).collect();
        for key in self.table.keys() {
            if !self.seen.contains(key) {
                let full = if self.prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.prefix)
                };
                self.problems.push(Problem {
                    key: full,
                    message: format!("unknown key; expected one of: {}", expected.join(", ")),
                });
            }
        }
    }
}

/// Expands `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
pub fn expand_env(text: &str) -> Result<String, String> {
    expand_with(text, |name| std::env::var(name).ok())
}

pub(crate) fn expand_with(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in `{text}`"))?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{inner}}}` is not a variable reference (expected ${{NAME}} or ${{NAME:-default}})"
                ));
            }
            match (lookup(name), default) {
                (Some(v), None) => out.push_str(&v),
                (Some(v), Some(_)) if !v.is_empty() => out.push_str(&v),
                (_, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (write ${{{name}:-default}} to give a default)"
                    ));
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

pub(crate) fn parse_file(path: &Path) -> Result<Table, ConfigErrors> {
    let fail = |message: String| ConfigErrors {
        file: path.to_path_buf(),
        problems: vec![Problem {
            key: String::new(),
            message,
        }],
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    text.parse::<Table>()
        .map_err(|e| fail(format!("not valid TOML: {}", e.to_string().trim_end())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "USER" => Some("alice".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_with("a ${USER} b", lookup).unwrap(), "a alice b");
        assert_eq!(expand_with("${NOPE:-dflt}", lookup).unwrap(), "dflt");
        assert_eq!(expand_with("${EMPTY:-dflt}", lookup).unwrap(), "dflt");
        assert_eq!(expand_with("${EMPTY}", lookup).unwrap(), "");
        assert_eq!(
            expand_with("cost $$5 and $x", lookup).unwrap(),
            "cost $5 and $x"
        );
        assert_eq!(expand_with("${NOPE:-}", lookup).unwrap(), "");
        let e = expand_with("x${NOPE}", lookup).unwrap_err();
        assert!(e.contains("`NOPE` is not set"), "{e}");
        assert!(
            expand_with("${USER", lookup)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            expand_with("${a b}", lookup)
                .unwrap_err()
                .contains("not a variable")
        );
    }
}
