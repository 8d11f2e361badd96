//! Keeps an audit file's written lines from piling up in the page cache.
//!
//! The audit trail is written once and read by someone else, yet every line
//! appended to a file stays in the page cache, charged to the gateway's
//! memory cgroup, and each append takes a new page from the kernel. On a VM
//! whose free memory the host takes back (as on this project's machines),
//! filling a new page costs about 15 µs: appending to a file measured
//! 2.7 µs of system time a KiB, against 0.5 µs when the pages written are
//! sent to disk at once and dropped a little later, as here, so the same
//! few pages are reused. The calls are advice: when the kernel refuses them
//! the trail is written as before and only this is switched off.
//!
//! The advice is given on a thread of its own: sending pages to disk can
//! wait for the disk (or the file system's journal), and the audit writer
//! must not. Measured with the advice on the writer: a stalled write-back
//! held statements back for want of audit buffer in 3 of 18 bench runs.

use std::fs::File;
use std::io::Seek;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

const PAGE: u64 = 4096;
/// Written bytes sent to disk at once: each submission kicks the disk
/// queue, a VM exit here, so not every batch gets one. About two of these
/// stay cached.
const CHUNK: u64 = 1 << 20;

/// The audit writer's side: where its writes have got to, handed to the
/// advice thread a chunk at a time.
#[derive(Debug)]
pub(super) struct WriteBehind {
    /// A duplicate of the output's descriptor: it shares the file offset.
    file: File,
    /// The end last handed over.
    reported_to: u64,
    /// Holds one end: when the advice thread is busy, a later end covers
    /// what an earlier one would have.
    ends: SyncSender<u64>,
    #[cfg(test)]
    thread: std::thread::JoinHandle<()>,
}

impl WriteBehind {
    /// For an output that is a regular file (a pipe, a terminal or
    /// `/dev/null` keeps nothing in the page cache); None as well when the
    /// advice thread cannot start.
    pub(super) fn for_output(out: &impl AsFd) -> Option<Self> {
        let file = File::from(out.as_fd().try_clone_to_owned().ok()?);
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        let pages = Pages::after(file.try_clone().ok()?, meta.len());
        let (ends, receive) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("audit-pages".into())
            .spawn(move || pages.run(receive))
            .map_err(|e| tracing::debug!(error = %e, "no audit write-behind thread"))
            .ok()?;
        #[cfg(not(test))]
        drop(thread);
        Some(Self {
            file,
            reported_to: meta.len(),
            ends,
            #[cfg(test)]
            thread,
        })
    }

