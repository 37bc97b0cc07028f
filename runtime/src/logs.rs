//! A replica's captured output: the last lines in memory (a ring bounded by bytes), every line
//! in a size-rotated file in the data dir, and a broadcast for followers.
//!
//! ```text
//!   guest stdout/stderr ──▶ LineWriter (splits lines, caps their length)
//!        ──▶ LogBook::push ──▶ ring (last RING_BYTES) ──▶ logs(tail)
//!                          ──▶ file (rotated at FILE_BYTES, FILES kept)
//!                          ──▶ broadcast ──▶ follow()
//! ```

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use tokio::io::AsyncWrite;
use tokio::sync::broadcast;

use crate::driver::{LogLine, LogStream, Stream};

/// Bytes of recent output kept in memory per replica: enough for `logs` to show a screenful
/// or two, small enough that a thousand replicas on a gateway cost 64 MB at most.
pub const RING_BYTES: usize = 64 * 1024;
/// Size at which the log file is rotated.
pub const FILE_BYTES: u64 = 1024 * 1024;
/// Rotated files kept besides the current one (`replica.log.1`, …).
pub const FILES: usize = 2;
/// Longest line kept; longer ones are cut (a guest printing without newlines cannot grow the
/// buffer).
pub const MAX_LINE: usize = 16 * 1024;
/// What a line costs in the ring besides its text (the line's own struct, which an empty line
/// costs too): a guest printing empty lines fills the ring's bytes as fast as any other.
const LINE_COST: usize = std::mem::size_of::<LogLine>();
/// Lines a follower may fall behind before it skips ahead.
const FOLLOW_BUFFER: usize = 1024;

struct Inner {
    ring: VecDeque<LogLine>,
    ring_bytes: usize,
    file: Option<File>,
    file_bytes: u64,
}

/// One replica's log.
pub struct LogBook {
    path: PathBuf,
    inner: Mutex<Inner>,
    feed: broadcast::Sender<LogLine>,
}

impl LogBook {
    /// A log writing to `path` (rotated beside it); the file is appended to if it exists. A
    /// file that cannot be opened leaves the in-memory log working.
    pub fn open(path: &Path) -> Arc<LogBook> {
        let file = path
            .parent()
            .map(std::fs::create_dir_all)
            .and_then(|r| r.ok())
            .and_then(|()| OpenOptions::new().create(true).append(true).open(path).ok());
        let file_bytes = file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
        if file.is_none() {
            tracing::warn!(path = %path.display(), "cannot open the replica log file; keeping logs in memory only");
        }
        let (feed, _) = broadcast::channel(FOLLOW_BUFFER);
        Arc::new(LogBook {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner { ring: VecDeque::new(), ring_bytes: 0, file, file_bytes }),
            feed,
        })
    }

    /// Records one line.
    pub fn push(&self, stream: Stream, text: &str) {
        let line = LogLine { at: SystemTime::now(), stream, text: text.to_string() };
        let Ok(mut inner) = self.inner.lock() else { return };
        let tag = match stream {
            Stream::Stdout => "out",
            Stream::Stderr => "err",
        };
        let record = format!("{} {tag} {}\n", crate::time::format(line.at), line.text);
        if inner.file_bytes + record.len() as u64 > FILE_BYTES {
            self.rotate(&mut inner);
        }
        if let Some(f) = inner.file.as_mut()
            && f.write_all(record.as_bytes()).is_ok()
        {
            inner.file_bytes += record.len() as u64;
        }
        inner.ring_bytes += line.text.len() + LINE_COST;
        inner.ring.push_back(line.clone());
        while inner.ring_bytes > RING_BYTES {
            match inner.ring.pop_front() {
                Some(old) => {
                    inner.ring_bytes = inner.ring_bytes.saturating_sub(old.text.len() + LINE_COST)
                }
                None => break,
            }
        }
        // A VecDeque keeps its largest capacity: give back what a burst of lines left behind.
        if inner.ring.capacity() > 4 * inner.ring.len().max(64) {
            inner.ring.shrink_to_fit();
        }
        drop(inner);
        let _ = self.feed.send(line);
    }

    fn rotate(&self, inner: &mut Inner) {
        inner.file = None;
        for i in (1..FILES).rev() {
            let _ = std::fs::rename(numbered(&self.path, i), numbered(&self.path, i + 1));
        }
        let _ = std::fs::rename(&self.path, numbered(&self.path, 1));
        inner.file = OpenOptions::new().create(true).append(true).open(&self.path).ok();
        inner.file_bytes = 0;
    }

    /// The last `n` lines kept in memory.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        let skip = inner.ring.len().saturating_sub(n);
        inner.ring.iter().skip(skip).cloned().collect()
    }

    /// Lines from now on, until the book is dropped (the run ended). A follower that falls
    /// more than 1,024 lines behind skips ahead.
    pub fn follow(&self) -> LogStream {
        let rx = self.feed.subscribe();
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(line) => return Some((line, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }))
    }

    /// A writer for one of the replica's streams.
    pub fn writer(self: &Arc<Self>, stream: Stream) -> LineWriter {
        LineWriter { book: self.clone(), stream, partial: Vec::new() }
    }
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

