//! SQL Server positions: `(Change Tracking version, index, last ordinal done)`.

use crate::position::{LogPosition, split_index, strip_engine};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A resume point in SQL Server Change Tracking.
///
/// Change Tracking gives every row of a transaction the same version and
/// no order among them: the outbox's `[ordinal]` column (`bigint
/// IDENTITY`) gives it, and the rows of one version are read in ordinal
/// order. A resume point names the last row of `version` done by its
/// ordinal: rows of that version leave Change Tracking's inserts when this
/// site's sink deletes them (their events came back round), so a count of
/// rows done can point past rows never read; an ordinal cannot.
///
/// Ordered by version and index; the ordinal only breaks a tie, so that the
/// order agrees with `==` (one stream never yields two positions that
/// differ only by their ordinal).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Stored", into = "Stored")]
pub struct Position {
    /// `SYS_CHANGE_VERSION` of the change.
    pub version: i64,
    /// Changes of that version already done (counted when they were read:
    /// it orders positions, and resumes only a position without `after`).
    pub index: u32,
    /// The `[ordinal]` of the last row of `version` done: a restart reads
    /// the rows of `version` whose ordinal is above it. A row's own
    /// position carries the row's ordinal, so that
    /// [`LogPosition::next_row`] resumes after it; used as a resume point
    /// it therefore resumes *after* that row. `None`: at the start of a
    /// version, or a position typed without it (then the first `index`
    /// rows are skipped by count).
    pub after: Option<i64>,
}

impl LogPosition for Position {
    const ENGINE: &'static str = "sqlserver";

    /// A row's position already carries its own ordinal in `after`: it is kept.
    fn next_row(&self) -> Position {
        Position {
            version: self.version,
            index: self.index.saturating_add(1),
            after: self.after,
        }
    }
}

/// What a position written before the ordinal column says instead of one.
const KEYED: &str = "this position resumes after an outbox key (`@key`), as sitesync did before the outbox had its `[ordinal]` column; keys do not give the order of the rows of one transaction, ordinals do. \
     Run `sitesync init` (it adds the column), then `sitesync checkpoint reset --to-position sqlserver:<version>` with the same version: that version's rows are sent again from its start (the other sites' inboxes drop those they have, by event id); an index would count rows in another order than the one it was written in";

/// The JSON form: `{"engine":"sql_server","version":10,"index":2,"after_ordinal":42}`.
/// `after` (a key) is what earlier releases wrote: it is read, to refuse it
/// with what to do.
#[derive(Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "snake_case")]
enum Stored {
    SqlServer {
        version: i64,
        index: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_ordinal: Option<i64>,
        #[serde(default, skip_serializing)]
        after: Option<String>,
    },
}

impl TryFrom<Stored> for Position {
    type Error = String;

    fn try_from(s: Stored) -> Result<Position, String> {
        let Stored::SqlServer {
            version,
            index,
            after_ordinal,
            after,
        } = s;
        if let Some(key) = after {
            return Err(format!("sqlserver:{version}#{index}@{key}: {KEYED}"));
        }
        Ok(Position {
            version,
            index,
            after: after_ordinal,
        })
    }
}

impl From<Position> for Stored {
    fn from(p: Position) -> Stored {
        Stored::SqlServer {
            version: p.version,
            index: p.index,
            after_ordinal: p.after,
            after: None,
        }
    }
}

