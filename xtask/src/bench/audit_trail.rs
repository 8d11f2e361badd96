//! Checks a gateway's audit trail under the bench's load: after each run,
//! every line the run appended is read back, and the bench counts its
//! statement lines against the statements pgbench completed and checks that
//! the sequence numbers run on without a gap. The issue's promise ("never
//! loses a record") is then measured at 40k statements a second, not only
//! in the tests' small sessions.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What one run appended to the trail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Appended {
    pub lines: u64,
    pub statement_lines: u64,
    /// Lines whose `seq` is not the one after the previous line's.
    pub seq_gaps: u64,
    /// The gateway's warnings, in its log, that statements waited for room
    /// in its audit buffer (the audit was the bottleneck).
    pub held_back_warnings: u64,
}

/// What the gateway logs when the audit sink holds statements back.
const HELD_BACK: &str = "audit sink is not keeping up";

/// One gateway's audit file, followed from run to run.
pub struct Trail {
    path: PathBuf,
    /// The gateway's own log (stderr).
    log: PathBuf,
    held_back_seen: u64,
    /// Where the next run's lines start.
    offset: u64,
    last_seq: u64,
}

/// The gateway writes a batch at least every 100 ms; a file that has not
/// grown for this long has everything the finished run produced.
const QUIET: Duration = Duration::from_millis(300);
const POLL: Duration = Duration::from_millis(50);
const GIVE_UP: Duration = Duration::from_secs(20);

/// The members every line starts with; serde skips the rest of the line
/// while still checking that it is one well-formed JSON object.
#[derive(serde::Deserialize)]
struct Head<'a> {
    seq: u64,
    #[serde(borrow)]
    event: &'a str,
}

impl Trail {
    pub fn new(path: PathBuf, log: PathBuf) -> Self {
        Self {
            path,
            log,
            held_back_seen: 0,
            offset: 0,
            last_seq: 0,
        }
    }

    /// Waits for the gateway to finish writing, reads and checks what was
    /// appended since the last call, then empties the file as log rotation
    /// would: the trail is checked, and later runs do not pay for a file
    /// grown to gigabytes in the page cache.
    pub fn take(&mut self) -> Result<Appended> {
        let end = self.wait_quiet()?;
        let mut file = File::open(&self.path)
            .with_context(|| format!("open audit file {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::with_capacity(1 << 20, file.take(end - self.offset));
        let mut line = Vec::with_capacity(4096);
        let mut seen = Appended::default();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                bail!(
                    "audit file {}: the last line is cut short",
                    self.path.display()
                );
            }
            let head: Head = serde_json::from_slice(&line).with_context(|| {
                format!(
                    "audit file {}: line after seq {} is not a record",
                    self.path.display(),
                    self.last_seq
                )
            })?;
            seen.lines += 1;
            if head.event == "statement" {
                seen.statement_lines += 1;
            }
            if head.seq != self.last_seq + 1 {
                seen.seq_gaps += 1;
            }
            self.last_seq = head.seq;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let held_back = log.matches(HELD_BACK).count() as u64;
        seen.held_back_warnings = held_back.saturating_sub(self.held_back_seen);
        self.held_back_seen = held_back;
        // Emptied only if nothing came in meanwhile (the gateway holds the
        // file open for appending, so its next line lands at the new end);
        // otherwise the next call starts where this one stopped.
        let file = OpenOptions::new().write(true).open(&self.path)?;
        if file.metadata()?.len() == end {
            file.set_len(0)?;
            self.offset = 0;
        } else {
            self.offset = end;
        }
        Ok(seen)
    }

    /// The file's length once it has stopped growing.
    fn wait_quiet(&self) -> Result<u64> {
        let started = Instant::now();
        let len = || -> Result<u64> {
            Ok(std::fs::metadata(&self.path)
                .with_context(|| format!("audit file {}", self.path.display()))?
                .len())
        };
        let mut last = len()?;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(POLL);
            let now = len()?;
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= QUIET {
                return Ok(last);
            }
            if started.elapsed() > GIVE_UP {
                bail!(
                    "audit file {} still growing {}s after the run",
                    self.path.display(),
                    GIVE_UP.as_secs()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(seq: u64, event: &str) -> String {
        format!("{{\"v\":1,\"ts\":\"2026-01-01T00:00:00Z\",\"seq\":{seq},\"event\":\"{event}\",\"x\":{{\"y\":[1,2]}}}}\n")
    }

    #[test]
    fn counts_statements_finds_gaps_and_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for (seq, event) in [(1, "session.start"), (2, "statement"), (3, "statement")] {
            f.write_all(line(seq, event).as_bytes()).unwrap();
        }
        let log = dir.path().join("gateway.log");
        std::fs::write(&log, format!("WARN x: the {HELD_BACK}\n")).unwrap();
        let mut trail = Trail::new(path.clone(), log.clone());
        let first = trail.take().unwrap();
        assert_eq!(
            first,
            Appended {
                lines: 3,
                statement_lines: 2,
                seq_gaps: 0,
                held_back_warnings: 1,
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // The writer appends after the truncation; seq 5 skips 4.
        for (seq, event) in [(5, "statement"), (6, "session.end")] {
            f.write_all(line(seq, event).as_bytes()).unwrap();
        }
        let second = trail.take().unwrap();
        assert_eq!((second.lines, second.statement_lines), (2, 1));
        assert_eq!(second.seq_gaps, 1);
        // Only warnings logged since the last call count.
        assert_eq!(second.held_back_warnings, 0);
    }

    #[test]
    fn a_line_that_is_not_a_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, format!("{}not json\n", line(1, "statement"))).unwrap();
        let err = Trail::new(path, dir.path().join("no.log"))
            .take()
            .unwrap_err();
        assert!(format!("{err:#}").contains("after seq 1"), "{err:#}");
    }
}
