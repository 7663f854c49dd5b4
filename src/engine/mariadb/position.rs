//! MariaDB / MySQL positions: `(GTID state, binlog file and offset, index)`.
//!
//! A binlog reader restarts in one of three ways, and a position carries
//! what the server it reads understands:
//!
//! - MariaDB's GTID state: the last GTID done in each replication domain,
//!   `domain-server-seq` separated by commas (`0-1-10,1-2-5`), as
//!   `@@gtid_binlog_pos` prints it and `@slave_connect_state` takes it;
//! - MySQL's GTID set: every transaction done, as intervals of sequence
//!   numbers per server UUID
//!   (`3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7-9,…`), as
//!   `Executed_Gtid_Set` prints it and `COM_BINLOG_DUMP_GTID` takes it;
//! - a binlog file and offset, where the server writes no GTIDs.
//!
//! GTID states of different servers are not ordered in general (two
//! domains can move independently). One stream's positions are: they
//! follow the binlog of one server, which writes each transaction
//! contiguously when it commits. So every position also carries the file
//! and offset where its transaction starts in the binlog, and positions are
//! ordered by that (the GTID part only breaks ties, so that the order
//! agrees with `==`). The start is used rather than the commit event
//! because it is also what a restart by file and offset asks for; since a
//! transaction's events are written together at its commit, the two order
//! transactions the same way.
//!
//! The GTID part of a row's position is the state *before* its
//! transaction: a restart asks the server for what follows it, gets that
//! transaction again, and skips its first `index` rows. After a
//! transaction, the resume point is the state including it, at the file
//! and offset where its events end, index 0.

use crate::position::{LogPosition, split_index, strip_engine};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A resume point in a MariaDB or MySQL binary log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Stored", into = "Stored")]
pub struct Position {
    /// What a restart asks the server for; `None` where the server has no
    /// GTIDs (a restart then asks for `file` and `offset`). Never an empty
    /// state: with no transaction done there is nothing to name, and
    /// `file` and `offset` ask for the same.
    pub gtid: Option<Gtids>,
    /// The binlog file where the transaction starts (`mysql-bin.000003`).
    pub file: BinlogFile,
    /// The offset in `file` of the transaction's first event (or, between
    /// transactions, of the next event).
    pub offset: u64,
    /// Outbox rows of the transaction already done.
    pub index: u32,
}

impl Position {
    /// A position; an empty GTID state is dropped (see [`Position::gtid`]).
    pub fn new(gtid: Option<Gtids>, file: BinlogFile, offset: u64, index: u32) -> Position {
        Position {
            gtid: gtid.filter(|g| !g.is_empty()),
            file,
            offset,
            index,
        }
    }
}

impl LogPosition for Position {
    const ENGINE: &'static str = "mariadb";

    fn next_row(&self) -> Position {
        Position {
            index: self.index.saturating_add(1),
            ..self.clone()
        }
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Position) -> Ordering {
        (&self.file, self.offset, self.index)
            .cmp(&(&other.file, other.offset, other.index))
            .then_with(|| {
                let text = |g: &Option<Gtids>| g.as_ref().map(Gtids::to_string);
                text(&self.gtid).cmp(&text(&other.gtid))
            })
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Position) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A binlog file name: a base name, a dot and a number
/// (`mysql-bin.000003`). Ordered by base name, then number (the number
/// grows past six digits once 999999 is reached).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BinlogFile {
    name: String,
    number: u64,
}

impl BinlogFile {
    /// The file's name, as the server writes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number after the dot.
    pub fn number(&self) -> u64 {
        self.number
    }

    fn base(&self) -> &str {
        self.name.rsplit_once('.').map_or("", |(base, _)| base)
    }
}

impl FromStr for BinlogFile {
    type Err = String;

    fn from_str(name: &str) -> Result<BinlogFile, String> {
        let problem = |what: &str| {
            format!("`{name}` is not a binlog file name: {what} (e.g. mysql-bin.000003)")
        };
        let (base, number) = name
            .rsplit_once('.')
            .ok_or_else(|| problem("no `.` before the file's number"))?;
        if base.is_empty() {
            return Err(problem("the base name before the `.` is empty"));
        }
        if base.contains(['@', '#', ',']) || base.chars().any(char::is_whitespace) {
            return Err(problem("the base name holds @, #, a comma or a space"));
        }
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(problem("the part after the last `.` must be digits"));
        }
        let number = number
            .parse()
            .map_err(|_| problem("the file's number is too large"))?;
        Ok(BinlogFile {
            name: name.to_string(),
            number,
        })
    }
}

