//! The TLS writer's second thread: it sends sealed batches of records, in the order they were
//! handed over, while the writing thread seals the next batch. One connection's writer otherwise
//! does both serially (the AEAD, then the kernel's copy into the socket), and that single thread
//! is what bounds a TLS connection (`benches/tls_throughput.rs`).
//!
//! The pipeline lives within one write call: [`Sender::finish`] waits until every handed-over
//! batch is in the socket, so when a write returns its bytes are where a plain socket's would be,
//! and shutdown, close_notify and drop see no batch in flight (the writer holds the stream's
//! write lock for the whole call). Buffers cycle between the two threads ([`DEPTH`] in all), so
//! memory stays bounded and nothing is allocated per batch. After a failed send the thread sends
//! nothing more (the batches after a gap would be garbage to the peer) and hands every later
//! batch back with an error, so the writer wakes at once. The thread ends when the [`Sender`] is
//! dropped (with the stream's last handle); the drop joins it, and it is idle then.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Buffers in the pipeline: one being sealed, one being sent, one ready to go next (a third
/// absorbs the jitter of two threads sharing cores).
pub(crate) const DEPTH: usize = 3;

/// A sealed batch and how many of its bytes to send.
struct Batch {
    buf: Vec<u8>,
    len: usize,
}

/// A batch's buffer back from the thread, and whether it was sent.
struct Sent {
    buf: Vec<u8>,
    result: io::Result<()>,
}

/// The writing side's end of the pipeline.
pub(crate) struct Sender {
    /// None only while dropping (closing it ends the thread).
    batches: Option<SyncSender<Batch>>,
    sent: Receiver<Sent>,
    thread: Option<JoinHandle<()>>,
    /// Buffers free to seal into.
    spare: Vec<Vec<u8>>,
    /// Batches handed over and not yet back.
    in_flight: usize,
    /// The first failed send: the stream can't continue.
    failed: Option<io::Error>,
}

impl Sender {
    /// Start the thread that sends on `tcp`. Fails where threads can't be started (a seccomp
    /// filter without clone, resource limits): the writer then seals and sends by itself.
    pub fn spawn(tcp: Arc<TcpStream>) -> io::Result<Self> {
        let (batches, to_send) = mpsc::sync_channel::<Batch>(DEPTH);
        let (done, sent) = mpsc::sync_channel::<Sent>(DEPTH);
        let thread = std::thread::Builder::new()
            .name("tls-send".into())
            .spawn(move || run(&tcp, &to_send, &done))?;
        Ok(Sender {
            batches: Some(batches),
            sent,
            thread: Some(thread),
            spare: (0..DEPTH).map(|_| Vec::new()).collect(),
            in_flight: 0,
            failed: None,
        })
    }

    /// A buffer to seal the next batch into: a spare one, else the oldest one handed over once
    /// the thread has sent it. Err: a send failed (this batch must not be sealed: it would leave
    /// a gap in the record numbers the peer sees anyway, but there is no point).
    pub fn buffer(&mut self) -> io::Result<Vec<u8>> {
        // Collect what came back already, so a failure stops the sealing early.
        while let Ok(s) = self.sent.try_recv() {
            self.back(s);
        }
        if self.spare.is_empty() && self.failed.is_none() {
            let s = self.recv()?;
            self.back(s);
        }
        if let Some(e) = &self.failed {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        Ok(self.spare.pop().unwrap_or_default())
    }

    /// Return a buffer that was not handed over (sealing failed).
    pub fn give_back(&mut self, buf: Vec<u8>) {
        self.spare.push(buf);
    }

    /// Hand `buf[..len]` to the thread; it goes after every batch handed over before.
    pub fn send(&mut self, buf: Vec<u8>, len: usize) -> io::Result<()> {
        let Some(batches) = &self.batches else {
            return Err(io::Error::other("tls sender closed"));
        };
        // Never blocks: at most DEPTH buffers exist and the channel holds DEPTH.
        batches
            .send(Batch { buf, len })
            .map_err(|_| io::Error::other("tls sender thread ended"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Wait until every batch handed over is sent (or failed); the first failure, if any.
    pub fn finish(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            let s = self.recv()?;
            self.back(s);
        }
        match &self.failed {
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }

    fn recv(&mut self) -> io::Result<Sent> {
        self.sent.recv().map_err(|_| {
            // Only a panic ends the thread while batches are out: they are lost.
            self.in_flight = 0;
            let e = || io::Error::other("tls sender thread ended");
            self.failed.get_or_insert_with(e);
            e()
        })
    }

    fn back(&mut self, s: Sent) {
        self.in_flight -= 1;
        self.spare.push(s.buf);
        if let (Err(e), None) = (s.result, &self.failed) {
            self.failed = Some(e);
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has handed back what it holds.
        self.batches = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread: send each batch in order; after a failure send nothing more.
fn run(tcp: &TcpStream, batches: &Receiver<Batch>, done: &SyncSender<Sent>) {
    let mut broken = false;
    while let Ok(Batch { buf, len }) = batches.recv() {
        let result = if broken {
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls connection failed earlier",
            ))
        } else {
            let mut w = tcp;
            let r = w.write_all(&buf[..len]);
            broken = r.is_err();
            r
        };
        if done.send(Sent { buf, result }).is_err() {
            return;
        }
    }
}
