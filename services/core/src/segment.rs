//! The file sink's format on disk, shared by the collector that writes it and the tools
//! that read it back (`sluice-loadgen --verify-file`, tests).
//!
//! Layout: `<dir>/<stream>/<partition>/<first offset, 20 digits>.jsonl`. Each line is the
//! event (as on Kafka) with its `partition` and `offset`, and `"retried": true` when it was
//! read from the stream's retry topic (its offset is then that topic's). Segment names sort
//! in the order they were written.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::Envelope;

/// The extension of a segment file.
const EXTENSION: &str = "jsonl";

/// The directory of one partition of `stream` under `dir`.
pub fn partition_dir(dir: &Path, stream: &str, partition: i32) -> PathBuf {
    dir.join(stream).join(partition.to_string())
}

/// The file name of a segment whose number (its first offset) is `number`.
pub fn segment_name(number: i64) -> String {
    format!("{number:020}.{EXTENSION}")
}

/// The number a segment is named after; -1 for a name that is not one.
pub fn segment_number(path: &Path) -> i64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1)
}

/// Segments of a partition directory, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == EXTENSION))
        .collect();
    files.sort();
    Ok(files)
}

/// One line (without its newline): the event's JSON with its partition and offset, and
/// `"retried": true` when read from the retry topic. The event is serialized once, and its
/// place appended inside the object (no intermediate JSON tree).
pub fn line(envelope: &Envelope, partition: i32, offset: i64, retried: bool) -> Vec<u8> {
    let value = envelope.encode_value();
    let mut out = Vec::with_capacity(value.len() + 64);
    // An envelope encodes to a JSON object: the line is always made.
    push_line_from_value(&mut out, &value, partition, offset, retried);
    out
}

/// Appends the same line as [`line`] to `out`, from the event's Kafka value as read, when
/// that value holds the envelope's fields and nothing else on one line
/// ([`Envelope::decode_verbatim`]): the event is not serialized again. False, and nothing
/// appended, when `value` is not a JSON object.
pub fn push_line_from_value(
    out: &mut Vec<u8>,
    value: &[u8],
    partition: i32,
    offset: i64,
    retried: bool,
) -> bool {
    // An envelope is a JSON object: `{...}`.
    let Some(body) = value.trim_ascii_end().strip_suffix(b"}") else {
        return false;
    };
    out.extend_from_slice(body);
    let mut number = itoa::Buffer::new();
    out.extend_from_slice(b",\"partition\":");
    out.extend_from_slice(number.format(partition).as_bytes());
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(number.format(offset).as_bytes());
    if retried {
        out.extend_from_slice(b",\"retried\":true");
    }
    out.push(b'}');
    true
}

/// What a line says of its record, without the event itself.
#[derive(Debug, serde::Deserialize)]
pub struct LineHead {
    /// The event's id.
    pub id: Option<String>,
    /// Its offset (in the retry topic when `retried`).
    pub offset: Option<i64>,
    /// Whether it was read from the stream's retry topic.
    #[serde(default)]
    pub retried: bool,
}

/// Every line of every segment of `stream` under `dir`, in partition and offset order.
pub fn read_all(dir: &Path, stream: &str) -> std::io::Result<Vec<Value>> {
    let mut out = Vec::new();
    let root = dir.join(stream);
    if !root.exists() {
        return Ok(out);
    }
    let mut partitions: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    partitions.sort();
    for p in partitions {
        for segment in segments(&p)? {
            for line in BufReader::new(File::open(&segment)?).lines() {
                let line = line?;
                out.push(serde_json::from_str(&line).map_err(std::io::Error::other)?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lines_carry_the_event_and_its_place_and_read_back_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let mut event = Envelope::new("s", None, json!({"n": 1}));
        event.id = "a".to_owned();
        let p0 = partition_dir(dir.path(), "s", 0);
        std::fs::create_dir_all(&p0).expect("mkdir");
        // Two segments written out of name order, and a file that is not a segment.
        std::fs::write(
            p0.join(segment_name(10)),
            [line(&event, 0, 10, false), b"\n".to_vec()].concat(),
        )
        .expect("write");
        event.id = "b".to_owned();
        std::fs::write(
            p0.join(segment_name(2)),
            [line(&event, 0, 2, true), b"\n".to_vec()].concat(),
        )
        .expect("write");
        std::fs::write(p0.join("notes.txt"), "not a segment").expect("write");
        let lines = read_all(dir.path(), "s").expect("read");
        let ids: Vec<&str> = lines
            .iter()
            .map(|l| l["id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(lines[0]["retried"], true);
        assert_eq!(lines[1]["offset"], 10);
        assert_eq!(lines[1]["partition"], 0);
        assert!(lines[1].get("retried").is_none());
        assert_eq!(lines[1]["payload"], json!({"n": 1}));
        // From the value as read, after what is already in the buffer; trailing white space
        // of the value is not part of the line.
        let value = event.encode_value();
        let padded = [value.as_slice(), b" \n"].concat();
        let mut out = b"before\n".to_vec();
        assert!(push_line_from_value(&mut out, &padded, 1, 7, false));
        assert_eq!(
            out,
            [b"before\n".as_slice(), &line(&event, 1, 7, false)].concat()
        );
        let mut out = Vec::new();
        assert!(push_line_from_value(&mut out, &value, 0, 2, true));
        assert_eq!(out, line(&event, 0, 2, true));
        assert!(!push_line_from_value(&mut out, b"[1]", 0, 0, false));
        assert_eq!(
            out,
            line(&event, 0, 2, true),
            "nothing appended for a non-object"
        );
        let head: LineHead = serde_json::from_slice(&line(&event, 0, 2, true)).expect("head");
        assert_eq!(
            (head.id.as_deref(), head.offset, head.retried),
            (Some("b"), Some(2), true)
        );
        assert_eq!(segment_number(&p0.join(segment_name(10))), 10);
        assert_eq!(segment_number(Path::new("x.jsonl")), -1);
        assert!(read_all(dir.path(), "other").expect("none").is_empty());
    }
}
