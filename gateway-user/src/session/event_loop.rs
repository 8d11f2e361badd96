//! The relay of plain-TCP sessions, run straight from epoll events.
//!
//! Under tokio every message costs a task wake-up and several readiness
//! polls: measured at about 2.7k of the relay's 10k instructions a
//! select-only transaction. Here each relay thread waits in one `epoll`
//! (mio) for all its sessions and runs the same batch functions as the task
//! relay (`Relay::frontend_batch`, `Relay::backend_batch`) on what a socket
//! has. TLS sessions stay on the task relay.
//!
//! What must wait (a masking plan that needs the catalog, a full audit
//! buffer) runs as a task on the runtime while its session is parked: the
//! session reads nothing until the task reports back, and the loop goes on
//! with the others. A socket that cannot take more holds back reads from
//! the other side until it drains, so a slow reader slows only its own
//! session. The session's end (and the sockets) go back to the task that
//! handed it over, which says the goodbyes and audits the end.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use super::masking::ResultMasker;
use super::names::Fast;
use super::relay::{End, FrontendState, Outbox, Relay};
use super::socket;
use super::stream::READ_CHUNK;
use super::tracker::Completed;
use crate::policy::masking::MaskSet;
use crate::policy::Who;
use crate::wire::FrameSplitter;

const WAKE: Token = Token(usize::MAX);

/// Reads one session may do in a turn before the others get theirs.
const READS_PER_TURN: usize = 16;

/// A logged-in plain-TCP session handed to a relay loop.
pub struct Handoff {
    pub relay: Arc<Relay>,
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Bytes already read from each side and not yet relayed.
    pub client_buf: BytesMut,
    pub upstream_buf: BytesMut,
    pub who: Who,
    pub returned: oneshot::Sender<Returned>,
}

/// A session the loop has finished with.
pub struct Returned {
    pub end: End,
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// What had not gone out to each side when the session ended.
    pub to_client: BytesMut,
    pub to_upstream: BytesMut,
    /// Statements completed and not yet audited (a batch that ended the
    /// session half way).
    pub done: Vec<Completed>,
}

/// The relay threads, each with its own loop; sessions go to them in turn.
pub struct RelayLoops {
    loops: Vec<Arc<Inbox>>,
    next_loop: AtomicUsize,
    next_id: AtomicU64,
}

/// Says which session a task relaying through a loop is about.
pub struct Ticket {
    inbox: Arc<Inbox>,
    id: u64,
}

impl Ticket {
    /// Ends the session (shutdown): its `Returned` comes with
    /// `End::Shutdown`.
    pub fn stop(&self) {
        self.inbox.send(Message::Stop(self.id));
    }
}

