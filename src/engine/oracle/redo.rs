//! The `SQL_REDO` text of LogMiner INSERTs, parsed into column values.
//!
//! LogMiner reconstructs each change as SQL. For an insert into the outbox
//! it looks like
//!
//! ```text
//! insert into "SITESYNC"."OUTBOX"("ID","CREATED_AT","ORIGIN","TYPE","ENTITY_KEY","DATA")
//!   values ('7f1d…',TO_TIMESTAMP_TZ('2026-11-23 16:11:28.123456 +00:00'),'PARIS',
//!           'customer.upsert',NULL,'{"name":"Zo' || UNISTR('\00e9') || '"}');
//! ```
//!
//! Values are quoted strings (numbers too: LogMiner writes `'42'`; bare
//! numbers are accepted as well), `NULL`, and the functions `TO_DATE`,
//! `TO_TIMESTAMP`, `TO_TIMESTAMP_TZ`, `HEXTORAW`, `UNISTR`, `EMPTY_CLOB()`
//! and `EMPTY_BLOB()`, possibly joined with `||`. Dates and timestamps are
//! read in the formats the mining session sets (see
//! [`super::conn::SESSION_NLS`]): `YYYY-MM-DD HH24:MI:SS[.FF]` and, with a
//! zone, `… TZH:TZM` or a region name.
//!
//! A statement longer than 4,000 bytes comes in several rows of
//! `V$LOGMNR_CONTENTS`, each but the last with `CSF = 1`: [`Fragments`]
//! joins them before parsing.
//!
//! The parser works on bytes, slices only at ASCII delimiters, and returns
//! an error naming the byte offset for anything it does not recognise: it
//! never panics (the property tests below feed it arbitrary text).

use chrono::{DateTime, FixedOffset, NaiveDateTime};
use std::fmt;

/// One column value of an INSERT.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A quoted literal (VARCHAR2, CHAR, NVARCHAR2, an inline CLOB, and
    /// NUMBER, which LogMiner quotes), or `UNISTR(…)`, or a `||` chain.
    Text(String),
    /// An unquoted number, as written.
    Number(String),
    /// `TO_DATE(…)`.
    Date(NaiveDateTime),
    /// `TO_TIMESTAMP(…)`.
    Timestamp(NaiveDateTime),
    /// `TO_TIMESTAMP_TZ(…)`.
    TimestampTz(DateTime<FixedOffset>),
    /// `HEXTORAW(…)`.
    Raw(Vec<u8>),
    /// `EMPTY_CLOB()` / `EMPTY_BLOB()`: the LOB is written afterwards by
    /// separate LOB_WRITE operations (a LOB too large to be stored in the
    /// row).
    EmptyLob,
}

/// An INSERT statement: the table and its columns in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub owner: String,
    pub table: String,
    pub columns: Vec<(String, Value)>,
}

impl Insert {
    /// The value of a column (names compared as Oracle does for quoted
    /// identifiers: exactly).
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, v)| v)
    }
}

/// Why a `SQL_REDO` text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedoError {
    /// Byte offset in the statement.
    pub at: usize,
    pub message: String,
    /// Up to 40 characters of the statement from `at`.
    pub near: String,
}

impl fmt::Display for RedoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SQL_REDO at byte {}: {} (near `{}`)",
            self.at, self.message, self.near
        )
    }
}

impl std::error::Error for RedoError {}

/// Parses one complete INSERT statement.
pub fn parse_insert(sql: &str) -> Result<Insert, RedoError> {
    let mut p = Parser { s: sql, i: 0 };
    p.keyword("insert")?;
    p.keyword("into")?;
    let first = p.identifier()?;
    p.ws();
    let (owner, table) = if p.peek() == Some(b'.') {
        p.i += 1;
        (first, p.identifier()?)
    } else {
        (String::new(), first)
    };
    p.expect(b'(')?;
    let mut names = Vec::new();
    loop {
        names.push(p.identifier()?);
        p.ws();
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b')') => {
                p.i += 1;
                break;
            }
            _ => return Err(p.error("expected `,` or `)` after a column name")),
        }
    }
    p.keyword("values")?;
    p.expect(b'(')?;
    let mut values = Vec::with_capacity(names.len());
    loop {
        values.push(p.value()?);
        p.ws();
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b')') => {
                p.i += 1;
                break;
            }
            _ => return Err(p.error("expected `,` or `)` after a value")),
        }
    }
    p.ws();
    if p.peek() == Some(b';') {
        p.i += 1;
    }
    p.ws();
    if p.i < p.s.len() {
        return Err(p.error("unexpected text after the statement"));
    }
    if names.len() != values.len() {
        return Err(RedoError {
            at: 0,
            message: format!("{} column names but {} values", names.len(), values.len()),
            near: excerpt(sql, 0),
        });
    }
    Ok(Insert {
        owner,
        table,
        columns: names.into_iter().zip(values).collect(),
    })
}

