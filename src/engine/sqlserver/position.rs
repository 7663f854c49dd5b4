//! SQL Server positions: `(Change Tracking version, index, last key done)`.

use crate::position::{LogPosition, split_index, strip_engine};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A resume point in SQL Server Change Tracking.
///
/// The rows of one version are read in key order. A resume point names
/// the last row of `version` done by its outbox key: rows of that version
/// leave Change Tracking's inserts when this site's sink deletes them
/// (their events came back round), so a count of rows done can point past
/// rows never read, a key cannot.
///
/// Ordered by version and index; the key only breaks a tie, so that the
/// order agrees with `==` (one stream never yields two positions that
/// differ only by their key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct Position {
    /// `SYS_CHANGE_VERSION` of the change.
    pub version: i64,
    /// Changes of that version already done (counted when they were read:
    /// it orders positions, and resumes only a position without `after`).
    pub index: u32,
    /// The outbox key (`id`, as text) of the last row of `version` done: a
    /// restart reads the rows of `version` whose key is above it, compared
    /// by SQL Server in the column's type (uniqueidentifier order is not
    /// text order). A row's own position carries the row's key, so that
    /// [`LogPosition::next_row`] resumes after it; used as a resume point it
    /// therefore resumes *after* that row. `None`: at the start of a
    /// version, or a checkpoint written before the key was kept (then the
    /// first `index` rows are skipped by count).
    pub after: Option<String>,
}

impl LogPosition for Position {
    const ENGINE: &'static str = "sqlserver";

    /// A row's position already carries its own key in `after`: it is kept.
    fn next_row(&self) -> Position {
        Position {
            version: self.version,
            index: self.index.saturating_add(1),
            after: self.after.clone(),
        }
    }
}

/// The JSON form: `{"engine":"sql_server","version":10,"index":2,"after":"42"}`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "snake_case")]
enum Stored {
    SqlServer {
        version: i64,
        index: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
}

impl From<Stored> for Position {
    fn from(s: Stored) -> Position {
        let Stored::SqlServer {
            version,
            index,
            after,
        } = s;
        Position {
            version,
            index,
            after,
        }
    }
}

impl From<Position> for Stored {
    fn from(p: Position) -> Stored {
        Stored::SqlServer {
            version: p.version,
            index: p.index,
            after: p.after,
        }
    }
}

/// `sqlserver:9876#2@7f1d8a5e-…` (`@` the outbox key of the last row of
/// that version done: everything after `@` is the key). `#index` and
/// `@after` may be left out.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sqlserver:{}#{}", self.version, self.index)?;
        if let Some(key) = &self.after {
            write!(f, "@{key}")?;
        }
        Ok(())
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Position, String> {
        let rest = strip_engine(text, Position::ENGINE, "sqlserver:9876#2")?;
        // The key is the last part and may hold any character.
        let (rest, after) = match rest.split_once('@') {
            Some((_, "")) => {
                return Err(format!(
                    "`{text}`: the outbox key after @ is empty (leave out the @ to resume by count)"
                ));
            }
            Some((rest, key)) => (rest, Some(key.to_string())),
            None => (rest, None),
        };
        let (at, index) = split_index(rest, text)?;
        Ok(Position {
            version: at
                .parse()
                .map_err(|_| format!("`{text}`: the Change Tracking version must be a number"))?,
            index,
            after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    fn s(version: i64, index: u32, after: Option<&str>) -> Position {
        Position {
            version,
            index,
            after: after.map(str::to_string),
        }
    }

    #[test]
    fn text_round_trip() {
        for p in [
            s(9876, 2, None),
            s(9876, 2, Some("7f1d8a5e-3c2b-4a8e-9f00-0123456789ab")),
            // Whatever the key holds comes back (an nvarchar key).
            s(1, 0, Some("a#1@b:c")),
        ] {
            let text = p.to_string();
            assert_eq!(text.parse::<Position>().unwrap(), p, "{text}");
        }
    }

    #[test]
    fn sqlserver_positions_order_by_version_then_row_and_carry_the_last_key_done() {
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
}