impl fmt::Display for BinlogFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Ord for BinlogFile {
    fn cmp(&self, other: &BinlogFile) -> Ordering {
        (self.base(), self.number, &self.name).cmp(&(other.base(), other.number, &other.name))
    }
}

impl PartialOrd for BinlogFile {
    fn partial_cmp(&self, other: &BinlogFile) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a restart by GTID asks for: MariaDB's state or MySQL's set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Gtids {
    MariaDb(MariaDbState),
    MySql(MySqlSet),
}

impl Gtids {
    /// Whether it names no transaction.
    pub fn is_empty(&self) -> bool {
        match self {
            Gtids::MariaDb(s) => s.is_empty(),
            Gtids::MySql(s) => s.is_empty(),
        }
    }
}

/// Which of the two forms `text` is in: MySQL's holds a `:` after each
/// UUID, MariaDB's never does.
impl FromStr for Gtids {
    type Err = String;

    fn from_str(text: &str) -> Result<Gtids, String> {
        if text.contains(':') {
            text.parse().map(Gtids::MySql)
        } else {
            text.parse().map(Gtids::MariaDb)
        }
    }
}

impl fmt::Display for Gtids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gtids::MariaDb(s) => s.fmt(f),
            Gtids::MySql(s) => s.fmt(f),
        }
    }
}

/// One MariaDB GTID: `domain-server-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MariaDbGtid {
    /// The replication domain (`gtid_domain_id`).
    pub domain: u32,
    /// The server that wrote the transaction first (`server_id`).
    pub server: u32,
    /// The transaction's sequence number in its domain.
    pub seq: u64,
}

impl FromStr for MariaDbGtid {
    type Err = String;

    fn from_str(text: &str) -> Result<MariaDbGtid, String> {
        let parts: Vec<&str> = text.split('-').collect();
        let [domain, server, seq] = parts[..] else {
            return Err(format!(
                "`{text}` is not a MariaDB GTID: expected domain-server-sequence, e.g. 0-1-10"
            ));
        };
        let number = |part: &str, what: &str| {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "`{text}` is not a MariaDB GTID: the {what} `{part}` is not a number"
                ));
            }
            part.parse::<u64>()
                .map_err(|_| format!("`{text}`: the {what} `{part}` is too large"))
        };
        let small = |part: &str, what: &str| {
            u32::try_from(number(part, what)?).map_err(|_| {
                format!("`{text}`: the {what} `{part}` is too large (at most 4294967295)")
            })
        };
        Ok(MariaDbGtid {
            domain: small(domain, "domain id")?,
            server: small(server, "server id")?,
            seq: number(seq, "sequence number")?,
        })
    }
}

impl fmt::Display for MariaDbGtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// MariaDB's GTID state: the last GTID of each domain, one per domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MariaDbState {
    by_domain: BTreeMap<u32, MariaDbGtid>,
}

impl MariaDbState {
    /// Whether no domain has a GTID.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The last GTID of `domain`.
    pub fn get(&self, domain: u32) -> Option<MariaDbGtid> {
        self.by_domain.get(&domain).copied()
    }

    /// The GTIDs, by domain.
    pub fn iter(&self) -> impl Iterator<Item = MariaDbGtid> + '_ {
        self.by_domain.values().copied()
    }

    /// Records a transaction: `gtid` becomes its domain's last.
    pub fn record(&mut self, gtid: MariaDbGtid) {
        self.by_domain.insert(gtid.domain, gtid);
    }
}

impl FromStr for MariaDbState {
    type Err = String;

