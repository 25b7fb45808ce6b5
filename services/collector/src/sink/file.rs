//! The file sink: JSON lines per stream and partition under `--record-directory`, in the
//! format of [`sluice_core::segment`]. A batch is appended with one write
//! and, with `--fsync batch` (the default), synced before the write is confirmed, so an
//! acknowledged offset is on disk. A segment is closed and a new one begun when it reaches
//! `--file-max-bytes` or `--file-max-age`.
//!
//! Crash safety: the first time a partition is written after start-up, its newest segment
//! is cut back to its last complete line (a crash can leave half a line), and the segments
//! are read back, newest first, for the offset of the last record from the stream's topic
//! and the ids of the last `--file-dedupe-ids` events. Records of the stream's topic at or
//! below that offset are skipped, so the replay that follows a crash writes every event
//! exactly once.
//!
//! Ids: the first event stored under an id wins. An event whose id is among the last
//! `--file-dedupe-ids` of its partition (100,000 by default) is skipped, so a client's
//! retry or a redrive with the same id adds no line; beyond that window a file sink keeps
//! no index. Records read from the retry topic (marked `"retried": true` on their line)
//! carry that topic's offsets: they are checked by id only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::segment::{
    LineHead, line, partition_dir, push_line_from_value, segment_name, segment_number, segments,
};

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
    /// How many of the latest ids per partition are remembered to skip repeats.
    pub dedupe_ids: usize,
}

struct Segment {
    dir: PathBuf,
    file: Option<(File, PathBuf)>,
    size: u64,
    opened: Instant,
    /// Whether what is on disk was read.
    loaded: bool,
    /// Highest offset on disk of a record from the stream's own topic, -1 when none.
    last_offset: i64,
    /// The number in the newest segment's name, -1 when none.
    newest_name: i64,
    /// The latest ids on disk.
    recent: IdWindow,
}

/// The latest ids, at most `capacity`, oldest first. Each id is stored once, shared by the
/// order and the set.
struct IdWindow {
    capacity: usize,
    order: VecDeque<Arc<str>>,
    set: HashSet<Arc<str>, foldhash::fast::RandomState>,
}

impl IdWindow {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            set: HashSet::default(),
        }
    }

    /// Remembers `id`; false when it was among the latest already. Without a window
    /// (`capacity` 0) every id is new.
    fn push(&mut self, id: Arc<str>) -> bool {
        if self.capacity == 0 {
            return true;
        }
        if !self.set.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// A record ready to be written: its line is `bytes[start..end]` of its [`Lines`].
struct Line {
    id: Arc<str>,
    offset: i64,
    retried: bool,
    start: usize,
    end: usize,
}

/// The lines of a batch, newlines included, one after the other in one buffer.
struct Lines {
    bytes: Vec<u8>,
    lines: Vec<Line>,
}

impl Lines {
    fn of(batch: &[Record]) -> Self {
        let size = batch
            .iter()
            .map(|r| r.verbatim.as_ref().map_or(256, |v| v.len() + 48))
            .sum();
        let mut bytes = Vec::with_capacity(size);
        let lines = batch
            .iter()
            .map(|r| {
                let start = bytes.len();
                let as_read = r.verbatim.as_ref().is_some_and(|value| {
                    push_line_from_value(&mut bytes, value, r.partition, r.offset, r.retried)
                });
                if !as_read {
                    bytes.extend(line(&r.envelope, r.partition, r.offset, r.retried));
                }
                bytes.push(b'\n');
                Line {
                    id: Arc::from(r.envelope.id.as_str()),
                    offset: r.offset,
                    retried: r.retried,
                    start,
                    end: bytes.len(),
                }
            })
            .collect();
        Self { bytes, lines }
    }
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
                Arc::new(Mutex::new(Segment::new(
                    partition_dir(&self.dir, stream, partition),
                    self.policy.dedupe_ids,
                )))
            })
            .clone()
    }
}

/// Cuts `path` back to its last complete line.
fn cut_partial_line(path: &Path) -> std::io::Result<()> {
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
    Ok(())
}

impl Segment {
    /// A partition's segments under `dir`, not read yet.
    fn new(dir: PathBuf, dedupe_ids: usize) -> Self {
        Self {
            dir,
            file: None,
            size: 0,
            opened: Instant::now(),
            loaded: false,
            last_offset: -1,
            newest_name: -1,
            recent: IdWindow::new(dedupe_ids),
        }
    }

