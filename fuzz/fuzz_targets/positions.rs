//! Text that names a position or part of one (the command line's
//! `--to-position`, what the servers print, JSON from a checkpoint), and
//! the timestamps of outbox rows: no parser panics, and what one reads,
//! written again, reads back the same.
#![no_main]

use chrono::Datelike;
use libfuzzer_sys::fuzz_target;
use sitesync::engine::mariadb::position::{BinlogFile, Gtids, MariaDbGtid, MariaDbState, MySqlSet};
use sitesync::engine::{mariadb, oracle, postgres, sqlserver};
use sitesync::event::parse_timestamp;
use std::fmt::{Debug, Display};
use std::str::FromStr;

/// `T`'s text form: parsed, written, parsed again to the same.
fn text<T: FromStr<Err = String> + Display + PartialEq + Debug>(s: &str) {
    match s.parse::<T>() {
        Ok(v) => {
            let written = v.to_string();
            let again = written
                .parse::<T>()
                .unwrap_or_else(|e| panic!("{s:?} read as {v:?}, written {written:?}: {e}"));
            assert_eq!(again, v, "{s:?} written {written:?}");
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

/// A position's text and JSON forms.
fn position<P: sitesync::position::LogPosition + PartialEq>(s: &str) {
    text::<P>(s);
    if let Ok(p) = serde_json::from_str::<P>(s) {
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<P>(&json).unwrap(), p, "{json}");
        text::<P>(&p.to_string());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    position::<postgres::position::Position>(s);
    position::<sqlserver::position::Position>(s);
    position::<oracle::position::Position>(s);
    position::<mariadb::position::Position>(s);
    if let Ok(lsn) = postgres::position::parse_lsn(s) {
        let written = postgres::position::format_lsn(lsn);
        assert_eq!(
            postgres::position::parse_lsn(&written),
            Ok(lsn),
            "{written}"
        );
    }
    text::<Gtids>(s);
    text::<MariaDbState>(s);
    text::<MySqlSet>(s);
    text::<BinlogFile>(s);
    text::<MariaDbGtid>(s);
    if let Some(t) = parse_timestamp(s) {
        // RFC 3339 reads back as the same instant (where it has the
        // four-digit year RFC 3339 allows).
        let written = t.to_rfc3339();
        if (0..=9999).contains(&t.year()) {
            assert_eq!(
                parse_timestamp(&written),
                Some(t),
                "{s:?} written {written:?}"
            );
        }
    }
});
