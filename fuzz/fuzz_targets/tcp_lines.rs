//! The TCP ports' framing and commands: bytes arriving in arbitrary pieces are cut into
//! bounded lines (too long and non-UTF-8 lines reported, never buffered without bound),
//! and every line is a read request or refused as unknown.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice_ingest::tcp::{BoundedLines, Line, ReadRequest, read_request};
use tokio_util::codec::Decoder;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((cut, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(*cut % 17) + 1;
    let mut codec = BoundedLines::new(MAX);
    let mut buf = BytesMut::new();
    let mut lines = Vec::new();
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Ok(Some(line)) = codec.decode(&mut buf) {
            lines.push(line);
        }
        // Never more than a line's limit (and the piece that arrived) kept waiting.
        assert!(buf.len() <= MAX + chunk + 2, "{} bytes buffered", buf.len());
    }
    while let Ok(Some(line)) = codec.decode_eof(&mut buf) {
        lines.push(line);
    }
    for line in lines {
        if let Line::Text(text) = line {
            assert!(text.len() <= MAX);
            match read_request(&text) {
                ReadRequest::Get(id) => assert!(!id.is_empty() && id.trim() == id),
                ReadRequest::Auth(key) => assert_eq!(key.trim(), key),
                ReadRequest::Blank => assert!(text.trim().is_empty()),
                ReadRequest::All | ReadRequest::Unknown => {}
            }
        }
    }
});
