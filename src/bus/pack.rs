//! Packs: many events in one message (`sitesync resync --pack N`).
//!
//! A broker spends about the same per message whatever its size, so one
//! message per row caps a resync at the broker's per-message round trip. A
//! pack carries up to N events of one origin, in `seq` order, as a JSON
//! array of the events' own bodies; the header [`HEADER_PACK`] says how
//! many. Opt-in compression (`--compress`) is declared as the message's
//! content encoding (`zstd`), as AMQP's `content-encoding` property is
//! meant to be, so the sink never guesses.
//!
//! The receiving sink opens a pack into one message per event ([`open`]):
//! each is planned, judged by last-writer-wins, applied with the others of
//! its batch in one transaction, and, when it is bad, dead-lettered on its
//! own (its own body, the pack's headers); the pack's delivery is acked
//! once every event in it is done. An element that is not an event is
//! such a bad message; a pack that cannot be opened at all (not a JSON
//! array, an unknown encoding, a broken compressed stream) is dead-lettered
//! whole with the reason.

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::value::RawValue;

/// The header of a pack: how many events it holds.
pub const HEADER_PACK: &str = "x-sitesync-pack";

/// The content encoding of a compressed pack.
pub const ZSTD: &str = "zstd";

/// zstd's level for packs: its default, fast on both ends (higher levels
/// gain little on rows of JSON and cost the sender's CPU).
const LEVEL: i32 = 3;

/// A pack's body, from the events' bodies (each a JSON object), compressed
/// when asked.
pub fn body<'a>(events: impl IntoIterator<Item = &'a [u8]>, compress: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.push(b'[');
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e);
    }
    out.push(b']');
    match compress {
        true => zstd::bulk::compress(&out, LEVEL).expect("compressing a buffer in memory"),
        false => out,
    }
}

/// Whether a message is a pack (its [`HEADER_PACK`]), and of how many.
pub fn count(props: &BasicProperties) -> Option<u64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(HEADER_PACK)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// The most a pack may hold once opened: a compressed pack says what it
/// holds, and a small message must not open into gigabytes.
pub const MAX_OPENED: usize = 512 * 1024 * 1024;

/// The events' bodies of a pack message, or why it cannot be opened.
pub fn open(data: &[u8], encoding: Option<&str>) -> Result<Vec<Box<RawValue>>, String> {
    let plain;
    let json = match encoding {
        None | Some("") | Some("identity") => data,
        Some(ZSTD) => {
            plain = decompress(data)?;
            &plain[..]
        }
        Some(other) => {
            return Err(format!(
                "a pack with content encoding `{other}`: sitesync reads `{ZSTD}` or none"
            ));
        }
    };
    serde_json::from_slice::<Vec<Box<RawValue>>>(json)
        .map_err(|e| format!("a pack that is not a JSON array of events: {e}"))
}

fn decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut decoder = zstd::stream::read::Decoder::new(data)
        .map_err(|e| format!("a zstd pack that cannot be opened: {e}"))?;
    let mut out = Vec::new();
    (&mut decoder)
        .take(MAX_OPENED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("a zstd pack that cannot be opened: {e}"))?;
    if out.len() > MAX_OPENED {
        return Err(format!(
            "a zstd pack that opens to more than {} MiB",
            MAX_OPENED / (1024 * 1024)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    #[test]
    fn a_pack_opens_into_its_events_bodies_compressed_or_not() {
        let a = br#"{"id":1}"#.as_slice();
        let b = br#"{"id":2,"x":[1,2]}"#.as_slice();
        for compress in [false, true] {
            let body = body([a, b], compress);
            let encoding = compress.then_some(ZSTD);
            let opened = open(&body, encoding).unwrap();
            let got: Vec<&str> = opened.iter().map(|r| r.get()).collect();
            assert_eq!(got, vec![r#"{"id":1}"#, r#"{"id":2,"x":[1,2]}"#]);
        }
        assert_eq!(open(b"[]", None).unwrap().len(), 0);
    }

    #[test]
    fn compression_shrinks_rows_of_json() {
        let row = br#"{"id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","type":"customer.upsert","data":{"name":"Customer 123","region":"EU"}}"#;
        let rows = vec![row.as_slice(); 500];
        let plain = body(rows.iter().copied(), false);
        let packed = body(rows.iter().copied(), true);
        assert!(
            packed.len() * 10 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
    }

    #[test]
    fn what_cannot_be_opened_says_why() {
        let e = open(b"{\"id\":1}", None).unwrap_err();
        assert!(e.contains("not a JSON array of events"), "{e}");
        let e = open(b"[1,2]", Some("gzip")).unwrap_err();
        assert!(e.contains("content encoding `gzip`"), "{e}");
        let e = open(b"not zstd at all", Some(ZSTD)).unwrap_err();
        assert!(e.contains("zstd pack that cannot be opened"), "{e}");
    }

    #[test]
    fn the_count_is_read_from_the_header() {
        let mut h = FieldTable::default();
        h.insert(HEADER_PACK.into(), AMQPValue::LongLongInt(250));
        assert_eq!(
            count(&BasicProperties::default().with_headers(h)),
            Some(250)
        );
        assert_eq!(count(&BasicProperties::default()), None);
    }
}