impl RelayLoops {
    /// Starts `threads` relay threads (at least one) that run their async
    /// parts on `runtime`.
    pub fn start(threads: usize, runtime: tokio::runtime::Handle) -> std::io::Result<Self> {
        let mut loops = Vec::new();
        for n in 0..threads.max(1) {
            let poll = Poll::new()?;
            let inbox = Arc::new(Inbox {
                waker: Waker::new(poll.registry(), WAKE)?,
                queue: Mutex::new(Vec::new()),
            });
            let mut relay_loop = Loop {
                poll,
                inbox: Arc::clone(&inbox),
                runtime: runtime.clone(),
                sessions: HashMap::default(),
                again: Vec::new(),
                scratch: vec![0; READ_CHUNK],
            };
            std::thread::Builder::new()
                .name(format!("agentgate-relay-{n}"))
                .spawn(move || relay_loop.run())?;
            loops.push(inbox);
        }
        Ok(Self {
            loops,
            next_loop: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn hand_over(&self, handoff: Handoff) -> Ticket {
        let n = self.next_loop.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        let inbox = Arc::clone(&self.loops[n]);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        inbox.send(Message::Start(id, Box::new(handoff)));
        Ticket { inbox, id }
    }
}

impl Drop for RelayLoops {
    fn drop(&mut self) {
        for inbox in &self.loops {
            inbox.send(Message::Quit);
        }
    }
}

/// What other threads tell a loop.
struct Inbox {
    queue: Mutex<Vec<Message>>,
    waker: Waker,
}

impl Inbox {
    fn send(&self, m: Message) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake a relay loop");
        }
    }
}

enum Message {
    Start(u64, Box<Handoff>),
    Stop(u64),
    /// A parked session's task is done.
    Resume(u64, Box<Resume>),
    Quit,
}

/// What a parked session's task gives back.
struct Resume {
    done: Vec<Completed>,
    /// With the plan made, when the task made one.
    masker: Option<ResultMasker>,
    result: Result<(), End>,
}

type Parked = Pin<Box<dyn Future<Output = Resume> + Send>>;

/// What a session's turn came to.
enum Turn {
    /// Nothing more to do until a socket is ready.
    Idle,
    /// Work left, after the other sessions had their turn.
    Again,
    Park(Parked),
    End(End),
}

struct Loop {
    poll: Poll,
    inbox: Arc<Inbox>,
    runtime: tokio::runtime::Handle,
    sessions: HashMap<u64, Session, Fast>,
    again: Vec<u64>,
    /// Reads land here first: safe code cannot read into a buffer's
    /// uninitialised spare room.
    scratch: Vec<u8>,
}

impl Loop {
    fn run(&mut self) {
        // Catalog lookups and audit waits are built here and run there.
        let _runtime = self.runtime.enter();
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = (!self.again.is_empty()).then_some(std::time::Duration::ZERO);
            let mut woken = false;
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Nothing the loop can mend: its sessions would hang, so the
                // gateway stops rather than serve half its clients.
                tracing::error!(error = %e, "relay loop cannot wait for events");
                std::process::abort();
            }
            for event in events.iter() {
                if event.token() == WAKE {
                    // Every wake-up is an edge of its own: the inbox needs
                    // looking at only after one.
                    woken = true;
                    continue;
                }
                let id = (event.token().0 / 2) as u64;
                let Some(s) = self.sessions.get_mut(&id) else {
                    continue;
                };
                // Errors and hang-ups surface from the read.
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    match event.token().0 % 2 {
                        0 => s.client.ready = true,
                        _ => s.upstream.ready = true,
                    }
                }
                self.turn(id);
            }
            if woken && !self.take_messages() {
                return;
            }
            for id in std::mem::take(&mut self.again) {
                self.turn(id);
            }
        }
    }

    /// Handles what other threads sent; false when told to quit.
    fn take_messages(&mut self) -> bool {
        let messages =
            std::mem::take(&mut *self.inbox.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for m in messages {
            match m {
                Message::Start(id, handoff) => self.start(id, *handoff),
                Message::Stop(id) => match self.sessions.get_mut(&id) {
                    Some(s) if s.parked => s.stopping = true,
                    Some(_) => self.end(id, End::Shutdown),
                    None => {}
                },
                Message::Resume(id, resume) => {
                    let Some(s) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    s.parked = false;
                    s.done = resume.done;
                    if let Some(masker) = resume.masker {
                        s.masker = Some(masker);
                        s.planned = true;
                    }
                    match (resume.result, s.stopping) {
                        (Err(end), _) => self.end(id, end),
                        (Ok(()), true) => self.end(id, End::Shutdown),
                        (Ok(()), false) => self.turn(id),
                    }
                }
                Message::Quit => return false,
            }
        }
        true
    }

    fn start(&mut self, id: u64, h: Handoff) {
        let registry = self.poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        let client = Token(id as usize * 2);
        let upstream = Token(id as usize * 2 + 1);
        let registered = registry
            .register(&mut SourceFd(&h.client.as_raw_fd()), client, both)
            .and_then(|()| {
                registry.register(&mut SourceFd(&h.upstream.as_raw_fd()), upstream, both)
            });
        let catalog = h
            .relay
            .shared
            .catalogs
            .get(&h.relay.info.target.addr, &h.relay.info.target.database);
        let session = Session {
            front: FrontendState::new(h.who),
            front_splitter: FrameSplitter::new(h.relay.shared.max_frame_bytes),
            back_splitter: super::upstream::backend_splitter(),
            masker: Some(ResultMasker::new(Some(catalog))),
            mask: h.relay.backend_mask(),
            planned: false,
            done: Vec::new(),
            parked: false,
            stopping: false,
            // What the handshake read past the login is relayed first.
            client: Side::new(h.client, h.client_buf),
            upstream: Side::new(h.upstream, h.upstream_buf),
            relay: h.relay,
            returned: Some(h.returned),
        };
        self.sessions.insert(id, session);
        match registered {
            Ok(()) => self.turn(id),
            Err(e) => self.end(id, End::Io(format!("relay loop: {e}"))),
        }
    }

    /// Gives one session its turn and acts on what it came to.
    fn turn(&mut self, id: u64) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.parked {
            return;
        }
        match s.turn(&mut self.scratch) {
            Turn::Idle => {}
            Turn::Again => self.again.push(id),
            Turn::Park(task) => {
                s.parked = true;
                let inbox = Arc::clone(&self.inbox);
                self.runtime.spawn(async move {
                    let resume = task.await;
                    inbox.send(Message::Resume(id, Box::new(resume)));
                });
            }
            Turn::End(end) => self.end(id, end),
        }
    }

    /// Hands a session's sockets and end back to its task.
    fn end(&mut self, id: u64, end: End) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        let registry = self.poll.registry();
        // A socket the kernel dropped from the set already is no error here.
        let _ = registry.deregister(&mut SourceFd(&s.client.sock.as_raw_fd()));
        let _ = registry.deregister(&mut SourceFd(&s.upstream.sock.as_raw_fd()));
        if let Some(tx) = s.returned {
            let _ = tx.send(Returned {
                end,
                client: s.client.sock,
                upstream: s.upstream.sock,
                to_client: s.client.out.into_unsent(),
                to_upstream: s.upstream.out.into_unsent(),
                done: s.done,
            });
        }
    }
}