/// `sqlserver:9876#2/1234` (`/` the ordinal of the last row of that
/// version done). `#index` and `/ordinal` may be left out.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sqlserver:{}#{}", self.version, self.index)?;
        if let Some(ordinal) = self.after {
            write!(f, "/{ordinal}")?;
        }
        Ok(())
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Position, String> {
        let rest = strip_engine(text, Position::ENGINE, "sqlserver:9876#2/1234")?;
        if rest.contains('@') {
            return Err(format!("`{text}`: {KEYED}"));
        }
        let (rest, after) = match rest.split_once('/') {
            Some((rest, ordinal)) => (
                rest,
                Some(ordinal.parse::<i64>().map_err(|_| {
                    format!("`{text}`: the ordinal after / must be a number (leave out the / to resume by count)")
                })?),
            ),
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
    use proptest::prelude::*;
    use std::cmp::Ordering;

    fn s(version: i64, index: u32, after: Option<i64>) -> Position {
        Position {
            version,
            index,
            after,
        }
    }

    #[test]
    fn text_round_trip() {
        for p in [s(9876, 2, None), s(9876, 2, Some(1234)), s(1, 0, Some(1))] {
            let text = p.to_string();
            assert_eq!(text.parse::<Position>().unwrap(), p, "{text}");
        }
    }

    #[test]
    fn sqlserver_positions_order_by_version_then_row_and_carry_the_last_ordinal_done() {
        // (version, index) orders; the ordinal is only a resume hint.
        assert!(s(10, 5, Some(99)) < s(11, 0, None));
        assert!(s(10, 5, Some(99)) < s(10, 6, Some(1)));
        assert!(s(10, 0, None) < s(10, 1, Some(1)));
        assert!(s(10, 5, Some(7)) == s(10, 5, Some(7)));
        // Consistent with `==`: only the same ordinal is Equal.
        assert_ne!(
            s(10, 5, Some(7)).partial_cmp(&s(10, 5, None)),
            Some(Ordering::Equal)
        );
        // A row's position carries its ordinal; the next row's resume
        // point keeps it, one row further.
        assert_eq!(s(10, 5, Some(7)).next_row(), s(10, 6, Some(7)));
        assert_eq!(
            "sqlserver:10#5/1234".parse::<Position>().unwrap(),
            s(10, 5, Some(1234))
        );
        assert_eq!(
            "sqlserver:10/42".parse::<Position>().unwrap(),
            s(10, 0, Some(42))
        );
        assert_eq!(
            "sqlserver:10#5".parse::<Position>().unwrap(),
            s(10, 5, None)
        );
        let e = "sqlserver:10#5/".parse::<Position>().unwrap_err();
        assert!(e.contains("ordinal after / must be a number"), "{e}");
        assert!("sqlserver:x#5/42".parse::<Position>().is_err());
        // Serde: no ordinal, no field.
        let json = serde_json::to_string(&s(10, 2, None)).unwrap();
        assert_eq!(json, r#"{"engine":"sql_server","version":10,"index":2}"#);
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            s(10, 2, None)
        );
        let json = serde_json::to_string(&s(10, 2, Some(42))).unwrap();
        assert_eq!(
            json,
            r#"{"engine":"sql_server","version":10,"index":2,"after_ordinal":42}"#
        );
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            s(10, 2, Some(42))
        );
    }

    #[test]
    fn a_position_after_an_outbox_key_is_refused_with_what_to_do() {
        // Written by a release that resumed by key: the key says nothing
        // of the order of the rows of one transaction.
        let e = serde_json::from_str::<Position>(
            r#"{"engine":"sql_server","version":10,"index":2,"after":"7f1d8a5e-3c2b-4a8e-9f00-0123456789ab"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sqlserver:10#2@7f1d8a5e"), "{e}");
        assert!(
            e.contains("checkpoint reset --to-position sqlserver:<version>` with the same version"),
            "{e}"
        );
        let e = "sqlserver:10#2@42".parse::<Position>().unwrap_err();
        assert!(e.contains("`[ordinal]` column"), "{e}");
    }

    fn position() -> impl Strategy<Value = Position> {
        (any::<i64>(), any::<u32>(), any::<Option<i64>>())
            .prop_map(|(version, index, after)| s(version, index, after))
    }

    fn nearly() -> impl Strategy<Value = String> {
        crate::position::strategies::mangled(
            vec![
                "sqlserver:9876#2/1234",
                "sqlserver:10",
                "sqlserver:-5#0/-9223372036854775808",
            ],
            "[0-9#@/:+ -]{0,4}",
        )
    }

    proptest! {
        #[test]
        fn positions_round_trip_as_text_and_json(p in position()) {
            prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p.clone()));
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);
        }

        #[test]
        fn any_text_is_a_position_or_says_why(text in prop_oneof![any::<String>(), nearly()]) {
            match text.parse::<Position>() {
                Ok(p) => prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p)),
                Err(e) => prop_assert!(e.contains(&format!("`{text}`")), "{}", e),
            }
        }
    }
}
