//! Oracle positions: `(commit SCN, index, where mining restarts)`.

use crate::position::{LogPosition, split_index, strip_engine};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A resume point in Oracle's redo, as LogMiner reads it.
///
/// Several transactions can commit at one SCN: they are ordered by XID and
/// `index` counts the outbox rows of all of them, so `(scn, index)` names
/// one row whatever the redo order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct Position {
    /// Commit SCN of the transaction (between transactions: every commit
    /// before this SCN is done).
    pub scn: u64,
    /// Outbox rows committed at `scn` already done, counted across the
    /// transactions committing there in XID order.
    pub index: u32,
    /// Where LogMiner must start reading to see every row not yet done:
    /// the first SCN of the oldest transaction with outbox rows that had
    /// not committed, or not been fully done, at this point. A position
    /// typed by hand without it (`oracle:123#0`) mines from `scn` itself:
    /// transactions that started earlier and commit later are then read
    /// only from `scn` on.
    pub mine_from: Option<u64>,
}

impl LogPosition for Position {
    const ENGINE: &'static str = "oracle";

    fn next_row(&self) -> Position {
        Position {
            scn: self.scn,
            index: self.index.saturating_add(1),
            mine_from: self.mine_from,
        }
    }
}

/// The JSON form: `{"engine":"oracle","scn":10,"index":2,"mine_from":7}`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "snake_case")]
enum Stored {
    Oracle {
        scn: u64,
        index: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mine_from: Option<u64>,
    },
}

impl From<Stored> for Position {
    fn from(s: Stored) -> Position {
        let Stored::Oracle {
            scn,
            index,
            mine_from,
        } = s;
        Position {
            scn,
            index,
            mine_from,
        }
    }
}

impl From<Position> for Stored {
    fn from(p: Position) -> Stored {
        Stored::Oracle {
            scn: p.scn,
            index: p.index,
            mine_from: p.mine_from,
        }
    }
}

/// `oracle:123456789#0@123456700` (`@` the SCN mining restarts from);
/// `#index` and `@mine_from` may be left out.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oracle:{}#{}", self.scn, self.index)?;
        if let Some(from) = self.mine_from {
            write!(f, "@{from}")?;
        }
        Ok(())
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Position, String> {
        let rest = strip_engine(text, Position::ENGINE, "oracle:123456789#0")?;
        let (rest, mine_from) = match rest.split_once('@') {
            Some((rest, from)) => (
                rest,
                Some(from.parse::<u64>().map_err(|_| {
                    format!("`{text}`: the SCN after @ (where mining restarts) must be a number")
                })?),
            ),
            None => (rest, None),
        };
        let (at, index) = split_index(rest, text)?;
        Ok(Position {
            scn: at
                .parse()
                .map_err(|_| format!("`{text}`: the SCN must be a number"))?,
            index,
            mine_from,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(scn: u64, index: u32, mine_from: Option<u64>) -> Position {
        Position {
            scn,
            index,
            mine_from,
        }
    }

    #[test]
    fn text_round_trip() {
        for p in [
            o(123_456_789, 0, None),
            o(123_456_789, 4, Some(123_456_000)),
        ] {
            let text = p.to_string();
            assert_eq!(text.parse::<Position>().unwrap(), p, "{text}");
        }
    }

    #[test]
    fn oracle_positions_order_by_commit_scn_then_row_and_keep_where_mining_restarts() {
        assert!(o(10, 5, Some(3)) < o(11, 0, Some(3)));
        assert!(o(10, 5, Some(3)) < o(10, 6, Some(3)));
        assert_eq!(
            "oracle:10#2@7".parse::<Position>().unwrap(),
            o(10, 2, Some(7))
        );
        assert_eq!("oracle:10".parse::<Position>().unwrap(), o(10, 0, None));
        assert!("oracle:10#2@x".parse::<Position>().is_err());
        let json = serde_json::to_string(&o(10, 2, None)).unwrap();
        assert_eq!(json, r#"{"engine":"oracle","scn":10,"index":2}"#);
        assert_eq!(
            serde_json::from_str::<Position>(&json).unwrap(),
            o(10, 2, None)
        );
    }

    fn position() -> impl Strategy<Value = Position> {
        (any::<u64>(), any::<u32>(), any::<Option<u64>>())
            .prop_map(|(scn, index, mine_from)| o(scn, index, mine_from))
    }

    fn nearly() -> impl Strategy<Value = String> {
        crate::position::strategies::mangled(
            vec![
                "oracle:123456789#0",
                "oracle:10#2@7",
                "oracle:18446744073709551615",
            ],
            "[0-9#@:+ -]{0,4}",
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
