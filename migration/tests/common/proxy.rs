//! A link between source and destination that the test can cut at a chosen frame of the control
//! connection: the first connection the source opens is the control one; the proxy parses its
//! frames in both directions and, at the first frame with the chosen tag in the chosen direction,
//! cuts every connection of the migration (before forwarding that frame, or right after). Data
//! connections are forwarded as bytes.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tern_migration::protocol::{FrameTag, HEADER_BYTES, PREAMBLE_BYTES};

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    SourceToDestination,
    DestinationToSource,
}

/// Where the link is cut.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub dir: Dir,
    pub tag: FrameTag,
    /// Forward the frame first (true), or cut instead of forwarding it (false).
    pub after: bool,
    /// Which occurrence of `tag` in `dir` (1 = the first).
    pub nth: usize,
}

struct Shared {
    cut: Option<Cut>,
    done: AtomicBool,
    sockets: Mutex<Vec<UnixStream>>,
    /// Tags seen on the control connection, in order, with their direction.
    seen: Mutex<Vec<(Dir, FrameTag)>>,
}

impl Shared {
    fn cut_all(&self) {
        self.done.store(true, Ordering::SeqCst);
        for s in self.sockets.lock().expect("sockets").iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The running proxy; the source connects to [`Proxy::path`].
pub struct Proxy {
    pub path: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a fresh socket and forwards to `destination` (a unix socket path).
    pub fn start(destination: PathBuf, cut: Option<Cut>) -> Proxy {
        let path = super::sock_path();
        let listener = UnixListener::bind(&path).expect("proxy bind");
        let shared = Arc::new(Shared {
            cut,
            done: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            let mut first = true;
            for conn in listener.incoming() {
                let Ok(src) = conn else { return };
                if sh.done.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(dst) = UnixStream::connect(&destination) else {
                    return;
                };
                for s in [&src, &dst] {
                    if let Ok(c) = s.try_clone() {
                        sh.sockets.lock().expect("sockets").push(c);
                    }
                }
                let control = std::mem::replace(&mut first, false);
                pump(&sh, &src, &dst, Dir::SourceToDestination, control);
                pump(&sh, &dst, &src, Dir::DestinationToSource, control);
            }
        });
        Proxy {
            path,
            shared,
            accept: Some(accept),
        }
    }

    /// Control-connection frames seen so far.
    pub fn seen(&self) -> Vec<(Dir, FrameTag)> {
        self.shared.seen.lock().expect("seen").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.cut_all();
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pump(sh: &Arc<Shared>, from: &UnixStream, to: &UnixStream, dir: Dir, control: bool) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let sh = sh.clone();
    std::thread::spawn(move || {
        let r = if control {
            frames(&sh, &mut from, &mut to, dir)
        } else {
            std::io::copy(&mut from, &mut to).map(drop)
        };
        if r.is_err() || sh.done.load(Ordering::SeqCst) {
            sh.cut_all();
        } else {
            // Clean end of stream: pass it on.
            let _ = to.shutdown(std::net::Shutdown::Write);
        }
    });
}

/// Forwards the preamble, then frame by frame, applying the cut.
fn frames(
    sh: &Shared,
    from: &mut UnixStream,
    to: &mut UnixStream,
    dir: Dir,
) -> std::io::Result<()> {
    let mut pre = [0u8; PREAMBLE_BYTES];
    from.read_exact(&mut pre)?;
    to.write_all(&pre)?;
    let mut head = [0u8; HEADER_BYTES];
    let mut payload = Vec::new();
    loop {
        if sh.done.load(Ordering::SeqCst) {
            return Ok(());
        }
        match from.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        payload.resize(len, 0);
        from.read_exact(&mut payload)?;
        let Some(tag) = FrameTag::from_u8(head[0]) else {
            return Err(std::io::Error::other("unknown frame tag"));
        };
        let count = {
            let mut seen = sh.seen.lock().expect("seen");
            seen.push((dir, tag));
            seen.iter().filter(|&&(d, t)| d == dir && t == tag).count()
        };
        let hit = sh
            .cut
            .is_some_and(|c| c.dir == dir && c.tag == tag && c.nth == count);
        if hit && !sh.cut.is_some_and(|c| c.after) {
            sh.cut_all();
            return Ok(());
        }
        if hit {
            // Cut right after this frame: nothing the peer answers to it may get through, so the
            // other direction stops before the frame goes out (it drops what it reads from now).
            sh.done.store(true, Ordering::SeqCst);
            to.write_all(&head)?;
            to.write_all(&payload)?;
            to.flush()?;
            sh.cut_all();
            return Ok(());
        }
        if sh.done.load(Ordering::SeqCst) {
            // Cut in the other direction while this frame was read: it does not get through.
            return Ok(());
        }
        to.write_all(&head)?;
        to.write_all(&payload)?;
    }
}
