//! Message bodies as the sink reads them from its queue (anyone who can
//! publish there writes them): `Event::from_body` never panics, and an
//! event it reads, written again with `Event::to_body`, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitesync::event::Event;

fuzz_target!(|data: &[u8]| {
    match Event::from_body(data) {
        Ok(event) => {
            let body = event.to_body();
            let again = Event::from_body(&body).unwrap_or_else(|e| {
                panic!(
                    "{event:?} written as {:?} does not read back: {e}",
                    String::from_utf8_lossy(&body)
                )
            });
            assert_eq!(
                String::from_utf8_lossy(&again.to_body()),
                String::from_utf8_lossy(&body)
            );
        }
        Err(why) => assert!(!why.is_empty()),
    }
});