    /// Loads what is on disk the first time the partition is written.
    fn load(&mut self) -> std::io::Result<()> {
        if self.loaded {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let files = segments(&self.dir)?;
        if let Some(newest) = files.last() {
            cut_partial_line(newest)?;
            self.newest_name = segment_number(newest);
        }
        // Newest first, until the window is full and the last offset of the stream's
        // topic is known.
        let mut ids = Vec::new();
        let mut offset_known = false;
        for path in files.iter().rev() {
            if offset_known && ids.len() >= self.recent.capacity {
                break;
            }
            let mut heads = Vec::new();
            for line in BufReader::new(File::open(path)?).lines() {
                if let Ok(head) = serde_json::from_str::<LineHead>(&line?) {
                    heads.push(head);
                }
            }
            for head in heads.into_iter().rev() {
                if !offset_known
                    && !head.retried
                    && let Some(offset) = head.offset
                {
                    self.last_offset = offset;
                    offset_known = true;
                }
                if ids.len() < self.recent.capacity
                    && let Some(id) = head.id
                {
                    ids.push(Arc::from(id));
                }
            }
        }
        for id in ids.into_iter().rev() {
            self.recent.push(id);
        }
        if let Some(newest) = files.last() {
            let file = OpenOptions::new().append(true).open(newest)?;
            self.size = file.metadata()?.len();
            self.opened = Instant::now();
            self.file = Some((file, newest.clone()));
        }
        self.loaded = true;
        Ok(())
    }

    fn close(&mut self) -> std::io::Result<()> {
        if let Some((file, _)) = self.file.take() {
            file.sync_all()?;
        }
        Ok(())
    }

    /// Appends the lines not written before; on an error, what reached the disk is read
    /// back before the next write ([`Segment::forget`]).
    fn write(&mut self, batch: Lines, policy: FilePolicy) -> std::io::Result<usize> {
        self.load()?;
        let written = self.append(batch, policy);
        if written.is_err() {
            self.forget();
        }
        written
    }

    /// Forgets what it knows of the disk: a write that failed may have left part of its
    /// lines (the last one cut short), so the next write loads the segments again, which
    /// cuts a partial line and learns the offset and ids of every whole line.
    fn forget(&mut self) {
        *self = Self::new(std::mem::take(&mut self.dir), self.recent.capacity);
    }

    fn append(&mut self, batch: Lines, policy: FilePolicy) -> std::io::Result<usize> {
        let Lines { bytes, lines } = batch;
        let count = lines.len();
        // What is taken is counted as written at once (a failed write forgets it all), so
        // that a repeat within the batch is skipped too.
        let mut fresh: Vec<Line> = Vec::with_capacity(count);
        for line in lines {
            if !line.retried && line.offset <= self.last_offset {
                continue;
            }
            if !self.recent.push(line.id.clone()) {
                continue;
            }
            if !line.retried {
                self.last_offset = self.last_offset.max(line.offset);
            }
            fresh.push(line);
        }
        let Some(first) = fresh.first() else {
            return Ok(0);
        };
        if self.file.is_some()
            && (self.size >= policy.max_bytes || self.opened.elapsed() >= policy.max_age)
        {
            self.close()?;
        }
        if self.file.is_none() {
            // Named after its first offset, always after the segments before it.
            let number = if first.retried {
                self.newest_name + 1
            } else {
                first.offset.max(self.newest_name + 1)
            };
            let path = self.dir.join(segment_name(number));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            // The new file's directory entry must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            self.size = file.metadata()?.len();
            self.opened = Instant::now();
            self.file = Some((file, path));
            self.newest_name = number;
        }
        // Usually every line is new and the batch's buffer is written as it is.
        let buf = if fresh.len() == count {
            bytes
        } else {
            let mut buf = Vec::with_capacity(fresh.iter().map(|l| l.end - l.start).sum());
            for line in &fresh {
                buf.extend_from_slice(&bytes[line.start..line.end]);
            }
            buf
        };
        if let Some((file, _)) = &mut self.file {
            file.write_all(&buf)?;
            if policy.fsync == Fsync::Batch {
                file.sync_data()?;
            }
        }
        self.size += buf.len() as u64;
        Ok(fresh.len())
    }
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
        let lines = Lines::of(batch);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::Envelope;
    use sluice_core::segment::read_all;

    fn record(offset: i64) -> Record {
        let mut envelope = Envelope::new("s", None, json!({"n": offset}));
        envelope.id = format!("id-{offset}");
        // Every other record as read from Kafka, value and all: both ways to a line.
        let verbatim = (offset % 2 == 0).then(|| envelope.encode_value());
        Record {
            envelope,
            partition: 0,
            offset,
            retried: false,
            verbatim,
        }
    }

    /// `r` under another id, its value as read from Kafka (if any) to match.
    fn renamed(mut r: Record, id: &str) -> Record {
        id.clone_into(&mut r.envelope.id);
        r.verbatim = r.verbatim.map(|_| r.envelope.encode_value());
        r
    }

    fn policy(max_bytes: u64) -> FilePolicy {
        FilePolicy {
            max_bytes,
            max_age: Duration::from_secs(3600),
            fsync: Fsync::Batch,
            dedupe_ids: 100_000,
        }
    }

    /// Writes the records at `offsets`, which must succeed.
    async fn write_records(sink: &FileSink, offsets: std::ops::Range<i64>) {
        let records: Vec<Record> = offsets.map(record).collect();
        sink.write(&records).await.expect("write");
    }

    /// The offsets of the lines on disk, in order; every line must be whole JSON.
    fn offsets(dir: &Path) -> Vec<i64> {
        read_all(dir, "s")
            .expect("every line is whole JSON")
            .iter()
            .map(|l| l["offset"].as_i64().expect("offset"))
            .collect()
    }

    /// Appends `bytes` to partition 0's first segment, as an interrupted write would.
    fn append_to_first_segment(dir: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(dir.join("s/0/00000000000000000000.jsonl"))
            .expect("open")
            .write_all(bytes)
            .expect("write");
    }

    fn ids(dir: &Path) -> Vec<String> {
        read_all(dir, "s")
            .expect("read")
            .iter()
            .map(|l| l["id"].as_str().expect("id").to_owned())
            .collect()
    }

    #[tokio::test]
    async fn retried_records_are_written_whatever_their_offsets_and_ids_are_stored_once() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
        write_records(&sink, 0..5).await;
        // From the retry topic, with that topic's (lower) offsets.
        let retried: Vec<Record> = (0..2)
            .map(|o| {
                let mut r = record(o);
                r = renamed(r, &format!("retried-{o}"));
                r.retried = true;
                r
            })
            .collect();
        sink.write(&retried).await.expect("retried");
        // A client's retry of id-3 arrives at a new offset; id-5 is new, twice in a batch.
        let mut again = vec![record(5), record(6), record(7)];
        again[1] = renamed(again[1].clone(), "id-3");
        again[2] = renamed(again[2].clone(), "id-5");
        sink.write(&again).await.expect("repeats");
        let want = [
            "id-0",
            "id-1",
            "id-2",
            "id-3",
            "id-4",
            "retried-0",
            "retried-1",
            "id-5",
        ];
        assert_eq!(ids(dir.path()), want);

        // After a restart the same holds, from what is on disk.
        drop(sink);
        let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
        sink.write(&retried).await.expect("retried again");
        let mut replay = again.clone();
        replay.push(record(8));
        sink.write(&replay).await.expect("replay and more");
        let mut want = want.to_vec();
        want.extend(["id-8"]);
        assert_eq!(ids(dir.path()), want);
        assert!(read_all(dir.path(), "s").expect("read")[5]["retried"] == true);
    }