/// One peer of a session.
struct Side {
    sock: TcpStream,
    /// What was read from this peer and not yet relayed.
    buf: BytesMut,
    /// `buf` holds bytes not yet judged: handed over with the session, or
    /// left when a batch stopped for a masking plan.
    backlog: bool,
    /// What goes to this peer.
    out: Outbox,
    /// The peer may have sent more than has been read.
    ready: bool,
}

/// What reading from one side came to.
enum Step {
    /// Nothing was there.
    Nothing,
    Relayed,
    Stop(Turn),
}

impl Side {
    fn new(sock: TcpStream, buf: BytesMut) -> Self {
        Self {
            sock,
            buf,
            backlog: true,
            out: Outbox::default(),
            ready: true,
        }
    }

    /// Whether there is something to relay from this side.
    fn has_input(&self) -> bool {
        self.backlog || self.ready
    }

    /// Takes the backlog, or else reads once: Ok(false) when nothing was
    /// there, Err(None) at end of stream.
    fn input(&mut self, scratch: &mut [u8]) -> Result<bool, Option<std::io::Error>> {
        if std::mem::take(&mut self.backlog) {
            return Ok(true);
        }
        loop {
            return match socket::recv(&self.sock, scratch) {
                Ok(0) => Err(None),
                Ok(n) => {
                    // A short read took all there was: a later arrival
                    // raises a new edge.
                    self.ready = n == scratch.len();
                    self.buf.extend_from_slice(&scratch[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.ready = false;
                    Ok(false)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(Some(e)),
            };
        }
    }

    /// Sends what waits; false while the peer cannot take it all.
    #[inline]
    fn send(&mut self) -> std::io::Result<bool> {
        // Asked several times a turn, nearly always with nothing waiting.
        if self.out.is_empty() {
            return Ok(true);
        }
        self.out.send_now(&mut socket::Sender(&self.sock))
    }
}

struct Session {
    relay: Arc<Relay>,
    client: Side,
    upstream: Side,
    front: FrontendState,
    front_splitter: FrameSplitter,
    back_splitter: FrameSplitter,
    /// Away while a task makes a plan.
    masker: Option<ResultMasker>,
    mask: Arc<MaskSet>,
    /// A plan was made for the backend message at the front of the buffer.
    planned: bool,
    /// Statements completed and not yet audited.
    done: Vec<Completed>,
    /// A task works for the session; it reads nothing meanwhile.
    parked: bool,
    /// Shutdown came while parked: the session ends when the task is back.
    stopping: bool,
    returned: Option<oneshot::Sender<Returned>>,
}

fn to_database(e: std::io::Error) -> Turn {
    Turn::End(End::Io(format!("writing to the database: {e}")))
}

fn to_client(e: std::io::Error) -> Turn {
    Turn::End(End::Io(format!("writing to the client: {e}")))
}

impl Session {
    fn turn(&mut self, scratch: &mut [u8]) -> Turn {
        for _ in 0..READS_PER_TURN {
            // Whatever a peer could not take yet goes first; until it is
            // out, nothing more is read for it.
            if let Err(e) = self.upstream.send() {
                return to_database(e);
            }
            if let Err(e) = self.client.send() {
                return to_client(e);
            }
            let mut progress = false;
            if self.upstream.out.is_empty() && self.client.has_input() {
                match self.frontend(scratch) {
                    Step::Nothing => {}
                    Step::Relayed => progress = true,
                    Step::Stop(turn) => return turn,
                }
            }
            if self.client.out.is_empty() && self.upstream.has_input() {
                match self.backend(scratch) {
                    Step::Nothing => {}
                    Step::Relayed => progress = true,
                    Step::Stop(turn) => return turn,
                }
            }
            if !progress {
                return Turn::Idle;
            }
        }
        Turn::Again
    }

    /// Client to database: judges what the client sent, sends it on and
    /// audits.
    fn frontend(&mut self, scratch: &mut [u8]) -> Step {
        match self.client.input(scratch) {
            Ok(true) => {}
            Ok(false) => return Step::Nothing,
            Err(None) => return Step::Stop(Turn::End(End::ClientGone)),
            Err(Some(e)) => {
                return Step::Stop(Turn::End(End::Io(format!("reading from the client: {e}"))))
            }
        }
        let terminate = match self.relay.frontend_batch(
            &self.front_splitter,
            &mut self.client.buf,
            &mut self.front,
            &mut self.upstream.out,
            &mut self.done,
        ) {
            Ok(t) => t,
            Err(end) => return Step::Stop(Turn::End(end)),
        };
        if let Err(e) = self.upstream.send() {
            return Step::Stop(to_database(e));
        }
        if let Some(stop) = self.audit(None) {
            return Step::Stop(stop);
        }
        match terminate {
            true => Step::Stop(Turn::End(End::ClientTerminated)),
            false => Step::Relayed,
        }
    }

    /// Database to client: accounts for and masks what the database sent,
    /// sends it on and audits.
    fn backend(&mut self, scratch: &mut [u8]) -> Step {
        let fresh = !self.upstream.backlog;
        match self.upstream.input(scratch) {
            Ok(true) => {}
            Ok(false) => return Step::Nothing,
            Err(None) => return Step::Stop(Turn::End(End::ServerGone)),
            Err(Some(e)) => {
                return Step::Stop(Turn::End(End::Io(format!(
                    "reading from the database: {e}"
                ))))
            }
        }
        if fresh {
            self.mask = self.relay.backend_mask();
        }
        let Some(masker) = self.masker.as_mut() else {
            return Step::Stop(Turn::End(End::Io("masking plan lost".into())));
        };
        let mut planned = std::mem::take(&mut self.planned);
        let request = loop {
            match self.relay.backend_batch(
                &self.back_splitter,
                &mut self.upstream.buf,
                masker,
                &self.mask,
                planned,
                &mut self.client.out,
                &mut self.done,
            ) {
                Ok(None) => break None,
                // Made before: go on with the same message.
                Ok(Some(request)) if masker.reuse(&request, &self.mask) => planned = true,
                Ok(Some(request)) => break Some(request),
                Err(end) => return Step::Stop(Turn::End(end)),
            }
        };
        if let Err(e) = self.client.send() {
            return Step::Stop(to_client(e));
        }
        self.relay.offer_rest();
        if request.is_some() {
            // The rest of the buffer waits for the plan.
            self.upstream.backlog = true;
        }
        match self.audit(request) {
            Some(stop) => Step::Stop(stop),
            None => Step::Relayed,
        }
    }

    /// Audits what completed; when the audit buffer is full or a masking
    /// plan needs the catalog, a task does the waiting and the session
    /// parks.
    fn audit(&mut self, plan: Option<super::masking::Request>) -> Option<Turn> {
        match self.relay.try_emit(&mut self.done) {
            Ok(true) if plan.is_none() => None,
            Ok(_) => Some(self.park(plan)),
            Err(end) => Some(Turn::End(end)),
        }
    }

    fn park(&mut self, plan: Option<super::masking::Request>) -> Turn {
        let relay = Arc::clone(&self.relay);
        let mut done = std::mem::take(&mut self.done);
        let planning = match (plan, self.masker.take()) {
            (Some(request), Some(masker)) => Some((request, masker, Arc::clone(&self.mask))),
            (_, masker) => {
                self.masker = masker;
                None
            }
        };
        Turn::Park(Box::pin(async move {
            let result = relay.emit(&mut done).await;
            let masker = match planning {
                Some((request, mut masker, mask)) => {
                    masker.prepare(request, &mask).await;
                    Some(masker)
                }
                None => None,
            };
            Resume {
                done,
                masker,
                result,
            }
        }))
    }
}
