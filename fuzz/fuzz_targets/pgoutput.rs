//! pgoutput messages as the server sends them (the raw `XLogData` payloads
//! pgwire-replication hands over): decoding never panics, and whatever
//! decodes, encoded again the way the server does, decodes the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sitesync::engine::postgres::pgoutput::{Column, PgOutput, decode};

/// The message as the server writes it (the fields `decode` skips are
/// written as the server would: replica identity `d`, type `text`).
fn encode(msg: &PgOutput) -> Vec<u8> {
    let mut b = Vec::new();
    match msg {
        PgOutput::Relation(r) => {
            b.push(b'R');
            b.extend_from_slice(&r.id.to_be_bytes());
            for s in [&r.namespace, &r.name] {
                b.extend_from_slice(s.as_bytes());
                b.push(0);
            }
            b.push(b'd');
            b.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
            for col in &r.columns {
                b.push(0);
                b.extend_from_slice(col.as_bytes());
                b.push(0);
                b.extend_from_slice(&25u32.to_be_bytes());
                b.extend_from_slice(&(-1i32).to_be_bytes());
            }
        }
        PgOutput::Insert { relation_id, tuple } => {
            b.push(b'I');
            b.extend_from_slice(&relation_id.to_be_bytes());
            b.push(b'N');
            b.extend_from_slice(&(tuple.len() as u16).to_be_bytes());
            for column in tuple {
                match column {
                    Column::Null => b.push(b'n'),
                    Column::Unchanged => b.push(b'u'),
                    Column::Text(v) | Column::Binary(v) => {
                        b.push(if matches!(column, Column::Text(_)) {
                            b't'
                        } else {
                            b'b'
                        });
                        b.extend_from_slice(&(v.len() as u32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                }
            }
        }
        PgOutput::Other(tag) => b.push(*tag),
    }
    b
}

fuzz_target!(|data: &[u8]| {
    match decode(Bytes::copy_from_slice(data)) {
        Ok(msg) => {
            let again = decode(Bytes::from(encode(&msg)))
                .unwrap_or_else(|e| panic!("{msg:?} encoded again does not decode: {e}"));
            assert_eq!(again, msg);
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
});