    /// `0-1-10,1-2-5` (spaces and newlines around the commas allowed, as
    /// the server prints long states); the empty text is the empty state.
    fn from_str(text: &str) -> Result<MariaDbState, String> {
        let mut state = MariaDbState::default();
        if text.trim().is_empty() {
            return Ok(state);
        }
        for part in text.split(',') {
            let gtid: MariaDbGtid = part.trim().parse()?;
            if let Some(earlier) = state.get(gtid.domain) {
                return Err(format!(
                    "`{text}`: domain {} appears twice ({earlier} and {gtid}); a GTID state has one GTID per domain",
                    gtid.domain
                ));
            }
            state.record(gtid);
        }
        Ok(state)
    }
}

impl fmt::Display for MariaDbState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, gtid) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            gtid.fmt(f)?;
        }
        Ok(())
    }
}

/// MySQL's GTID set: per server UUID, the sequence numbers done, as
/// inclusive intervals kept sorted and merged (`1-5:7-9`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MySqlSet {
    by_uuid: BTreeMap<Uuid, Vec<(u64, u64)>>,
}

impl MySqlSet {
    /// Whether the set holds no transaction.
    pub fn is_empty(&self) -> bool {
        self.by_uuid.is_empty()
    }

    /// The servers whose transactions it holds, in order.
    pub fn uuids(&self) -> impl Iterator<Item = &Uuid> {
        self.by_uuid.keys()
    }

    /// The intervals of `uuid`.
    pub fn intervals(&self, uuid: &Uuid) -> &[(u64, u64)] {
        self.by_uuid.get(uuid).map_or(&[], Vec::as_slice)
    }

    /// Whether transaction `uuid:seq` is in the set.
    pub fn contains(&self, uuid: &Uuid, seq: u64) -> bool {
        self.intervals(uuid)
            .iter()
            .any(|&(start, end)| start <= seq && seq <= end)
    }

    /// Adds the transactions `start..=end` of `uuid`.
    pub fn add(&mut self, uuid: Uuid, start: u64, end: u64) {
        let list = self.by_uuid.entry(uuid).or_default();
        list.push((start, end));
        *list = merged(std::mem::take(list));
    }
}

/// Intervals sorted, with those that overlap or touch made one.
fn merged(mut list: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    list.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(list.len());
    for (s, e) in list {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

impl FromStr for MySqlSet {
    type Err = String;

    /// `uuid:1-5:7-9,uuid2:3` (spaces and newlines around the commas
    /// allowed, as `Executed_Gtid_Set` prints long sets); the empty text
    /// is the empty set.
    fn from_str(text: &str) -> Result<MySqlSet, String> {
        let mut set = MySqlSet::default();
        if text.trim().is_empty() {
            return Ok(set);
        }
        for part in text.split(',') {
            let part = part.trim();
            let mut fields = part.split(':');
            let uuid_text = fields.next().unwrap_or_default();
            let uuid = Uuid::try_parse(uuid_text).map_err(|_| {
                format!(
                    "`{text}`: `{uuid_text}` is not a server UUID (expected e.g. 3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5)"
                )
            })?;
            let mut any = false;
            for interval in fields {
                any = true;
                if interval.starts_with(|c: char| c.is_ascii_alphabetic()) {
                    return Err(format!(
                        "`{text}`: `{interval}` after {uuid} is a GTID tag (MySQL 8.3 and later); tagged GTIDs are not supported"
                    ));
                }
                let (start, end) = interval.split_once('-').unwrap_or((interval, interval));
                let number = |n: &str| {
                    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(format!(
                            "`{text}`: the interval `{interval}` of {uuid} is not `N` or `N-M` with numbers"
                        ));
                    }
                    n.parse::<u64>()
                        .map_err(|_| format!("`{text}`: `{n}` in {uuid} is too large"))
                };
                let (start, end) = (number(start)?, number(end)?);
                if start == 0 {
                    return Err(format!(
                        "`{text}`: the interval `{interval}` of {uuid} starts at 0; GTID sequence numbers start at 1"
                    ));
                }
                if end < start {
                    return Err(format!(
                        "`{text}`: the interval `{interval}` of {uuid} ends before it starts"
                    ));
                }
                // Sorted and merged once at the end: merging at each
                // interval took time quadratic in their number.
                set.by_uuid.entry(uuid).or_default().push((start, end));
            }
            if !any {
                return Err(format!(
                    "`{text}`: {uuid} has no interval (expected e.g. {uuid}:1-5)"
                ));
            }
        }
        for list in set.by_uuid.values_mut() {
            *list = merged(std::mem::take(list));
        }
        Ok(set)
    }
}

impl fmt::Display for MySqlSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (uuid, intervals)) in self.by_uuid.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{uuid}")?;
            for &(start, end) in intervals {
                if start == end {
                    write!(f, ":{start}")?;
                } else {
                    write!(f, ":{start}-{end}")?;
                }
            }
        }
        Ok(())
    }
}

