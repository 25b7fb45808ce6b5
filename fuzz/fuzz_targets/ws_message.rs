//! A WebSocket text message is parsed like an HTTP body (one object or an array), and a
//! refusal is answered with an error frame: any text gives events or a frame that says
//! `ok: false` with a problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_ingest::ws;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match ws::parse_message(text.as_bytes(), 16) {
            Ok(p) => assert!(!p.events.is_empty() && p.events.len() <= 16),
            Err(frame) => {
                assert_eq!(frame["ok"], false);
                assert!(frame["error"]["title"].is_string(), "{frame}");
            }
        }
    }
});
