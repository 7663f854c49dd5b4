//! What sitesync decodes of a MariaDB binlog itself (mysql_async parses
//! the rest): GTID and GTID_LIST event bodies, the file a ROTATE event
//! names, and the epoch seconds TIMESTAMP columns arrive as. The first
//! byte picks the decoder. None panics; a GTID_LIST's state reads back
//! from its text; a ROTATE's name is what follows its position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitesync::engine::mariadb::binlog::{
    decode_gtid, decode_gtid_list, epoch_to_rfc3339, rotate_file_name,
};
use sitesync::engine::mariadb::position::MariaDbState;
use sitesync::event::parse_timestamp;

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok((seq, domain, _)) = decode_gtid(data) {
                assert_eq!(seq.to_le_bytes(), &data[..8]);
                assert_eq!(domain.to_le_bytes(), &data[8..12]);
            }
        }
        1 => {
            if let Ok(state) = decode_gtid_list(data) {
                let text = state.to_string();
                assert_eq!(text.parse::<MariaDbState>(), Ok(state), "{text}");
            }
        }
        2 => {
            let Some((header, body)) = data.split_first_chunk::<19>() else {
                return;
            };
            if let Ok(name) = rotate_file_name(header, body) {
                assert!(body[8..].starts_with(name.as_bytes()));
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(data) else {
                return;
            };
            if let Some(rfc3339) = epoch_to_rfc3339(text) {
                // What the outbox row carries is read by the event's parser
                // (where it has the four-digit year RFC 3339 allows: a
                // TIMESTAMP's seconds are 32 bits, up to 2106).
                if !rfc3339.starts_with(['+', '-']) {
                    assert!(parse_timestamp(&rfc3339).is_some(), "{text:?} -> {rfc3339}");
                }
            }
        }
    }
});