/// The JSON form:
/// `{"engine":"mariadb","file":"mysql-bin.000003","offset":4567,"index":2,"mariadb_gtid":"0-1-10"}`,
/// with `mysql_gtid` for MySQL's set, and neither without GTIDs.
#[derive(Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "snake_case")]
enum Stored {
    #[serde(rename = "mariadb")]
    MariaDb {
        file: String,
        offset: u64,
        index: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mariadb_gtid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mysql_gtid: Option<String>,
    },
}

impl TryFrom<Stored> for Position {
    type Error = String;

    fn try_from(s: Stored) -> Result<Position, String> {
        let Stored::MariaDb {
            file,
            offset,
            index,
            mariadb_gtid,
            mysql_gtid,
        } = s;
        let gtid = match (mariadb_gtid, mysql_gtid) {
            (Some(_), Some(_)) => {
                return Err(
                    "a mariadb position holds either mariadb_gtid or mysql_gtid, not both"
                        .to_string(),
                );
            }
            (Some(state), None) => Some(Gtids::MariaDb(state.parse()?)),
            (None, Some(set)) => Some(Gtids::MySql(set.parse()?)),
            (None, None) => None,
        };
        Ok(Position::new(gtid, file.parse()?, offset, index))
    }
}

impl From<Position> for Stored {
    fn from(p: Position) -> Stored {
        let (mariadb_gtid, mysql_gtid) = match &p.gtid {
            Some(Gtids::MariaDb(s)) => (Some(s.to_string()), None),
            Some(Gtids::MySql(s)) => (None, Some(s.to_string())),
            None => (None, None),
        };
        Stored::MariaDb {
            file: p.file.name,
            offset: p.offset,
            index: p.index,
            mariadb_gtid,
            mysql_gtid,
        }
    }
}

const EXAMPLE: &str = "mariadb:0-1-10@mysql-bin.000003:4567#2";

