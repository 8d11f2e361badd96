//! The single writer of the audit stream.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::record::{Line, Record};
use super::SCHEMA_VERSION;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

impl AuditTarget {
    /// `-` is stdout; anything else is a file path, appended to.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(s))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the audit writer has stopped")]
    Stopped,
}

enum Msg {
    Record(Box<Record>),
    Flush(oneshot::Sender<()>),
}

/// A handle to the audit stream; cheap to clone, one per session.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    healthy: Arc<AtomicBool>,
}

const QUEUE: usize = 8192;
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const RETRY_EVERY: Duration = Duration::from_millis(500);

impl AuditSink {
    pub fn open(target: &AuditTarget) -> Result<Self, AuditError> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(std::io::stdout()),
            AuditTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run_writer(out, rx, flag))
            .map_err(AuditError::Thread)?;
        Ok(Self { tx, healthy })
    }

    /// False while the last write failed: sessions must deny statements.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Queues a record, waiting for room when the writer is behind.
    pub async fn emit(&self, record: Record) -> Result<(), AuditError> {
        self.tx
            .send(Msg::Record(Box::new(record)))
            .await
            .map_err(|_| AuditError::Stopped)
    }

    /// Returns once every record queued before the call is written and
    /// flushed (used at shutdown).
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)
    }
}

struct Writer {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    seq: u64,
    healthy: Arc<AtomicBool>,
    last_flush: Instant,
}

impl Writer {
    fn append(&mut self, record: &Record) {
        self.seq += 1;
        let ts = super::record::rfc3339(record.ts);
        let line = Line {
            v: SCHEMA_VERSION,
            ts: &ts,
            seq: self.seq,
            event: record.event,
            session: &record.session,
            body: &record.body,
        };
        // Serialising plain structs into a Vec cannot fail.
        if let Err(e) = serde_json::to_writer(&mut self.pending, &line) {
            tracing::error!(error = %e, "audit record could not be serialised");
        }
        self.pending.push(b'\n');
    }

    /// Writes everything pending; on failure keeps it and retries until it
    /// goes through, with the sink marked unhealthy meanwhile.
    fn flush(&mut self) {
        loop {
            let result = self
                .out
                .write_all(&self.pending)
                .and_then(|()| self.out.flush());
            match result {
                Ok(()) => {
                    self.pending.clear();
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        tracing::warn!("audit sink writable again; statements are allowed again");
                    }
                    self.last_flush = Instant::now();
                    return;
                }
                Err(e) => {
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        tracing::error!(error = %e, "audit write failed; denying statements until it recovers");
                    }
                    // A partial write_all may have put part of the buffer out;
                    // with no way to know how much, the whole buffer is
                    // retried, which can repeat a line but never loses one.
                    std::thread::sleep(RETRY_EVERY);
                }
            }
        }
    }
}

/// While records keep coming, the writer polls at this interval instead of
/// being woken for each one: one wake-up and one write per batch.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

fn run_writer(out: Box<dyn Write + Send>, mut rx: mpsc::Receiver<Msg>, healthy: Arc<AtomicBool>) {
    let mut w = Writer {
        out,
        pending: Vec::with_capacity(64 * 1024),
        seq: 0,
        healthy,
        last_flush: Instant::now(),
    };
    loop {
        // Drain what is queued.
        let mut received = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Record(r)) => {
                    received = true;
                    w.append(&r);
                    if w.pending.len() >= 256 * 1024 {
                        w.flush();
                    }
                }
                Ok(Msg::Flush(done)) => {
                    w.flush();
                    let _ = done.send(());
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    w.flush();
                    return;
                }
            }
        }
        if !w.pending.is_empty() && (!received || w.last_flush.elapsed() >= FLUSH_EVERY) {
            // The stream went quiet, or a busy stream reached the interval.
            w.flush();
        }
        if received {
            std::thread::sleep(BATCH_WINDOW);
            continue;
        }
        // Idle: sleep until the next record.
        match rx.blocking_recv() {
            Some(Msg::Record(r)) => w.append(&r),
            Some(Msg::Flush(done)) => {
                w.flush();
                let _ = done.send(());
            }
            None => {
                w.flush();
                return;
            }
        }
    }
}
