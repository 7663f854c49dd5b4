//! Positions in a database's change log, as the engine-free parts see them.
//!
//! A position is a *resume point*: everything strictly before it has been
//! published, confirmed by the broker and checkpointed; the event at exactly
//! this position (if there is one) has not. Each engine has its own shape
//! (in its folder under `crate::engine`), but every one is "where the
//! transaction commits in the log" plus "how many of its outbox rows are
//! done", so a crash in the middle of a huge transaction resumes after the
//! last confirmed row instead of at its start.
//!
//! The runner, the checkpoint store and the publisher handle positions
//! through [`LogPosition`]: totally ordered within one engine, written as
//! text (`postgres:0/16B3748#3`) and as JSON tagged with the engine
//! (`{"engine":"postgres",…}`), so that a checkpoint of another engine is
//! refused by name instead of misread.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::{Debug, Display};
use std::str::FromStr;

/// What every engine's position offers.
pub trait LogPosition:
    Clone
    + Debug
    + Display
    + FromStr<Err = String>
    + Ord
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + Unpin
    + 'static
{
    /// The engine's name, as its text form starts (`postgres:`) and as its
    /// JSON form is tagged.
    const ENGINE: &'static str;

    /// The position of the next row in the same transaction: once the row
    /// at `self` is done, the resume point.
    fn next_row(&self) -> Self;
}

/// The part after `<engine>:` of a position's text, checked to be of
/// `engine`; `example` shows the form in the error.
pub fn strip_engine<'a>(text: &'a str, engine: &str, example: &str) -> Result<&'a str, String> {
    match text.split_once(':') {
        Some((e, rest)) if e == engine => Ok(rest),
        Some((other, _)) => Err(format!(
            "`{text}` is a position of `{other}`; this connector reads {engine} (e.g. {example})"
        )),
        None => Err(format!(
            "`{text}` is not a position: expected {engine}:<log position>[#index], e.g. {example}"
        )),
    }
}

/// Splits a trailing `#index` off `rest` (0 when there is none).
pub fn split_index<'a>(rest: &'a str, text: &str) -> Result<(&'a str, u32), String> {
    match rest.rsplit_once('#') {
        Some((at, index)) => Ok((
            at,
            index
                .parse::<u32>()
                .map_err(|_| format!("`{text}`: the index after # must be a number"))?,
        )),
        None => Ok((rest, 0)),
    }
}

/// The engine a position's JSON form names (`{"engine": …}`).
pub fn engine_of(json: &serde_json::Value) -> Option<&str> {
    json.get("engine")?.as_str()
}

/// Whether a JSON form's engine tag names `engine` (SQL Server's tag is
/// written `sql_server`, as stores written before kept it).
pub fn same_engine(tag: &str, engine: &str) -> bool {
    tag.replace('_', "") == engine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_checked_and_the_index_split() {
        assert_eq!(strip_engine("pg:0/1#2", "pg", "pg:0/1"), Ok("0/1#2"));
        let e = strip_engine("other:1", "pg", "pg:0/1").unwrap_err();
        assert!(
            e.contains("a position of `other`; this connector reads pg"),
            "{e}"
        );
        let e = strip_engine("nonsense", "pg", "pg:0/1").unwrap_err();
        assert!(e.contains("not a position"), "{e}");
        assert_eq!(split_index("0/1#2", "t"), Ok(("0/1", 2)));
        assert_eq!(split_index("0/1", "t"), Ok(("0/1", 0)));
        assert!(split_index("0/1#x", "t").unwrap_err().contains("index"));
        let json = serde_json::json!({"engine": "other", "at": 1});
        assert_eq!(engine_of(&json), Some("other"));
        assert!(same_engine("some_engine", "someengine"));
        assert!(!same_engine("other", "pg"));
    }
}

/// Property-test inputs shared by the engines' position tests.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    /// Texts that are positions, or nearly: one of `samples` with up to
    /// four characters of `junk` (a regex class) put in at any place.
    pub fn mangled(
        samples: Vec<&'static str>,
        junk: &'static str,
    ) -> impl Strategy<Value = String> {
        (
            prop::sample::select(samples),
            any::<prop::sample::Index>(),
            junk,
        )
            .prop_map(|(text, at, junk)| {
                let at = at.index(text.len() + 1);
                format!("{}{junk}{}", &text[..at], &text[at..])
            })
    }
}