/// `mariadb:<GTIDs>@<file>:<offset>#<index>`, e.g.
/// `mariadb:0-1-10,1-2-5@mysql-bin.000003:4567#2`; without GTIDs
/// `mariadb:mysql-bin.000003:4567#2`. `#index` may be left out (0).
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mariadb:")?;
        if let Some(gtid) = &self.gtid {
            write!(f, "{gtid}@")?;
        }
        write!(f, "{}:{}#{}", self.file, self.offset, self.index)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Position, String> {
        let rest = strip_engine(text, Position::ENGINE, EXAMPLE)?;
        let (rest, index) = split_index(rest, text)?;
        let (gtid, at) = match rest.rsplit_once('@') {
            Some((gtid, at)) => {
                if gtid.trim().is_empty() {
                    return Err(format!(
                        "`{text}`: the GTIDs before @ are empty; leave out the @ to resume by file and offset"
                    ));
                }
                (
                    Some(
                        gtid.parse::<Gtids>()
                            .map_err(|e| format!("`{text}`: {e}"))?,
                    ),
                    at,
                )
            }
            None => (None, rest),
        };
        let (file, offset) = at.rsplit_once(':').ok_or_else(|| {
            format!("`{text}`: expected <binlog file>:<offset> after the GTIDs, e.g. {EXAMPLE}")
        })?;
        let offset = offset
            .parse::<u64>()
            .map_err(|_| format!("`{text}`: the binlog offset `{offset}` must be a number"))?;
        let file = file.parse().map_err(|e| format!("`{text}`: {e}"))?;
        Ok(Position::new(gtid, file, offset, index))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const U1: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const U2: &str = "8f2a4c10-0b5e-11ee-8c90-0242ac120002";

    fn file(name: &str) -> BinlogFile {
        name.parse().unwrap()
    }

    fn at(gtid: &str, name: &str, offset: u64, index: u32) -> Position {
        let gtid = (!gtid.is_empty()).then(|| gtid.parse().unwrap());
        Position::new(gtid, file(name), offset, index)
    }

    #[test]
    fn mariadb_states_parse_one_gtid_per_domain() {
        let s: MariaDbState = "1-2-5, 0-1-10".parse().unwrap();
        assert_eq!(s.to_string(), "0-1-10,1-2-5", "sorted by domain");
        assert_eq!(
            s.get(1),
            Some(MariaDbGtid {
                domain: 1,
                server: 2,
                seq: 5
            })
        );
        assert!("".parse::<MariaDbState>().unwrap().is_empty());
        // What the server prints for a long state.
        let s: MariaDbState = "0-1-10,\n1-2-5".parse().unwrap();
        assert_eq!(s.iter().count(), 2);
        let max: MariaDbState = "4294967295-4294967295-18446744073709551615"
            .parse()
            .unwrap();
        assert_eq!(max.get(u32::MAX).unwrap().seq, u64::MAX);

        let mut s = s;
        s.record("0-3-11".parse().unwrap());
        assert_eq!(s.to_string(), "0-3-11,1-2-5", "the domain's last GTID");

        for (bad, problem) in [
            ("0-1", "expected domain-server-sequence"),
            ("0-1-10-4", "expected domain-server-sequence"),
            ("0-x-10", "the server id `x` is not a number"),
            ("0-1-", "the sequence number `` is not a number"),
            ("-1-1-10", "expected domain-server-sequence"),
            ("0-1-+5", "the sequence number `+5` is not a number"),
            ("4294967296-1-1", "the domain id `4294967296` is too large"),
            (
                "0-1-10,0-2-11",
                "domain 0 appears twice (0-1-10 and 0-2-11)",
            ),
            ("0-1-10,", "is not a MariaDB GTID"),
        ] {
            let e = bad.parse::<MariaDbState>().unwrap_err();
            assert!(e.contains(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn mysql_sets_parse_intervals_of_several_uuids() {
        let text = format!("{},\n{U1}:1-5:7-9:11", U2.to_uppercase() + ":1-3");
        let s: MySqlSet = text.parse().unwrap();
        assert_eq!(
            s.to_string(),
            format!("{U1}:1-5:7-9:11,{U2}:1-3"),
            "lowercase, sorted by UUID"
        );
        let u1 = Uuid::parse_str(U1).unwrap();
        assert_eq!(s.intervals(&u1), &[(1, 5), (7, 9), (11, 11)]);
        assert!(s.contains(&u1, 8) && !s.contains(&u1, 6) && !s.contains(&u1, 12));

        // Overlapping and adjacent intervals, and a UUID given twice, merge.
        let s: MySqlSet = format!("{U1}:7-9:1-5:6,{U1}:10-12:20").parse().unwrap();
        assert_eq!(s.to_string(), format!("{U1}:1-12:20"));
        let mut s = s;
        s.add(u1, 13, 13);
        assert_eq!(s.to_string(), format!("{U1}:1-13:20"));
        assert!("".parse::<MySqlSet>().unwrap().is_empty());

        for (bad, problem) in [
            (U1.to_string(), "has no interval"),
            (
                "not-a-uuid:1-5".to_string(),
                "`not-a-uuid` is not a server UUID",
            ),
            (format!("{U1}:5-3"), "`5-3` of 3e11fa47"),
            (format!("{U1}:5-3"), "ends before it starts"),
            (format!("{U1}:0-3"), "starts at 0"),
            (format!("{U1}:1-"), "is not `N` or `N-M`"),
            (format!("{U1}:1-5:"), "the interval `` of"),
            (format!("{U1}:1--5"), "is not `N` or `N-M`"),
            (format!("{U1}:tag:1-5"), "tagged GTIDs are not supported"),
            (format!("{U1}:1-5,,{U2}:1"), "`` is not a server UUID"),
        ] {
            let e = bad.parse::<MySqlSet>().unwrap_err();
            assert!(e.contains(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn a_long_mysql_set_parses_in_time_linear_in_its_length() {
        // Found measuring the positions fuzz target: every interval was
        // merged into the sorted list as it was read, so 20,000 disjoint
        // intervals (a 120 KB set) took 83 s to parse there.
        let n = 20_000u64;
        let text = format!(
            "{U1}:{}",
            (0..n)
                .map(|i| (2 * i + 1).to_string())
                .collect::<Vec<_>>()
                .join(":")
        );
        let started = std::time::Instant::now();
        let s: MySqlSet = text.parse().unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let u1 = Uuid::parse_str(U1).unwrap();
        assert_eq!(s.intervals(&u1).len(), n as usize);
        assert_eq!(s.intervals(&u1)[n as usize - 1], (2 * n - 1, 2 * n - 1));
        assert_eq!(s.to_string(), text);
    }

    #[test]
    fn the_gtid_form_is_told_by_its_colons() {
        assert!(matches!("0-1-10".parse::<Gtids>(), Ok(Gtids::MariaDb(_))));
        assert!(matches!(
            format!("{U1}:1-5").parse::<Gtids>(),
            Ok(Gtids::MySql(_))
        ));
    }

    #[test]
    fn binlog_files_order_by_number_past_six_digits() {
        assert!(file("mysql-bin.000009") < file("mysql-bin.000010"));
        assert!(file("mysql-bin.999999") < file("mysql-bin.1000000"));
        assert_eq!(file("mysql-bin.000003").number(), 3);
        assert_eq!(file("log.with.dots.000003").name(), "log.with.dots.000003");
        for (bad, problem) in [
            ("mysql-bin", "no `.`"),
            (".000003", "base name before the `.` is empty"),
            ("mysql-bin.00a3", "must be digits"),
            ("mysql-bin.", "must be digits"),
            ("my bin.000001", "holds @, #, a comma or a space"),
        ] {
            let e = bad.parse::<BinlogFile>().unwrap_err();
            assert!(e.contains(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn text_round_trip_in_the_three_forms() {
        let mysql = format!("{U1}:1-5:7-9,{U2}:1-3");
        for p in [
            at("0-1-10,1-2-5", "mysql-bin.000003", 4567, 2),
            at(&mysql, "binlog.000001", 4, 0),
            at("", "mysql-bin.000003", 4567, 7),
        ] {
            let text = p.to_string();
            assert_eq!(text.parse::<Position>().unwrap(), p, "{text}");
        }
        assert_eq!(
            at("0-1-10", "mysql-bin.000003", 4567, 2).to_string(),
            "mariadb:0-1-10@mysql-bin.000003:4567#2"
        );
        assert_eq!(
            at("", "mysql-bin.000003", 4567, 0).to_string(),
            "mariadb:mysql-bin.000003:4567#0"
        );
        assert_eq!(
            "mariadb:0-1-10@mysql-bin.000003:4567".parse::<Position>(),
            Ok(at("0-1-10", "mysql-bin.000003", 4567, 0)),
            "#index may be left out"
        );
        assert_eq!(
            format!("mariadb:{mysql}@binlog.000001:4#3")
                .parse::<Position>()
                .unwrap()
                .gtid,
            Some(Gtids::MySql(mysql.parse().unwrap()))
        );
    }

    #[test]
    fn bad_text_names_the_problem() {
        for (bad, problem) in [
            ("postgres:0/1", "a position of `postgres`"),
            ("0-1-10", "not a position"),
            (
                "mariadb:0-1-10@mysql-bin.000003",
                "expected <binlog file>:<offset>",
            ),
            ("mariadb:0-1-10@mysql-bin.000003:x", "the binlog offset `x`"),
            ("mariadb:@mysql-bin.000003:4", "GTIDs before @ are empty"),
            ("mariadb:0-1@mysql-bin.000003:4", "is not a MariaDB GTID"),
            ("mariadb:0-1-10@mysql-bin:4", "is not a binlog file name"),
            ("mariadb:0-1-10@mysql-bin.000003:4#x", "index"),
            (
                "mariadb:mysql-bin.000003",
                "expected <binlog file>:<offset>",
            ),
        ] {
            let e = bad.parse::<Position>().unwrap_err();
            assert!(e.contains(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn json_is_tagged_and_keeps_the_gtid_form() {
        let p = at("0-1-10,1-2-5", "mysql-bin.000003", 4567, 2);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"engine":"mariadb","file":"mysql-bin.000003","offset":4567,"index":2,"mariadb_gtid":"0-1-10,1-2-5"}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);

        let p = at(&format!("{U1}:1-5:7-9"), "binlog.000001", 4, 0);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"engine":"mariadb","file":"binlog.000001","offset":4,"index":0,"mysql_gtid":"{U1}:1-5:7-9"}}"#
            )
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);

        let p = at("", "mysql-bin.000003", 4567, 1);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"engine":"mariadb","file":"mysql-bin.000003","offset":4567,"index":1}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);

        for (bad, problem) in [
            (
                r#"{"engine":"postgres","lsn":"0/1","index":0}"#,
                "unknown variant `postgres`",
            ),
            (
                r#"{"engine":"mariadb","file":"f.1","offset":4,"index":0,"mariadb_gtid":"0-1-1","mysql_gtid":"x"}"#,
                "not both",
            ),
            (
                r#"{"engine":"mariadb","file":"f.1","offset":4,"index":0,"mariadb_gtid":"0-1"}"#,
                "is not a MariaDB GTID",
            ),
            (
                r#"{"engine":"mariadb","file":"nodot","offset":4,"index":0}"#,
                "is not a binlog file name",
            ),
        ] {
            let e = serde_json::from_str::<Position>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(problem), "{bad}: {e}");
        }
        // An empty state is dropped, not kept as an empty GTID.
        let json = r#"{"engine":"mariadb","file":"f.1","offset":4,"index":0,"mariadb_gtid":""}"#;
        assert_eq!(serde_json::from_str::<Position>(json).unwrap().gtid, None);
    }

    #[test]
    fn one_streams_positions_order_by_file_offset_then_row() {
        // Rows of a transaction starting at 1000, the resume point after
        // it (its events end at 1500), the next transaction's rows.
        let rows = [
            at("0-1-9", "mysql-bin.000003", 1000, 0),
            at("0-1-9", "mysql-bin.000003", 1000, 1),
            at("0-1-9", "mysql-bin.000003", 1000, 2),
            at("0-1-10", "mysql-bin.000003", 1500, 0),
            at("0-1-10", "mysql-bin.000003", 1500, 1),
            // After a rotation, the offsets start again.
            at("0-1-11", "mysql-bin.000004", 4, 0),
            at("0-1-11,1-2-1", "mysql-bin.000010", 256, 0),
        ];
        for pair in rows.windows(2) {
            assert!(pair[0] < pair[1], "{} < {}", pair[0], pair[1]);
        }
        // The order agrees with ==: the GTID part breaks a tie.
        let a = at("0-1-9", "mysql-bin.000003", 1000, 0);
        let b = at("0-2-9", "mysql-bin.000003", 1000, 0);
        assert_ne!(a.cmp(&b), Ordering::Equal);
        assert_eq!(a.cmp(&a.clone()), Ordering::Equal);
    }

    #[test]
    fn next_row_keeps_the_transaction() {
        let p = at("0-1-9", "mysql-bin.000003", 1000, 2);
        let next = p.next_row();
        assert_eq!(next, at("0-1-9", "mysql-bin.000003", 1000, 3));
        assert!(next > p);
        let last = at("", "mysql-bin.000003", 1000, u32::MAX);
        assert_eq!(last.next_row().index, u32::MAX, "saturates");
    }

    fn mariadb_state() -> impl Strategy<Value = MariaDbState> {
        mariadb_states(1..4)
    }

    /// GTID states of `gtids` GTIDs recorded (fewer when domains repeat).
    pub(crate) fn mariadb_states(
        gtids: std::ops::Range<usize>,
    ) -> impl Strategy<Value = MariaDbState> {
        proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u64>()), gtids).prop_map(
            |gtids| {
                let mut state = MariaDbState::default();
                for (domain, server, seq) in gtids {
                    state.record(MariaDbGtid {
                        domain,
                        server,
                        seq,
                    });
                }
                state
            },
        )
    }

    fn mysql_set() -> impl Strategy<Value = MySqlSet> {
        let interval = (1u64..u64::MAX, any::<u16>())
            .prop_map(|(start, len)| (start, start.saturating_add(len.into())));
        let uuid = prop_oneof![
            prop::sample::select(vec![U1, U2]).prop_map(|u| Uuid::parse_str(u).unwrap()),
            any::<u128>().prop_map(Uuid::from_u128),
        ];
        proptest::collection::vec((uuid, interval), 1..6).prop_map(|intervals| {
            let mut set = MySqlSet::default();
            for (uuid, (start, end)) in intervals {
                set.add(uuid, start, end);
            }
            set
        })
    }

    fn binlog_file() -> impl Strategy<Value = BinlogFile> {
        ("[a-zA-Z0-9_.:/-]{1,12}", "[0-9]{1,8}")
            .prop_map(|(base, number)| file(&format!("{base}.{number}")))
    }

    fn position() -> impl Strategy<Value = Position> {
        let gtid = proptest::option::of(prop_oneof![
            mariadb_state().prop_map(Gtids::MariaDb),
            mysql_set().prop_map(Gtids::MySql),
        ]);
        (gtid, binlog_file(), any::<u64>(), any::<u32>())
            .prop_map(|(gtid, file, offset, index)| Position::new(gtid, file, offset, index))
    }

    /// Texts that are positions, or nearly: real ones mangled.
    fn nearly() -> impl Strategy<Value = String> {
        crate::position::strategies::mangled(
            vec![
                "mariadb:0-1-42@mariadb-bin.000001:1234#3",
                "mariadb:0-1-10,1-2-5@mysql-bin.000003:4567#2",
                "mariadb:mysql-bin.000003:4567",
                "mariadb:3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7-9,8f2a4c10-0b5e-11ee-8c90-0242ac120002:1-3@binlog.000001:4#0",
            ],
            "[0-9a-f#@:,.\\- ]{0,4}",
        )
    }

    /// An error that quotes what it is about.
    fn quotes(e: &str) -> bool {
        e.starts_with('`') && e[1..].contains('`')
    }

    proptest! {
        #[test]
        fn positions_round_trip_as_text_and_json(p in position()) {
            prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p.clone()));
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p.clone());
            prop_assert_eq!(p.cmp(&p.clone()), Ordering::Equal);
        }

        #[test]
        fn gtids_and_files_round_trip_as_text(
            state in mariadb_state(),
            set in mysql_set(),
            f in binlog_file(),
        ) {
            prop_assert_eq!(state.to_string().parse::<MariaDbState>(), Ok(state.clone()));
            prop_assert_eq!(set.to_string().parse::<MySqlSet>(), Ok(set.clone()));
            prop_assert_eq!(set.to_string().parse::<Gtids>(), Ok(Gtids::MySql(set)));
            prop_assert_eq!(state.to_string().parse::<Gtids>(), Ok(Gtids::MariaDb(state)));
            prop_assert_eq!(f.to_string().parse::<BinlogFile>(), Ok(f));
        }

        #[test]
        fn the_order_agrees_with_equality(a in position(), b in position()) {
            prop_assert_eq!(a.cmp(&b) == Ordering::Equal, a == b);
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
        }

        #[test]
        fn any_text_is_a_position_or_says_why(text in prop_oneof![any::<String>(), nearly()]) {
            match text.parse::<Position>() {
                Ok(p) => prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p)),
                Err(e) => prop_assert!(e.contains(&format!("`{text}`")), "{}", e),
            }
            match text.parse::<Gtids>() {
                Ok(g) => prop_assert_eq!(g.to_string().parse::<Gtids>(), Ok(g)),
                Err(e) => prop_assert!(quotes(&e), "{}", e),
            }
            match text.parse::<MariaDbState>() {
                Ok(s) => prop_assert_eq!(s.to_string().parse::<MariaDbState>(), Ok(s)),
                Err(e) => prop_assert!(quotes(&e), "{}", e),
            }
            match text.parse::<MySqlSet>() {
                Ok(s) => prop_assert_eq!(s.to_string().parse::<MySqlSet>(), Ok(s)),
                Err(e) => prop_assert!(e.contains(&format!("`{text}`")), "{}", e),
            }
            match text.parse::<BinlogFile>() {
                Ok(f) => prop_assert_eq!(f.to_string().parse::<BinlogFile>(), Ok(f)),
                Err(e) => prop_assert!(e.contains(&format!("`{text}`")), "{}", e),
            }
        }
    }
}
