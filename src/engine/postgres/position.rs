//! PostgreSQL positions: `(commit LSN, index in the transaction)`.

use crate::position::{LogPosition, split_index, strip_engine};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A resume point in PostgreSQL's WAL.
///
/// Ordered by `lsn`, then `index`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct Position {
    /// The LSN of the transaction's commit record (pgoutput
    /// `Begin.final_lsn`), or, between transactions, an LSN every earlier
    /// commit ends before. Reported to the server as the flush LSN: the
    /// walsender then resends a transaction whose commit record starts
    /// exactly here, and skips every one that starts before.
    pub lsn: u64,
    /// Outbox rows of the transaction committing at `lsn` already done.
    pub index: u32,
}

impl LogPosition for Position {
    const ENGINE: &'static str = "postgres";

    fn next_row(&self) -> Position {
        Position {
            lsn: self.lsn,
            index: self.index.saturating_add(1),
        }
    }
}

/// The JSON form: `{"engine":"postgres","lsn":"0/16B3748","index":2}`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "snake_case")]
enum Stored {
    Postgres {
        #[serde(with = "lsn_text")]
        lsn: u64,
        index: u32,
    },
}

impl From<Stored> for Position {
    fn from(s: Stored) -> Position {
        let Stored::Postgres { lsn, index } = s;
        Position { lsn, index }
    }
}

impl From<Position> for Stored {
    fn from(p: Position) -> Stored {
        Stored::Postgres {
            lsn: p.lsn,
            index: p.index,
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

/// `postgres:0/16B3748#3` (the `#index` may be left out: 0).
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres:{}#{}", format_lsn(self.lsn), self.index)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Position, String> {
        let rest = strip_engine(text, Position::ENGINE, "postgres:0/16B3748#3")?;
        let (at, index) = split_index(rest, text)?;
        Ok(Position {
            lsn: parse_lsn(at)?,
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pg(lsn: u64, index: u32) -> Position {
        Position { lsn, index }
    }

    #[test]
    fn postgres_positions_order_by_commit_then_row() {
        assert!(pg(10, 5) < pg(11, 0));
        assert!(pg(10, 5) < pg(10, 6));
        assert!(pg(10, 5) == pg(10, 5));
        assert!(pg(0x1_0000_0000, 0) > pg(0xFFFF_FFFF, 9));
        assert_eq!(pg(10, 5).next_row(), pg(10, 6));
    }

    #[test]
    fn text_round_trip() {
        let p = pg(0x1_16B3_7480, 3);
        let text = p.to_string();
        assert_eq!(text.parse::<Position>().unwrap(), p, "{text}");
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
        assert!(e.contains("a position of `db2`"), "{e}");
        let e = "postgres:0/1#x".parse::<Position>().unwrap_err();
        assert!(e.contains("index"), "{e}");
        assert!("postgres:0/1@5".parse::<Position>().is_err());
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

    #[test]
    fn a_position_of_another_engine_is_not_read_as_one_of_postgres() {
        let oracle = r#"{"engine":"oracle","scn":10,"index":2}"#;
        assert!(serde_json::from_str::<Position>(oracle).is_err());
        let e = "oracle:10#2".parse::<Position>().unwrap_err();
        assert!(e.contains("this connector reads postgres"), "{e}");
    }

    /// Texts that are positions, or nearly: real ones mangled.
    fn nearly() -> impl Strategy<Value = String> {
        crate::position::strategies::mangled(
            vec![
                "postgres:0/16B3748",
                "postgres:1/16B37480#3",
                "postgres:FFFFFFFF/FFFFFFFF#4294967295",
            ],
            "[0-9A-Fa-f/#:+ -]{0,4}",
        )
    }

    proptest! {
        #[test]
        fn positions_round_trip_as_text_and_json(lsn in any::<u64>(), index in any::<u32>()) {
            let p = pg(lsn, index);
            prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p.clone()));
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);
            prop_assert_eq!(parse_lsn(&format_lsn(lsn)), Ok(lsn));
        }

        #[test]
        fn any_text_is_a_position_or_says_why(text in prop_oneof![any::<String>(), nearly()]) {
            match text.parse::<Position>() {
                Ok(p) => prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p)),
                // The whole text, or the LSN part of it (parse_lsn's own).
                Err(e) => prop_assert!(e.contains(&format!("`{text}`")) || e.contains("LSN"), "{}", e),
            }
            match parse_lsn(&text) {
                Ok(lsn) => prop_assert_eq!(parse_lsn(&format_lsn(lsn)), Ok(lsn)),
                Err(e) => prop_assert!(e.contains("LSN"), "{}", e),
            }
        }
    }
}