    /// After a batch was written. False once the advice thread has
    /// stopped; the trail is unaffected either way.
    pub(super) fn written(&mut self) -> bool {
        let Ok(end) = self.file.stream_position() else {
            return false;
        };
        // Nothing to hand over until a chunk has gathered, or the file got
        // shorter (truncated: rotated by copying).
        if end < self.reported_to + CHUNK && end >= self.reported_to {
            return true;
        }
        match self.ends.try_send(end) {
            Ok(()) => {
                self.reported_to = end;
                true
            }
            Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Hands over where the file ends now, waiting for room, and waits for
    /// the advice thread to take in everything.
    #[cfg(test)]
    fn finish(self) {
        if let Ok(end) = (&self.file).stream_position() {
            let _ = self.ends.send(end);
        }
        drop(self.ends);
        self.thread.join().expect("the advice thread ends");
    }
}

/// The advice thread's side: which pages were sent to disk and dropped.
struct Pages {
    file: File,
    /// Write-back has been started for everything before this.
    submitted_to: u64,
    /// Everything before this was dropped.
    dropped_to: u64,
}

impl Pages {
    /// For a file `len` bytes long: what it held before is not ours to drop.
    fn after(file: File, len: u64) -> Self {
        Self {
            file,
            submitted_to: len,
            dropped_to: len - len % PAGE,
        }
    }

    fn run(mut self, ends: Receiver<u64>) {
        while let Ok(end) = ends.recv() {
            match self.advise(end) {
                Ok(()) => {}
                Err(e) if refused(&e) => {
                    tracing::debug!(error = %e, "the audit file takes no write-behind advice; its pages stay cached");
                    return;
                }
                // The disk failed lines the write had put in the page cache.
                Err(e) => {
                    tracing::error!(error = %e, "audit lines could not be written to disk; the audit file may lack lines the gateway wrote");
                    return;
                }
            }
        }
    }

    /// Waits for the chunk sent to disk last time (nearly always written by
    /// now) and drops its pages, then sends what was written since.
    fn advise(&mut self, end: u64) -> std::io::Result<()> {
        if end < self.submitted_to {
            // Truncated since: start over from the beginning.
            self.submitted_to = 0;
            self.dropped_to = 0;
        }
        // Whole pages only: the page the last chunk ended in holds the
        // start of this one, and dropping it would cost a read back.
        let drop_to = self.submitted_to - self.submitted_to % PAGE;
        if let Some(span) = NonZeroU64::new(drop_to.saturating_sub(self.dropped_to)) {
            sync_file_range(
                &self.file,
                self.dropped_to,
                span.get(),
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
            rustix::fs::fadvise(
                &self.file,
                self.dropped_to,
                Some(span),
                rustix::fs::Advice::DontNeed,
            )?;
            self.dropped_to = drop_to;
        }
        if let Some(span) = NonZeroU64::new(end.saturating_sub(self.submitted_to)) {
            sync_file_range(
                &self.file,
                self.submitted_to,
                span.get(),
                libc::SYNC_FILE_RANGE_WRITE,
            )?;
        }
        self.submitted_to = end;
        Ok(())
    }
}

/// The file system does not take the advice (as opposed to failing to
/// write).
fn refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: sync_file_range takes a descriptor, which `file` keeps open
    // for the call, and plain integers; it reads and writes no memory of
    // ours.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Pages of `path` in the page cache, as util-linux's `fincore` counts.
    fn cached_pages(path: &std::path::Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "PAGES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "fincore: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("fincore prints a page count")
    }

    /// Lines of uneven length, so batches end mid-page.
    fn batch(n: usize) -> Vec<u8> {
        (0..700)
            .flat_map(|i| {
                format!("{{\"seq\":{n}-{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 97)).into_bytes()
            })
            .collect()
    }

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open")
    }

    /// Writes `batches` batches, advising after each when `advice`.
    fn append(path: &std::path::Path, batches: usize, advice: bool) -> Vec<u8> {
        let mut file = open(path);
        let mut pages = advice.then(|| Pages::after(file.try_clone().expect("dup"), 0));
        let mut all = Vec::new();
        for n in 0..batches {
            let b = batch(n);
            file.write_all(&b).expect("write");
            all.extend_from_slice(&b);
            if let Some(p) = pages.as_mut() {
                p.advise(all.len() as u64).expect("advice taken");
            }
        }
        all
    }

    #[test]
    fn written_pages_leave_the_page_cache_and_the_file_keeps_every_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain.jsonl");
        let advised = dir.path().join("advised.jsonl");
        let wrote = append(&plain, 200, false);
        assert_eq!(append(&advised, 200, true), wrote);
        let pages = (wrote.len() as u64).div_ceil(PAGE);
        assert!(pages > 2000, "{pages} pages");
        // Without advice every page stays cached; with it, about the last
        // two batches' do.
        assert_eq!(cached_pages(&plain), pages);
        let cached = cached_pages(&advised);
        assert!(cached <= 40, "{cached} of {pages} cached");
        // Checked after the page counts: reading caches the file again.
        assert_eq!(std::fs::read(&advised).expect("read back"), wrote);
    }

    #[test]
    fn the_writer_hands_its_progress_to_the_advice_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("behind.jsonl");
        let mut file = open(&path);
        let mut behind = WriteBehind::for_output(&file).expect("a regular file");
        let mut all = Vec::new();
        for n in 0..200 {
            let b = batch(n);
            file.write_all(&b).expect("write");
            all.extend_from_slice(&b);
            assert!(behind.written());
        }
        behind.finish();
        // The thread took at least the first chunk's end and the last end:
        // everything before the first was dropped. How much more depends
        // on how its turns fell against the writer's.
        let pages = (all.len() as u64).div_ceil(PAGE);
        let cached = cached_pages(&path);
        assert!(cached <= pages - CHUNK / PAGE, "{cached} of {pages} cached");
        assert_eq!(std::fs::read(&path).expect("read back"), all);
    }

    #[test]
    fn a_pipe_or_a_device_gets_no_write_behind() {
        let null = File::options()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        assert!(WriteBehind::for_output(&null).is_none());
        let (_r, w) = std::io::pipe().expect("pipe");
        assert!(WriteBehind::for_output(&w).is_none());
    }

    #[test]
    fn a_file_truncated_between_batches_is_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rotated.jsonl");
        append(&path, 10, false);
        let mut file = open(&path);
        let mut pages = Pages::after(
            file.try_clone().expect("dup"),
            file.metadata().expect("stat").len(),
        );
        let mut put = |byte: u8, len: usize| {
            file.write_all(&vec![byte; len]).expect("write");
            let end = (&file).stream_position().expect("position");
            pages.advise(end).expect("advice taken");
        };
        put(b'a', 1_500_000);
        put(b'b', 1_500_000);
        // copytruncate: the file is emptied under the writer.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(0))
            .expect("truncate");
        put(b'c', 1_200_000);
        put(b'd', 1_200_000);
        put(b'e', 1_200_000);
        // Checked before reading back, which caches the file again: only
        // the last part, not yet dropped, is cached.
        let cached = cached_pages(&path);
        assert!(cached <= 1_200_000 / PAGE + 2, "{cached} pages cached");
        let back = std::fs::read(&path).expect("read back");
        assert_eq!(back.len(), 3_600_000);
        for (n, byte) in [b'c', b'd', b'e'].into_iter().enumerate() {
            let part = &back[n * 1_200_000..(n + 1) * 1_200_000];
            assert!(part.iter().all(|b| *b == byte));
        }
    }
}
