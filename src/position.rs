//! Positions in a database's change log.
//!
//! A [`Position`] is a *resume point*: everything strictly before it has been
//! published, confirmed by the broker and checkpointed; the event at exactly
//! this position (if there is one) has not. Each engine has its own shape, but
//! every variant is "where the transaction commits in the log" plus "how many
//! of its outbox rows are done" (SQL Server: and the key of the last one,
//! which is what it resumes after), so a crash in the middle of a huge
//! transaction resumes after the last confirmed row instead of at its start.
//!
//! Positions are totally ordered within one engine; positions of two engines
//! are not comparable (`partial_cmp` returns `None`).

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A resume point in one database's change log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "snake_case")]
pub enum Position {
    /// PostgreSQL logical replication.
    Postgres {
        /// The LSN of the transaction's commit record (pgoutput `Begin.final_lsn`),
        /// or, between transactions, an LSN every earlier commit ends before.
        /// Reported to the server as the flush LSN: the walsender then resends
        /// a transaction whose commit record starts exactly here, and skips
        /// every one that starts before.
        #[serde(with = "lsn_text")]
        lsn: u64,
        /// Outbox rows of the transaction committing at `lsn` already done.
        index: u32,
    },
    /// MySQL / MariaDB binlog: the file and offset of the transaction's first
    /// event (its GTID or BEGIN), so that a restart re-reads it whole.
    Mysql {
        /// Binlog file name, e.g. `mysql-bin.000042`: ordered by its numeric suffix.
        file: String,
        /// Byte offset of the transaction in `file`.
        offset: u64,
        /// Outbox rows of that transaction already done.
        index: u32,
    },
    /// SQL Server Change Tracking.
    ///
    /// The rows of one version are read in key order. A resume point names
    /// the last row of `version` done by its outbox key: rows of that
    /// version leave Change Tracking's inserts when this site's sink deletes
    /// them (their events came back round), so a count of rows done can
    /// point past rows never read, a key cannot.
    SqlServer {
        /// `SYS_CHANGE_VERSION` of the change.
        version: i64,
        /// Changes of that version already done (counted when they were
        /// read: it orders positions, and resumes only a position without
        /// `after`).
        index: u32,
        /// The outbox key (`id`, as text) of the last row of `version`
        /// done: a restart reads the rows of `version` whose key is above
        /// it, compared by SQL Server in the column's type (uniqueidentifier
        /// order is not text order). A row's own position carries the row's
        /// key, so that [`Position::next_row`] resumes after it; used as a
        /// resume point it therefore resumes *after* that row. `None`: at
        /// the start of a version, or a checkpoint written before the key
        /// was kept (then the first `index` rows are skipped by count).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    /// Oracle LogMiner.
    ///
    /// Several transactions can commit at one SCN: they are ordered by XID
    /// and `index` counts the outbox rows of all of them, so
    /// `(scn, index)` names one row whatever the redo order.
    Oracle {
        /// Commit SCN of the transaction (between transactions: every
        /// commit before this SCN is done).
        scn: u64,
        /// Outbox rows committed at `scn` already done, counted across the
        /// transactions committing there in XID order.
        index: u32,
        /// Where LogMiner must start reading to see every row not yet done:
        /// the first SCN of the oldest transaction with outbox rows that
        /// had not committed, or not been fully done, at this point. A
        /// position typed by hand without it (`oracle:123#0`) mines from
        /// `scn` itself: transactions that started earlier and commit later
        /// are then read only from `scn` on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mine_from: Option<u64>,
    },
}

impl Position {
    /// The engine's name, as written in connector files and headers.
    pub fn engine(&self) -> &'static str {
        match self {
            Position::Postgres { .. } => "postgres",
            Position::Mysql { .. } => "mysql",
            Position::SqlServer { .. } => "sqlserver",
            Position::Oracle { .. } => "oracle",
        }
    }

    /// The position of the next row in the same transaction: once the row
    /// at `self` is done, the resume point. (A SQL Server row's position
    /// already carries its own key in `after`: it is kept.)
    pub fn next_row(&self) -> Position {
        let mut next = self.clone();
        match &mut next {
            Position::Postgres { index, .. }
            | Position::Mysql { index, .. }
            | Position::SqlServer { index, .. }
            | Position::Oracle { index, .. } => *index = index.saturating_add(1),
        }
        next
    }
}

