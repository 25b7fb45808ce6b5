//! The file sink: JSON lines per stream and partition under `--record-directory`.
//!
//! Layout: `<dir>/<stream>/<partition>/<first offset, 20 digits>.jsonl`. Each line is the
//! event (as on Kafka) with its `partition` and `offset`. A batch is appended with one write
//! and, with `--fsync batch` (the default), synced before the write is confirmed, so an
//! acknowledged offset is on disk. A segment is closed and a new one begun when it reaches
//! `--file-max-bytes` or `--file-max-age`.
//!
//! Crash safety: the first time a partition is written after start-up, its newest segment
//! is cut back to its last complete line (a crash can leave half a line) and the offset of
//! that line is remembered. Records at or below it are skipped, so the replay that follows
//! a crash writes every event exactly once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Record, Sink, SinkError};

/// When written data is synced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// After every batch, before the write is confirmed (no acknowledged record is lost).
    Batch,
    /// Only when a segment is closed; the operating system writes the rest when it likes.
    Rotate,
}

/// How segments are cut.
#[derive(Debug, Clone, Copy)]
pub struct FilePolicy {
    /// Close a segment at this size.
    pub max_bytes: u64,
    /// Close a segment after this long.
    pub max_age: Duration,
    /// When to sync.
    pub fsync: Fsync,
}

struct Segment {
    dir: PathBuf,
    file: Option<(File, PathBuf)>,
    size: u64,
    opened: Instant,
    /// Highest offset on disk, -1 when none.
    last_offset: i64,
}

/// The open segment of each (stream, partition).
type Segments = HashMap<(String, i32), Arc<Mutex<Segment>>>;

/// Writes JSON-lines files.
pub struct FileSink {
    dir: PathBuf,
    policy: FilePolicy,
    partitions: Mutex<Segments>,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::File {
        path: path.display().to_string(),
        source,
    }
}

impl FileSink {
    /// A sink writing under `dir`, created if absent.
    pub fn new(dir: impl Into<PathBuf>, policy: FilePolicy) -> Result<Self, SinkError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        Ok(Self {
            dir,
            policy,
            partitions: Mutex::new(HashMap::new()),
        })
    }

    fn segment(&self, stream: &str, partition: i32) -> Arc<Mutex<Segment>> {
        let mut map = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((stream.to_owned(), partition))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Segment {
                    dir: self.dir.join(stream).join(partition.to_string()),
                    file: None,
                    size: 0,
                    opened: Instant::now(),
                    // Unknown until recovered from disk.
                    last_offset: i64::MIN,
                }))
            })
            .clone()
    }
}

/// Segments of a partition directory, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    Ok(files)
}

/// Cuts `path` back to its last complete line; returns the offset of that line, if any.
fn recover(path: &Path) -> std::io::Result<Option<i64>> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    // Find the last newline, reading backwards in blocks.
    let mut end = len;
    let mut complete = 0;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block[..n])?;
        if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
            complete = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if complete < len {
        tracing::warn!(path = %path.display(), cut = len - complete, "removing a partial line left by a crash");
        file.set_len(complete)?;
        file.sync_all()?;
    }
    if complete == 0 {
        return Ok(None);
    }
    // The last complete line.
    let start = complete.saturating_sub(block.len() as u64);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    BufReader::new(&mut file)
        .take(complete - start)
        .read_to_end(&mut tail)?;
    let tail = &tail[..tail.len() - 1];
    let line = tail.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    Ok(serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("offset").and_then(Value::as_i64)))
}

