//! Any bytes from the event source: the parser must return an event or a reason, never
//! panic, and an accepted event's payload must be exactly the input line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_relay::event::{leading_seq, parse, parse_user_id};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(event) => {
            assert_eq!(event.payload.as_bytes(), data);
            assert!(event.seq > 0);
        }
        Err(bad) => {
            if let Some(seq) = bad.seq {
                assert!(seq > 0);
            }
        }
    }
    let _ = leading_seq(data);
    let _ = parse_user_id(data);
});