/// Binlog files are named `<base>.<number>`; order by base, then number.
fn binlog_key(file: &str) -> (&str, u64) {
    match file.rsplit_once('.') {
        Some((base, n)) => (base, n.parse().unwrap_or(0)),
        None => (file, 0),
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        use Position::*;
        match (self, other) {
            (Postgres { lsn: a, index: i }, Postgres { lsn: b, index: j }) => {
                Some((a, i).cmp(&(b, j)))
            }
            (
                Mysql {
                    file: fa,
                    offset: oa,
                    index: i,
                },
                Mysql {
                    file: fb,
                    offset: ob,
                    index: j,
                },
            ) => Some((binlog_key(fa), oa, i).cmp(&(binlog_key(fb), ob, j))),
            // By version and index; the key only breaks a tie, so that the
            // order agrees with `==` (one stream never yields two positions
            // that differ only by their key).
            (
                SqlServer {
                    version: a,
                    index: i,
                    after: k,
                },
                SqlServer {
                    version: b,
                    index: j,
                    after: l,
                },
            ) => Some((a, i, k).cmp(&(b, j, l))),
            (
                Oracle {
                    scn: a,
                    index: i,
                    mine_from: m,
                },
                Oracle {
                    scn: b,
                    index: j,
                    mine_from: n,
                },
            ) => Some((a, i, m).cmp(&(b, j, n))),
            _ => None,
        }
    }
}

/// Formats an LSN the way PostgreSQL does: `16B3748` split as `0/16B3748`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `X/Y` (hex halves), as printed by PostgreSQL.
pub fn parse_lsn(text: &str) -> Result<u64, String> {
    let (hi, lo) = text
        .split_once('/')
        .ok_or_else(|| format!("`{text}` is not an LSN (expected the form 0/16B3748)"))?;
    let hi = u32::from_str_radix(hi, 16).map_err(|_| format!("`{text}`: bad LSN high half"))?;
    let lo = u32::from_str_radix(lo, 16).map_err(|_| format!("`{text}`: bad LSN low half"))?;
    Ok(((hi as u64) << 32) | lo as u64)
}

mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(lsn: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_lsn(*lsn))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_lsn(&text).map_err(serde::de::Error::custom)
    }
}

