//! Keeps an audit file's written lines from piling up in the page cache.
//!
//! The audit trail is written once and read by someone else, yet every line
//! appended to a file stays in the page cache, charged to the gateway's
//! memory cgroup, and each append takes a new page from the kernel. On a VM
//! whose free memory the host takes back (as on this project's machines),
//! filling a new page costs about 15 µs: appending to a file measured
//! 2.7 µs of system time a KiB, against 0.5 µs when the pages written are
//! sent to disk at once and dropped a batch later, as here, so the same few
//! pages are reused. The calls are advice: when the kernel refuses them the
//! trail is written as before and only this is switched off.

use std::fs::File;
use std::io::Seek;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, AsRawFd};

const PAGE: u64 = 4096;
/// Written bytes sent to disk at once: each submission kicks the disk
/// queue, a VM exit here, so not every batch gets one. About two of these
/// stay cached.
const CHUNK: u64 = 1 << 20;

/// Write-behind for one output, when it is a regular file.
#[derive(Debug)]
pub(super) struct WriteBehind {
    /// A duplicate of the output's descriptor: it shares the file offset.
    file: File,
    /// Write-back has been started for everything before this.
    submitted_to: u64,
    /// Everything before this was dropped.
    dropped_to: u64,
}

impl WriteBehind {
    /// For an output that is a regular file (a pipe, a terminal or
    /// `/dev/null` keeps nothing in the page cache).
    pub(super) fn for_output(out: &impl AsFd) -> Option<Self> {
        let file = File::from(out.as_fd().try_clone_to_owned().ok()?);
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        // What the file held before is not ours to drop.
        let len = meta.len();
        Some(Self {
            file,
            submitted_to: len,
            dropped_to: len - len % PAGE,
        })
    }

    /// After a batch of `len` bytes was written. Once a chunk has gathered
    /// it starts writing it to disk, after waiting for the chunk before it
    /// (its write-back started a chunk ago, so it is nearly always done)
    /// and dropping that one's pages. An error switches write-behind off
    /// (false); the trail is unaffected.
    pub(super) fn written(&mut self, len: usize) -> bool {
        match self.advise(len as u64) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "the audit file takes no write-behind advice; its pages stay cached");
                false
            }
        }
    }

    fn advise(&mut self, len: u64) -> std::io::Result<()> {
        let end = self.file.stream_position()?;
        let start = end.saturating_sub(len);
        if end < self.submitted_to {
            // Truncated (rotated by copying) since: start over from here.
            self.dropped_to = start - start % PAGE;
            self.submitted_to = start;
        }
        if end - self.submitted_to < CHUNK {
            return Ok(());
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
        sync_file_range(
            &self.file,
            self.submitted_to,
            end - self.submitted_to,
            libc::SYNC_FILE_RANGE_WRITE,
        )?;
        self.submitted_to = end;
        Ok(())
    }
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

    fn append(path: &std::path::Path, batches: usize, behind: bool) -> Vec<u8> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        let mut wb = behind.then(|| WriteBehind::for_output(&file).expect("a regular file"));
        let mut all = Vec::new();
        for n in 0..batches {
            // Lines of uneven length, so batches end mid-page.
            let batch: Vec<u8> = (0..700)
                .flat_map(|i| {
                    format!("{{\"seq\":{n}-{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 97)).into_bytes()
                })
                .collect();
            file.write_all(&batch).expect("write");
            if let Some(wb) = wb.as_mut() {
                assert!(wb.written(batch.len()));
            }
            all.extend_from_slice(&batch);
        }
        all
    }

    #[test]
    fn written_batches_leave_the_page_cache_and_the_file_keeps_every_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain.jsonl");
        let behind = dir.path().join("behind.jsonl");
        let wrote = append(&plain, 200, false);
        assert_eq!(append(&behind, 200, true), wrote);
        let pages = (wrote.len() as u64).div_ceil(PAGE);
        assert!(pages > 2000, "{pages} pages");
        // Without advice every page stays cached; with it, about the last
        // two chunks' do.
        assert_eq!(cached_pages(&plain), pages);
        assert!(
            cached_pages(&behind) <= 3 * CHUNK / PAGE,
            "{} of {pages} cached",
            cached_pages(&behind)
        );
        assert_eq!(std::fs::read(&behind).expect("read back"), wrote);
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
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        let mut wb = WriteBehind::for_output(&file).expect("a regular file");
        let mut put = |byte: u8, len: usize| {
            file.write_all(&vec![byte; len]).expect("write");
            assert!(wb.written(len));
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
        // Checked before reading back, which caches the file again.
        let cached = cached_pages(&path);
        assert!(cached <= 3 * CHUNK / PAGE, "{cached} pages cached");
        let back = std::fs::read(&path).expect("read back");
        assert_eq!(back.len(), 3_600_000);
        for (n, byte) in [b'c', b'd', b'e'].into_iter().enumerate() {
            let part = &back[n * 1_200_000..(n + 1) * 1_200_000];
            assert!(part.iter().all(|b| *b == byte));
        }
    }
}