    #[tokio::test]
    async fn writes_lines_rotates_and_skips_replays() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = FileSink::new(dir.path(), policy(300)).expect("sink");
        write_records(&sink, 0..3).await;
        write_records(&sink, 2..6).await;
        assert_eq!(offsets(dir.path()), [0, 1, 2, 3, 4, 5]);
        assert_eq!(read_all(dir.path(), "s").expect("read")[4]["id"], "id-4");
        let files = segments(&dir.path().join("s").join("0")).expect("segments");
        assert!(files.len() >= 2, "rotated at 300 bytes: {files:?}");
        assert!(files[0].ends_with("00000000000000000000.jsonl"));
    }

    #[tokio::test]
    async fn a_partial_line_from_a_crash_is_cut_and_rewritten_once() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
            write_records(&sink, 0..4).await;
        }
        // A crash in the middle of the next batch leaves half a line.
        append_to_first_segment(dir.path(), &line(&record(4).envelope, 0, 4, false)[..20]);

        let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
        write_records(&sink, 2..7).await;
        assert_eq!(offsets(dir.path()), [0, 1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn after_a_failed_write_the_next_one_reads_the_disk_again() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = FileSink::new(dir.path(), policy(1 << 20)).expect("sink");
        write_records(&sink, 0..4).await;
        // A write that fails part way leaves whole lines and half of one; the segment
        // forgets what it knew, as it does on an error.
        let mut partial = line(&record(4).envelope, 0, 4, false);
        partial.push(b'\n');
        partial.extend_from_slice(&line(&record(5).envelope, 0, 5, false)[..20]);
        append_to_first_segment(dir.path(), &partial);
        sink.segment("s", 0)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget();
        // The batch is written again, with a repeat of id-6 in it.
        let mut again: Vec<Record> = (4..8).map(record).collect();
        again.push(renamed(record(8), "id-6"));
        sink.write(&again).await.expect("again");
        assert_eq!(offsets(dir.path()), [0, 1, 2, 3, 4, 5, 6, 7]);
    }
}