/// Text form used in message headers and on the command line:
/// `postgres:0/16B3748#3`, `mysql:mysql-bin.000042:1234#0`,
/// `sqlserver:9876#2@7f1d8a5e-3c2b-4a8e-9f00-0123456789ab` (`@` the outbox
/// key of the last row of that version done: everything after `@` is the
/// key), `oracle:123456789#0@123456700` (`@` the SCN mining restarts from).
/// The `#index` part may be omitted on input (it means 0), and so may
/// SQL Server's `@after` and Oracle's `@mine_from`.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Postgres { lsn, index } => write!(f, "postgres:{}#{index}", format_lsn(*lsn)),
            Position::Mysql {
                file,
                offset,
                index,
            } => write!(f, "mysql:{file}:{offset}#{index}"),
            Position::SqlServer {
                version,
                index,
                after: None,
            } => write!(f, "sqlserver:{version}#{index}"),
            Position::SqlServer {
                version,
                index,
                after: Some(key),
            } => write!(f, "sqlserver:{version}#{index}@{key}"),
            Position::Oracle {
                scn,
                index,
                mine_from: None,
            } => write!(f, "oracle:{scn}#{index}"),
            Position::Oracle {
                scn,
                index,
                mine_from: Some(from),
            } => write!(f, "oracle:{scn}#{index}@{from}"),
        }
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (engine, rest) = text.split_once(':').ok_or_else(|| {
            format!("`{text}` is not a position: expected <engine>:<log position>[#index], e.g. postgres:0/16B3748")
        })?;
        // A SQL Server key is the last part and may hold any character.
        let (rest, after) = match rest.split_once('@') {
            Some((rest, key)) if engine == "sqlserver" => {
                if key.is_empty() {
                    return Err(format!(
                        "`{text}`: the outbox key after @ is empty (leave out the @ to resume by count)"
                    ));
                }
                (rest, Some(key.to_string()))
            }
            _ => (rest, None),
        };
        let (rest, mine_from) = match rest.split_once('@') {
            Some((rest, from)) if engine == "oracle" => (
                rest,
                Some(from.parse::<u64>().map_err(|_| {
                    format!("`{text}`: the SCN after @ (where mining restarts) must be a number")
                })?),
            ),
            _ => (rest, None),
        };
        let (at, index) = match rest.rsplit_once('#') {
            Some((at, index)) => (
                at,
                index
                    .parse::<u32>()
                    .map_err(|_| format!("`{text}`: the index after # must be a number"))?,
            ),
            None => (rest, 0),
        };
        match engine {
            "postgres" => Ok(Position::Postgres {
                lsn: parse_lsn(at)?,
                index,
            }),
            "mysql" => {
                let (file, offset) = at
                    .rsplit_once(':')
                    .ok_or_else(|| format!("`{text}`: expected mysql:<file>:<offset>"))?;
                Ok(Position::Mysql {
                    file: file.to_string(),
                    offset: offset
                        .parse()
                        .map_err(|_| format!("`{text}`: the binlog offset must be a number"))?,
                    index,
                })
            }
            "sqlserver" => Ok(Position::SqlServer {
                version: at.parse().map_err(|_| {
                    format!("`{text}`: the Change Tracking version must be a number")
                })?,
                index,
                after,
            }),
            "oracle" => Ok(Position::Oracle {
                scn: at
                    .parse()
                    .map_err(|_| format!("`{text}`: the SCN must be a number"))?,
                index,
                mine_from,
            }),
            other => Err(format!(
                "`{text}`: unknown engine `{other}` (expected postgres, mysql, sqlserver or oracle)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(lsn: u64, index: u32) -> Position {
        Position::Postgres { lsn, index }
    }

    #[test]
    fn postgres_positions_order_by_commit_then_row() {
        assert!(pg(10, 5) < pg(11, 0));
        assert!(pg(10, 5) < pg(10, 6));
        assert!(pg(10, 5) == pg(10, 5));
        assert!(pg(0x1_0000_0000, 0) > pg(0xFFFF_FFFF, 9));
    }

    #[test]
    fn engines_do_not_compare() {
        let o = Position::Oracle {
            scn: 1,
            index: 0,
            mine_from: None,
        };
        assert_eq!(pg(1, 0).partial_cmp(&o), None);
        assert!(pg(1, 0).partial_cmp(&o).is_none() && o.partial_cmp(&pg(1, 0)).is_none());
    }

    #[test]
    fn binlog_files_order_numerically() {
        let a = Position::Mysql {
            file: "bin.000009".into(),
            offset: 900,
            index: 0,
        };
        let b = Position::Mysql {
            file: "bin.000010".into(),
            offset: 4,
            index: 0,
        };
        assert!(a < b);
    }

    #[test]
    fn text_round_trip() {
        for p in [
            pg(0x1_16B3_7480, 3),
            Position::Mysql {
                file: "mysql-bin.000042".into(),
                offset: 1234,
                index: 1,
            },
            Position::SqlServer {
                version: 9876,
                index: 2,
                after: None,
            },
            Position::SqlServer {
                version: 9876,
                index: 2,
                after: Some("7f1d8a5e-3c2b-4a8e-9f00-0123456789ab".into()),
            },
            // Whatever the key holds comes back (an nvarchar key).
            Position::SqlServer {
                version: 1,
                index: 0,
                after: Some("a#1@b:c".into()),
            },
            Position::Oracle {
                scn: 123_456_789,
                index: 0,
                mine_from: None,
            },
            Position::Oracle {
                scn: 123_456_789,
                index: 4,
                mine_from: Some(123_456_000),
            },
        ] {
            let text = p.to_string();
            assert_eq!(text.parse::<Position>().unwrap(), p, "{text}");
        }
        assert_eq!(
            "postgres:0/16B3748".parse::<Position>().unwrap(),
            pg(0x16B3748, 0)
        );
    }

    #[test]
    fn bad_text_names_the_problem() {
        let e = "postgres:nonsense".parse::<Position>().unwrap_err();
        assert!(e.contains("not an LSN"), "{e}");
        let e = "db2:1".parse::<Position>().unwrap_err();
        assert!(e.contains("unknown engine `db2`"), "{e}");
        let e = "postgres:0/1#x".parse::<Position>().unwrap_err();
        assert!(e.contains("index"), "{e}");
    }

    #[test]
    fn oracle_positions_order_by_commit_scn_then_row_and_keep_where_mining_restarts() {
        let o = |scn, index, from| Position::Oracle {
            scn,
            index,
            mine_from: from,
        };
        assert!(o(10, 5, Some(3)) < o(11, 0, Some(3)));
        assert!(o(10, 5, Some(3)) < o(10, 6, Some(3)));
        assert_eq!(
            "oracle:10#2@7".parse::<Position>().unwrap(),
            o(10, 2, Some(7))
        );
        assert_eq!("oracle:10".parse::<Position>().unwrap(), o(10, 0, None));
        assert!("oracle:10#2@x".parse::<Position>().is_err());
        assert!("postgres:0/1@5".parse::<Position>().is_err());
        let json = serde_json::to_string(&o(10, 2, None)).unwrap();
        assert_eq!(json, r#"{"engine":"oracle","scn":10,"index":2}"#);
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            o(10, 2, None)
        );
    }

    #[test]
    fn sqlserver_positions_order_by_version_then_row_and_carry_the_last_key_done() {
        let s = |version, index, after: Option<&str>| Position::SqlServer {
            version,
            index,
            after: after.map(str::to_string),
        };
        // (version, index) orders; the key is only a resume hint.
        assert!(s(10, 5, Some("z")) < s(11, 0, None));
        assert!(s(10, 5, Some("z")) < s(10, 6, Some("a")));
        assert!(s(10, 0, None) < s(10, 1, Some("a")));
        assert!(s(10, 5, Some("k")) == s(10, 5, Some("k")));
        // Consistent with `==`: only the same key is Equal.
        assert_ne!(
            s(10, 5, Some("k")).partial_cmp(&s(10, 5, None)),
            Some(Ordering::Equal)
        );
        // A row's position carries its key; the next row's resume point
        // keeps it, one row further.
        assert_eq!(s(10, 5, Some("k")).next_row(), s(10, 6, Some("k")));
        assert_eq!(
            "sqlserver:10#5@7F1D8A5E-3C2B-4A8E-9F00-0123456789AB"
                .parse::<Position>()
                .unwrap(),
            s(10, 5, Some("7F1D8A5E-3C2B-4A8E-9F00-0123456789AB"))
        );
        assert_eq!(
            "sqlserver:10@42".parse::<Position>().unwrap(),
            s(10, 0, Some("42"))
        );
        assert_eq!(
            "sqlserver:10#5".parse::<Position>().unwrap(),
            s(10, 5, None)
        );
        let e = "sqlserver:10#5@".parse::<Position>().unwrap_err();
        assert!(e.contains("key after @ is empty"), "{e}");
        assert!("sqlserver:x#5@42".parse::<Position>().is_err());
        // Serde: no key, no field; a checkpoint written before the key
        // was kept still loads.
        let json = serde_json::to_string(&s(10, 2, None)).unwrap();
        assert_eq!(json, r#"{"engine":"sql_server","version":10,"index":2}"#);
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            s(10, 2, None)
        );
        let json = serde_json::to_string(&s(10, 2, Some("42"))).unwrap();
        assert_eq!(
            json,
            r#"{"engine":"sql_server","version":10,"index":2,"after":"42"}"#
        );
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            s(10, 2, Some("42"))
        );
    }

    #[test]
    fn serde_keeps_lsn_readable() {
        let json = serde_json::to_string(&pg(0x16B3748, 2)).unwrap();
        assert_eq!(json, r#"{"engine":"postgres","lsn":"0/16B3748","index":2}"#);
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            pg(0x16B3748, 2)
        );
    }
}
