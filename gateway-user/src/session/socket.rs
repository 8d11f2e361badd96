//! Reads and writes of the relay loop's sockets as plain system calls.
//!
//! std's `TcpStream` goes through the C library's `recv` and `send`, which
//! are thread-cancellation points: in a process with more than one thread
//! each call turns asynchronous cancellation on and off around the system
//! call (two atomic updates and ~60 instructions, about 240 instructions a
//! select-only transaction, measured with callgrind). The gateway never
//! cancels threads, so the loop calls the kernel directly (rustix).

use std::io;
use std::net::TcpStream;

use rustix::net::{RecvFlags, SendFlags};

/// Reads what the socket has, up to `buf.len()` bytes; 0 at end of stream.
pub fn recv(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    rustix::net::recv(sock, buf, RecvFlags::empty())
        .map(|(n, _)| n)
        .map_err(io::Error::from)
}

/// A socket written with plain `send` calls. `NOSIGNAL`: a peer that went
/// away is an error on this call, not a SIGPIPE for the process.
pub struct Sender<'a>(pub &'a TcpStream);

impl io::Write for Sender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        rustix::net::send(self.0, buf, SendFlags::NOSIGNAL).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
