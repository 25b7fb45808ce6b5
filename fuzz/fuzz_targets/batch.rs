//! The HTTP body parser (one JSON object, an array of them, or NDJSON): any bytes give
//! events within the limit or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_ingest::input;

const MAX_EVENTS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Some((first, body)) = data.split_first() else {
        return;
    };
    let ndjson = first & 1 == 1;
    if let Ok(p) = input::parse(body, ndjson, MAX_EVENTS) {
        assert!(!p.events.is_empty() && p.events.len() <= MAX_EVENTS);
        assert!(p.batch || p.events.len() == 1);
    }
    // The content type that selects NDJSON, from arbitrary text.
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = input::is_ndjson(Some(text));
    }
});