/// Splits written bytes into lines for a [`LogBook`]. Never blocks and never fails: a guest's
/// output must not stall or kill the guest.
pub struct LineWriter {
    book: Arc<LogBook>,
    stream: Stream,
    partial: Vec<u8>,
}

impl LineWriter {
    fn take(&mut self, buf: &[u8]) {
        for chunk in buf.split_inclusive(|b| *b == b'\n') {
            let room = MAX_LINE.saturating_sub(self.partial.len());
            let body = chunk.strip_suffix(b"\n").unwrap_or(chunk);
            self.partial.extend_from_slice(&body[..body.len().min(room)]);
            if chunk.ends_with(b"\n") {
                self.flush_line();
            }
        }
    }

    fn flush_line(&mut self) {
        let text = String::from_utf8_lossy(&self.partial).into_owned();
        self.book.push(self.stream, text.trim_end_matches('\r'));
        self.partial.clear();
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.flush_line();
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    /// Empty lines cost the ring what their struct costs: a million of them keep it within
    /// its bytes (they used to count as nothing and grow it without bound).
    #[test]
    fn empty_lines_cannot_grow_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let book = LogBook::open(&dir.path().join("r.log"));
        for _ in 0..1_000_000 {
            book.push(Stream::Stdout, "");
        }
        let inner = book.inner.lock().unwrap();
        assert!(inner.ring_bytes <= RING_BYTES, "{} bytes", inner.ring_bytes);
        assert!(inner.ring.len() <= RING_BYTES / LINE_COST, "{} lines", inner.ring.len());
        assert!(inner.ring.capacity() <= 4 * RING_BYTES / LINE_COST, "{}", inner.ring.capacity());
    }

    #[tokio::test]
    async fn lines_are_split_kept_bounded_and_followed() {
        let dir = tempfile::tempdir().unwrap();
        let book = LogBook::open(&dir.path().join("r.log"));
        let mut follow = book.follow();
        let mut w = book.writer(Stream::Stdout);
        w.write_all(b"hello\nwor").await.unwrap();
        w.write_all(b"ld\n").await.unwrap();
        assert_eq!(follow.next().await.unwrap().text, "hello");
        assert_eq!(follow.next().await.unwrap().text, "world");
        let texts: Vec<String> = book.tail(10).into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["hello", "world"]);
        // Overlong lines are cut; the ring stays within its byte bound.
        w.write_all(&vec![b'x'; MAX_LINE * 2]).await.unwrap();
        w.write_all(b"\n").await.unwrap();
        assert_eq!(book.tail(1)[0].text.len(), MAX_LINE);
        for _ in 0..20 {
            w.write_all(&vec![b'y'; 10_000]).await.unwrap();
            w.write_all(b"\n").await.unwrap();
        }
        let kept: usize = book.tail(usize::MAX).iter().map(|l| l.text.len()).sum();
        assert!(kept <= RING_BYTES, "{kept}");
        let file = std::fs::read_to_string(dir.path().join("r.log")).unwrap();
        assert!(file.lines().next().unwrap().ends_with(" out hello"), "{file}");
    }

    #[test]
    fn files_rotate_and_old_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let book = LogBook::open(&path);
        let line = "z".repeat(1000);
        for _ in 0..(3 * FILE_BYTES as usize / 1000 + 10) {
            book.push(Stream::Stderr, &line);
        }
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists());
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            assert!(std::fs::metadata(&p).unwrap().len() <= FILE_BYTES);
        }
    }
}