impl Segment {
    /// Loads what is on disk the first time the partition is written.
    fn load(&mut self) -> std::io::Result<()> {
        if self.last_offset != i64::MIN {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        self.last_offset = -1;
        let files = segments(&self.dir)?;
        for path in files.iter().rev() {
            if let Some(offset) = recover(path)? {
                self.last_offset = offset;
                break;
            }
        }
        if let Some(newest) = files.last() {
            let file = OpenOptions::new().append(true).open(newest)?;
            self.size = file.metadata()?.len();
            self.opened = Instant::now();
            self.file = Some((file, newest.clone()));
        }
        Ok(())
    }

    fn close(&mut self) -> std::io::Result<()> {
        if let Some((file, _)) = self.file.take() {
            file.sync_all()?;
        }
        Ok(())
    }

    fn write(&mut self, lines: Vec<(i64, Vec<u8>)>, policy: FilePolicy) -> std::io::Result<usize> {
        self.load()?;
        let fresh: Vec<(i64, Vec<u8>)> = lines
            .into_iter()
            .filter(|(o, _)| *o > self.last_offset)
            .collect();
        let Some(&(first, _)) = fresh.first() else {
            return Ok(0);
        };
        if self.file.is_some()
            && (self.size >= policy.max_bytes || self.opened.elapsed() >= policy.max_age)
        {
            self.close()?;
        }
        if self.file.is_none() {
            let path = self.dir.join(format!("{first:020}.jsonl"));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            // The new file's directory entry must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            self.size = file.metadata()?.len();
            self.opened = Instant::now();
            self.file = Some((file, path));
        }
        let mut buf = Vec::with_capacity(fresh.iter().map(|(_, l)| l.len() + 1).sum());
        let mut last = self.last_offset;
        for (offset, line) in &fresh {
            buf.extend_from_slice(line);
            buf.push(b'\n');
            last = *offset;
        }
        if let Some((file, _)) = &mut self.file {
            file.write_all(&buf)?;
            if policy.fsync == Fsync::Batch {
                file.sync_data()?;
            }
        }
        self.size += buf.len() as u64;
        self.last_offset = last;
        Ok(fresh.len())
    }
}

/// One line of the file: the event's JSON with its partition and offset.
fn line_of(r: &Record) -> Vec<u8> {
    let mut v = serde_json::to_value(&r.envelope).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("partition".to_owned(), r.partition.into());
        map.insert("offset".to_owned(), r.offset.into());
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let segment = self.segment(&first.envelope.stream, first.partition);
        let lines: Vec<(i64, Vec<u8>)> = batch.iter().map(|r| (r.offset, line_of(r))).collect();
        let policy = self.policy;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut segment = segment.lock().unwrap_or_else(|e| e.into_inner());
            let path = segment
                .file
                .as_ref()
                .map_or_else(|| segment.dir.clone(), |(_, p)| p.clone());
            segment.write(lines, policy).map_err(io_error(&path))
        })
        .await
        .map_err(|e| SinkError::File {
            path: dir.display().to_string(),
            source: std::io::Error::other(e),
        })??;
        Ok(())
    }
}

/// Every line of every segment of `stream`, in partition and offset order (for tests and
/// tools).
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
    use super::*;
    use serde_json::json;
    use sluice_core::Envelope;

    fn record(offset: i64) -> Record {
        let mut envelope = Envelope::new("s", None, json!({"n": offset}));
        envelope.id = format!("id-{offset}");
        Record {
            envelope,
            topic: "s".into(),
            partition: 0,
            offset,
        }
    }

    fn policy(max_bytes: u64) -> FilePolicy {
        FilePolicy {
            max_bytes,
            max_age: Duration::from_secs(3600),
            fsync: Fsync::Batch,
        }
    }

    #[tokio::test]
    async fn writes_lines_rotates_and_skips_replays() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = FileSink::new(dir.path(), policy(300)).expect("sink");
        sink.write(&(0..3).map(record).collect::<Vec<_>>())
            .await
            .expect("write");
        sink.write(&(2..6).map(record).collect::<Vec<_>>())
            .await
            .expect("replay and more");
        let lines = read_all(dir.path(), "s").expect("read");
        let offsets: Vec<i64> = lines
            .iter()
            .map(|l| l["offset"].as_i64().expect("offset"))
            .collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
        assert_eq!(lines[4]["id"], "id-4");
        let files = segments(&dir.path().join("s").join("0")).expect("segments");
        assert!(files.len() >= 2, "rotated at 300 bytes: {files:?}");
        assert!(files[0].ends_with("00000000000000000000.jsonl"));
    }

    #[tokio::test]
    async fn a_partial_line_from_a_crash_is_cut_and_rewritten_once() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
            sink.write(&(0..4).map(record).collect::<Vec<_>>())
                .await
                .expect("write");
        }
        // A crash in the middle of the next batch leaves half a line.
        let segment = dir.path().join("s/0/00000000000000000000.jsonl");
        let half = &line_of(&record(4))[..20];
        OpenOptions::new()
            .append(true)
            .open(&segment)
            .expect("open")
            .write_all(half)
            .expect("write");

        let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
        sink.write(&(2..7).map(record).collect::<Vec<_>>())
            .await
            .expect("replay");
        let offsets: Vec<i64> = read_all(dir.path(), "s")
            .expect("every line is whole JSON")
            .iter()
            .map(|l| l["offset"].as_i64().expect("offset"))
            .collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4, 5, 6]);
    }
}
