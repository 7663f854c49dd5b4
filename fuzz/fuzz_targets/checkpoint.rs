//! Checkpoint records as read from sled or the witness file: a crc32 (LE)
//! then JSON. Each input is decoded as it is, then with its crc32 made
//! right (so that the JSON parser is reached), as a record of each engine.
//! Decoding never panics; a record that decodes, encoded again, decodes to
//! the same checkpoint; a record refused as another engine's names one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitesync::checkpoint::{Checkpoint, Unreadable};
use sitesync::engine::{mariadb, oracle, postgres, sqlserver};
use sitesync::position::{LogPosition, same_engine};

fn check<P: LogPosition>(bytes: &[u8]) {
    match Checkpoint::<P>::decode(bytes) {
        Ok(ck) => assert_eq!(Checkpoint::<P>::decode(&ck.encode()), Ok(ck)),
        Err(Unreadable::Corrupt(detail)) => assert!(!detail.is_empty()),
        Err(Unreadable::OtherEngine(engine)) => {
            assert!(!same_engine(&engine, P::ENGINE), "{engine}")
        }
    }
}

fn each_engine(bytes: &[u8]) {
    check::<postgres::position::Position>(bytes);
    check::<sqlserver::position::Position>(bytes);
    check::<oracle::position::Position>(bytes);
    check::<mariadb::position::Position>(bytes);
}

fuzz_target!(|data: &[u8]| {
    each_engine(data);
    if let Some(json) = data.get(4..) {
        let mut record = crc32fast::hash(json).to_le_bytes().to_vec();
        record.extend_from_slice(json);
        each_engine(&record);
    }
});