/// Joins the rows of one statement split by LogMiner (`CSF = 1` on every
/// row but the last).
#[derive(Debug, Default)]
pub struct Fragments {
    pending: Option<String>,
}

impl Fragments {
    /// Adds one row's `SQL_REDO`; returns the whole statement once the row
    /// with `CSF = 0` arrives.
    pub fn push(&mut self, sql_redo: &str, csf: bool) -> Option<String> {
        let mut text = self.pending.take().unwrap_or_default();
        text.push_str(sql_redo);
        if csf {
            self.pending = Some(text);
            None
        } else {
            Some(text)
        }
    }

    /// Whether a statement is half joined.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The text of a statement whose last part never came (its
    /// transaction ended, or another change of it came first), leaving
    /// nothing pending.
    pub fn take_pending(&mut self) -> Option<String> {
        self.pending.take()
    }
}

fn excerpt(s: &str, at: usize) -> String {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s[at..].chars().take(40).collect()
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
}

impl Parser<'_> {
    fn bytes(&self) -> &[u8] {
        self.s.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.i).copied()
    }

    fn error(&self, message: impl Into<String>) -> RedoError {
        RedoError {
            at: self.i,
            message: message.into(),
            near: excerpt(self.s, self.i),
        }
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), RedoError> {
        self.ws();
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(format!("expected `{}`", b as char)))
        }
    }

    /// A bare word (ASCII letters, digits, `_`), as written.
    fn word(&mut self) -> &str {
        self.ws();
        let start = self.i;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            self.i += 1;
        }
        // Only ASCII was consumed: both ends are char boundaries.
        &self.s[start..self.i]
    }

    fn keyword(&mut self, kw: &str) -> Result<(), RedoError> {
        let at = self.i;
        let w = self.word();
        if w.eq_ignore_ascii_case(kw) {
            Ok(())
        } else {
            self.i = at;
            self.ws();
            Err(self.error(format!("expected `{kw}`")))
        }
    }

    /// A `"QUOTED"` identifier (with `""` for a quote) or a bare word.
    fn identifier(&mut self) -> Result<String, RedoError> {
        self.ws();
        if self.peek() == Some(b'"') {
            self.quoted(b'"')
        } else {
            let w = self.word().to_string();
            if w.is_empty() {
                Err(self.error("expected an identifier"))
            } else {
                Ok(w)
            }
        }
    }

    /// Text between `q` quotes, a doubled quote standing for one.
    fn quoted(&mut self, q: u8) -> Result<String, RedoError> {
        let open = self.i;
        self.i += 1;
        let mut out = String::new();
        let mut start = self.i;
        loop {
            match self.peek() {
                None => {
                    self.i = open;
                    return Err(self.error("unterminated quoted text"));
                }
                Some(b) if b == q => {
                    out.push_str(&self.s[start..self.i]);
                    self.i += 1;
                    if self.peek() == Some(q) {
                        out.push(q as char);
                        self.i += 1;
                        start = self.i;
                    } else {
                        return Ok(out);
                    }
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn string_arg(&mut self) -> Result<String, RedoError> {
        self.ws();
        if self.peek() == Some(b'\'') {
            self.quoted(b'\'')
        } else {
            Err(self.error("expected a quoted string argument"))
        }
    }

    /// A value, possibly a `||` chain of text terms.
    fn value(&mut self) -> Result<Value, RedoError> {
        let first = self.term()?;
        self.ws();
        if !self.bytes()[self.i.min(self.s.len())..].starts_with(b"||") {
            return Ok(first);
        }
        let mut text = match first {
            Value::Text(t) => t,
            Value::Null => String::new(),
            _ => return Err(self.error("`||` after a value that is not text")),
        };
        while self.bytes()[self.i.min(self.s.len())..].starts_with(b"||") {
            self.i += 2;
            let at = self.i;
            match self.term()? {
                Value::Text(t) => text.push_str(&t),
                Value::Null => {}
                _ => {
                    self.i = at;
                    return Err(self.error("`||` before a value that is not text"));
                }
            }
            self.ws();
        }
        Ok(Value::Text(text))
    }

    fn term(&mut self) -> Result<Value, RedoError> {
        self.ws();
        match self.peek() {
            None => Err(self.error("expected a value, found the end")),
            Some(b'\'') => Ok(Value::Text(self.quoted(b'\'')?)),
            Some(b) if b.is_ascii_digit() || b == b'-' || b == b'+' || b == b'.' => {
                let start = self.i;
                self.i += 1;
                while self.peek().is_some_and(|b| {
                    b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')
                }) {
                    self.i += 1;
                }
                let text = &self.s[start..self.i];
                if text.bytes().any(|b| b.is_ascii_digit()) {
                    Ok(Value::Number(text.to_string()))
                } else {
                    self.i = start;
                    Err(self.error("not a number"))
                }
            }
            Some(b) if b.is_ascii_alphabetic() => {
                let at = self.i;
                let name = self.word().to_ascii_uppercase();
                if name == "NULL" {
                    return Ok(Value::Null);
                }
                self.expect(b'(').map_err(|_| RedoError {
                    at,
                    message: format!("`{name}` is not a value LogMiner writes"),
                    near: excerpt(self.s, at),
                })?;
                let v = self.function(&name, at)?;
                self.expect(b')')?;
                Ok(v)
            }
            Some(_) => Err(self.error("expected a value")),
        }
    }

    /// The arguments of `name(`, up to (not including) the closing `)`.
    fn function(&mut self, name: &str, at: usize) -> Result<Value, RedoError> {
        let fail = |this: &Self, message: String| RedoError {
            at,
            message,
            near: excerpt(this.s, at),
        };
        match name {
            "EMPTY_CLOB" | "EMPTY_BLOB" => Ok(Value::EmptyLob),
            "HEXTORAW" => {
                let hex = self.string_arg()?;
                decode_hex(&hex)
                    .map(Value::Raw)
                    .ok_or_else(|| fail(self, format!("HEXTORAW('{hex}') is not hexadecimal")))
            }
            "UNISTR" => {
                let text = self.string_arg()?;
                unistr(&text)
                    .map(Value::Text)
                    .map_err(|e| fail(self, format!("UNISTR: {e}")))
            }
            "TO_DATE" | "TO_TIMESTAMP" | "TO_TIMESTAMP_TZ" => {
                let text = self.string_arg()?;
                self.ws();
                let format = if self.peek() == Some(b',') {
                    self.i += 1;
                    Some(self.string_arg()?)
                } else {
                    None
                };
                let parsed = if name == "TO_TIMESTAMP_TZ" {
                    parse_timestamp_tz(&text, format.as_deref()).map(Value::TimestampTz)
                } else {
                    parse_datetime(&text, format.as_deref()).map(|t| {
                        if name == "TO_DATE" {
                            Value::Date(t)
                        } else {
                            Value::Timestamp(t)
                        }
                    })
                };
                parsed.map_err(|e| fail(self, format!("{name}('{text}'): {e}")))
            }
            other => Err(fail(
                self,
                format!(
                    "function `{other}` is not one sitesync reads (TO_DATE, TO_TIMESTAMP, TO_TIMESTAMP_TZ, HEXTORAW, UNISTR, EMPTY_CLOB)"
                ),
            )),
        }
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let b = hex.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// Decodes UNISTR's escapes: `\XXXX` (a UTF-16 code unit in hex; pairs
/// of surrogates combine) and `\\`.
pub fn unistr(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut units: Vec<u16> = Vec::new();
    let flush = |units: &mut Vec<u16>, out: &mut String| -> Result<(), String> {
        if !units.is_empty() {
            let s = String::from_utf16(units)
                .map_err(|_| "an unpaired UTF-16 surrogate".to_string())?;
            out.push_str(&s);
            units.clear();
        }
        Ok(())
    };
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            flush(&mut units, &mut out)?;
            out.push(c);
            continue;
        }
        let rest = chars.as_str();
        if let Some(after) = rest.strip_prefix('\\') {
            flush(&mut units, &mut out)?;
            out.push('\\');
            chars = after.chars();
            continue;
        }
        let hex = rest
            .get(..4)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| "`\\` must be followed by four hex digits or `\\`".to_string())?;
        units.push(u16::from_str_radix(hex, 16).map_err(|e| e.to_string())?);
        chars = rest[4..].chars();
    }
    flush(&mut units, &mut out)?;
    Ok(out)
}

/// Oracle datetime format → chrono format, for the elements LogMiner and
/// our session formats use.
fn chrono_format(oracle: &str) -> Result<String, String> {
    let mut out = String::new();
    let upper = oracle.to_ascii_uppercase();
    let mut rest = upper.as_str();
    const ELEMENTS: [(&str, &str); 14] = [
        ("YYYY", "%Y"),
        ("HH24", "%H"),
        ("TZH:TZM", "%:z"),
        ("TZR", "%:z"),
        ("MON", "%b"),
        ("FF9", "%.9f"),
        ("FF6", "%.6f"),
        ("FF3", "%.3f"),
        ("FF", "%.f"),
        ("MM", "%m"),
        ("DD", "%d"),
        ("MI", "%M"),
        ("SS", "%S"),
        ("RR", "%y"),
    ];
    'outer: while !rest.is_empty() {
        for (element, to) in ELEMENTS {
            if let Some(after) = rest.strip_prefix(element) {
                // `.FF` in Oracle is a dot then the fraction; chrono's `%.f`
                // includes the dot.
                if element.starts_with("FF") && out.ends_with('.') {
                    out.pop();
                }
                out.push_str(to);
                rest = after;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        if c.is_ascii_alphanumeric() {
            return Err(format!("format element at `{rest}` is not supported"));
        }
        if c == '%' {
            out.push_str("%%");
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    Ok(out)
}

/// Session formats (see [`super::conn::SESSION_NLS`]).
const DATE_FORMAT: &str = "YYYY-MM-DD HH24:MI:SS";
const TIMESTAMP_FORMAT: &str = "YYYY-MM-DD HH24:MI:SS.FF";

fn parse_datetime(text: &str, format: Option<&str>) -> Result<NaiveDateTime, String> {
    let fmt = chrono_format(format.unwrap_or(TIMESTAMP_FORMAT))?;
    let date_fmt = chrono_format(DATE_FORMAT)?;
    // `SS.FF` renders a TIMESTAMP(0) as `16:11:28.` (a dot, no digits);
    // chrono's `%.f` wants a digit after the dot.
    let text = text.trim();
    let text = text.strip_suffix('.').unwrap_or(text);
    NaiveDateTime::parse_from_str(text, &fmt)
        .or_else(|_| NaiveDateTime::parse_from_str(text, &date_fmt))
        .map_err(|e| format!("does not match the format: {e}"))
}

fn parse_timestamp_tz(text: &str, format: Option<&str>) -> Result<DateTime<FixedOffset>, String> {
    let text = text.trim();
    if let Some(fmt) = format {
        let fmt = chrono_format(fmt)?;
        return DateTime::parse_from_str(text, &fmt)
            .map_err(|e| format!("does not match the format: {e}"));
    }
    // Session format `YYYY-MM-DD HH24:MI:SS.FF TZR`: an offset, or a region
    // name of which only UTC-equivalents are known here.
    let (local, zone) = text
        .rsplit_once(' ')
        .ok_or("expected a date, a time and a zone")?;
    let local = parse_datetime(local, None)?;
    let offset = match zone.to_ascii_uppercase().as_str() {
        "UTC" | "GMT" | "Z" | "ETC/UTC" | "UCT" => FixedOffset::east_opt(0),
        z => {
            let (sign, hm) = match z.as_bytes().first() {
                Some(b'+') => (1, &z[1..]),
                Some(b'-') => (-1, &z[1..]),
                _ => {
                    return Err(format!(
                        "zone `{zone}` is a region name; sitesync reads offsets (set the mining session's NLS_TIMESTAMP_TZ_FORMAT to TZH:TZM)"
                    ));
                }
            };
            let (h, m) = hm.split_once(':').unwrap_or((hm, "0"));
            let h: i32 = h.parse().map_err(|_| format!("bad zone `{zone}`"))?;
            let m: i32 = m.parse().map_err(|_| format!("bad zone `{zone}`"))?;
            FixedOffset::east_opt(sign * (h * 3600 + m * 60))
        }
    }
    .ok_or_else(|| format!("zone `{zone}` is out of range"))?;
    local
        .and_local_timezone(offset)
        .single()
        .ok_or_else(|| "not a valid local time".to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_realistic_outbox_insert() {
        let sql = r#"insert into "SITESYNC"."OUTBOX"("ID","CREATED_AT","ORIGIN","TYPE","ENTITY_KEY","DATA") values ('7f1d8a5e-3c2b-4a8e-9f00-0123456789ab',TO_TIMESTAMP_TZ('2026-11-23 16:11:28.123456 +01:00'),'PARIS','customer.upsert',NULL,'{"name":"O''Brien"}');"#;
        let ins = parse_insert(sql).unwrap();
        assert_eq!(ins.owner, "SITESYNC");
        assert_eq!(ins.table, "OUTBOX");
        assert_eq!(ins.columns.len(), 6);
        assert_eq!(
            ins.get("ID"),
            Some(&Value::Text("7f1d8a5e-3c2b-4a8e-9f00-0123456789ab".into()))
        );
        let Some(Value::TimestampTz(t)) = ins.get("CREATED_AT") else {
            panic!("{ins:?}")
        };
        assert_eq!(t.to_rfc3339(), "2026-11-23T16:11:28.123456+01:00");
        assert_eq!(ins.get("ENTITY_KEY"), Some(&Value::Null));
        assert_eq!(
            ins.get("DATA"),
            Some(&Value::Text(r#"{"name":"O'Brien"}"#.into()))
        );
    }

    #[test]
    fn every_function_logminer_writes() {
        let sql = "INSERT INTO \"A\".\"T\" (\"D\", \"TS\", \"TSF\", \"R\", \"U\", \"N\", \"Q\", \"L\", \"C\")\n VALUES (TO_DATE('2026-01-02 03:04:05', 'YYYY-MM-DD HH24:MI:SS'), TO_TIMESTAMP('2026-01-02 03:04:05.5'), to_timestamp_tz('02-01-2026 03:04:05 -05:30', 'DD-MM-YYYY HH24:MI:SS TZH:TZM'), HEXTORAW('00ff10'), UNISTR('Zo\\00e9 \\d83d\\de00 \\\\'), -1.5E+3, '42', EMPTY_CLOB(), 'a' || UNISTR('\\00e9') || NULL || 'b')";
        let ins = parse_insert(sql).unwrap();
        let d = NaiveDateTime::parse_from_str("2026-01-02 03:04:05", "%Y-%m-%d %H:%M:%S").unwrap();
        assert_eq!(ins.get("D"), Some(&Value::Date(d)));
        assert_eq!(
            ins.get("TS"),
            Some(&Value::Timestamp(d + chrono::Duration::milliseconds(500)))
        );
        let Some(Value::TimestampTz(t)) = ins.get("TSF") else {
            panic!()
        };
        assert_eq!(t.to_rfc3339(), "2026-01-02T03:04:05-05:30");
        assert_eq!(ins.get("R"), Some(&Value::Raw(vec![0, 255, 16])));
        assert_eq!(ins.get("U"), Some(&Value::Text("Zoé 😀 \\".into())));
        assert_eq!(ins.get("N"), Some(&Value::Number("-1.5E+3".into())));
        assert_eq!(ins.get("Q"), Some(&Value::Text("42".into())));
        assert_eq!(ins.get("L"), Some(&Value::EmptyLob));
        assert_eq!(ins.get("C"), Some(&Value::Text("aéb".into())));
    }

    #[test]
    fn zones_as_written_by_the_session_format() {
        let ins = parse_insert(
            "insert into \"A\".\"T\"(\"X\",\"Y\") values (TO_TIMESTAMP_TZ('2026-11-23 16:11:28.000000 UTC'),TO_TIMESTAMP_TZ('2026-11-23 16:11:28 +00:00'))",
        )
        .unwrap();
        assert!(matches!(ins.get("X"), Some(Value::TimestampTz(_))));
        assert!(matches!(ins.get("Y"), Some(Value::TimestampTz(_))));
        let e = parse_insert(
            "insert into \"A\".\"T\"(\"X\") values (TO_TIMESTAMP_TZ('2026-11-23 16:11:28 Europe/Paris'))",
        )
        .unwrap_err();
        assert!(e.message.contains("region name"), "{e}");
    }

    #[test]
    fn fractions_of_any_precision_and_none() {
        // With `FF` (Debezium's session format) Oracle writes the column's
        // precision: `28.` for TIMESTAMP(0), up to 9 digits.
        let ins = parse_insert(
            "insert into \"A\".\"T\"(\"A\",\"B\",\"C\",\"D\") values (TO_TIMESTAMP('2026-11-23 16:11:28.'),TO_TIMESTAMP('2026-11-23 16:11:28.123456789'),TO_TIMESTAMP_TZ('2026-11-23 16:11:28. -05:00'),TO_TIMESTAMP_TZ('2026-11-23 16:11:28.5 +00:00'))",
        )
        .unwrap();
        let at = |c: &str| {
            crate::engine::oracle::types::to_text(ins.get(c).unwrap())
                .unwrap()
                .unwrap()
        };
        assert_eq!(at("A"), "2026-11-23 16:11:28");
        assert_eq!(at("B"), "2026-11-23 16:11:28.123456789");
        assert_eq!(at("C"), "2026-11-23T16:11:28-05:00");
        assert_eq!(at("D"), "2026-11-23T16:11:28.500+00:00");
    }

    #[test]
    fn a_statement_split_over_rows_is_joined_at_csf_0() {
        let sql = r#"insert into "S"."OUTBOX"("ID","DATA") values ('x','{"k":"0123456789"}');"#;
        let (a, rest) = sql.split_at(20);
        let (b, c) = rest.split_at(25);
        let mut f = Fragments::default();
        assert_eq!(f.push(a, true), None);
        assert!(f.is_pending());
        assert_eq!(f.push(b, true), None);
        let whole = f.push(c, false).unwrap();
        assert!(!f.is_pending());
        assert_eq!(whole, sql);
        assert_eq!(
            parse_insert(&whole).unwrap().get("DATA"),
            Some(&Value::Text(r#"{"k":"0123456789"}"#.into()))
        );
    }

    #[test]
    fn errors_name_the_place() {
        let cases = [
            ("update \"A\".\"T\" set x = 1", 0, "expected `insert`"),
            (
                "insert into \"A\".\"T\"(\"X\") values ('open",
                33,
                "unterminated",
            ),
            (
                "insert into \"A\".\"T\"(\"X\",\"Y\") values ('a')",
                0,
                "2 column names but 1 values",
            ),
            (
                "insert into \"A\".\"T\"(\"X\") values (SYSDATE())",
                33,
                "not one sitesync reads",
            ),
            (
                "insert into \"A\".\"T\"(\"X\") values (HEXTORAW('zz'))",
                33,
                "not hexadecimal",
            ),
            (
                "insert into \"A\".\"T\"(\"X\") values ('a') extra",
                38,
                "after the statement",
            ),
            (
                "insert into \"A\".\"T\"(\"X\") values (UNISTR('\\d83d'))",
                33,
                "surrogate",
            ),
        ];
        for (sql, at, needle) in cases {
            let e = parse_insert(sql).unwrap_err();
            assert!(e.message.contains(needle), "{sql}: {e}");
            assert_eq!(e.at, at, "{sql}: {e}");
            assert!(e.to_string().contains(&format!("at byte {at}")));
        }
    }

    /// Renders a value the way LogMiner does (with the session formats).
    pub(crate) fn literal(v: &Value) -> String {
        fn q(s: &str) -> String {
            format!("'{}'", s.replace('\'', "''"))
        }
        match v {
            Value::Null => "NULL".into(),
            Value::Text(t) => q(t),
            Value::Number(n) => n.clone(),
            Value::Date(d) => format!(
                "TO_DATE({}, 'YYYY-MM-DD HH24:MI:SS')",
                q(&d.format("%Y-%m-%d %H:%M:%S").to_string())
            ),
            Value::Timestamp(t) => {
                format!(
                    "TO_TIMESTAMP({})",
                    q(&t.format("%Y-%m-%d %H:%M:%S%.f").to_string())
                )
            }
            Value::TimestampTz(t) => format!(
                "TO_TIMESTAMP_TZ({})",
                q(&t.format("%Y-%m-%d %H:%M:%S%.f %:z").to_string())
            ),
            Value::Raw(b) => format!(
                "HEXTORAW('{}')",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            ),
            Value::EmptyLob => "EMPTY_CLOB()".into(),
        }
    }

    pub(crate) fn render(ins: &Insert) -> String {
        let names: Vec<String> = ins
            .columns
            .iter()
            .map(|(c, _)| format!("\"{}\"", c.replace('"', "\"\"")))
            .collect();
        let values: Vec<String> = ins.columns.iter().map(|(_, v)| literal(v)).collect();
        format!(
            "insert into \"{}\".\"{}\"({}) values ({});",
            ins.owner,
            ins.table,
            names.join(","),
            values.join(",")
        )
    }

    fn value() -> impl Strategy<Value = Value> {
        let secs = 0i64..4_000_000_000;
        prop_oneof![
            Just(Value::Null),
            any::<String>().prop_map(Value::Text),
            "-?[0-9]{1,20}(\\.[0-9]{1,10})?".prop_map(Value::Number),
            secs.clone()
                .prop_map(|s| Value::Date(DateTime::from_timestamp(s, 0).unwrap().naive_utc())),
            (secs.clone(), 0u32..1_000_000).prop_map(|(s, us)| Value::Timestamp(
                DateTime::from_timestamp(s, us * 1000).unwrap().naive_utc()
            )),
            (secs, 0u32..1_000_000, -14i32 * 60..=14 * 60).prop_map(|(s, us, m)| {
                let off = FixedOffset::east_opt(m * 60).unwrap();
                Value::TimestampTz(
                    DateTime::from_timestamp(s, us * 1000)
                        .unwrap()
                        .with_timezone(&off),
                )
            }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Raw),
            Just(Value::EmptyLob),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_any_text(s in any::<String>()) {
            let _ = parse_insert(&s);
        }

        #[test]
        fn never_panics_on_mangled_inserts(
            cut in 0usize..200,
            junk in "[\"'(),|\\\\ a-zA-Z0-9]{0,12}",
        ) {
            let sql = "insert into \"S\".\"OUTBOX\"(\"ID\",\"D\") values ('a''b',TO_TIMESTAMP_TZ('2026-11-23 16:11:28.1 +00:00') || UNISTR('\\00e9'), HEXTORAW('0a'));";
            let mut cut = cut.min(sql.len());
            while !sql.is_char_boundary(cut) { cut -= 1; }
            let mangled = format!("{}{}{}", &sql[..cut], junk, &sql[cut..]);
            let _ = parse_insert(&mangled);
        }

        #[test]
        fn generated_inserts_round_trip(
            cols in proptest::collection::vec(("[A-Z_][A-Z0-9_\"]{0,10}", value()), 1..8),
        ) {
            let ins = Insert { owner: "SITESYNC".into(), table: "OUTBOX".into(), columns: cols };
            let sql = render(&ins);
            let parsed = parse_insert(&sql).map_err(|e| TestCaseError::fail(format!("{e}: {sql}")))?;
            prop_assert_eq!(parsed, ins);
        }

        #[test]
        fn unistr_round_trips(s in any::<String>()) {
            let escaped: String = s.encode_utf16().map(|u| format!("\\{u:04x}")).collect();
            prop_assert_eq!(unistr(&escaped).unwrap(), s);
        }
    }
}
