//! A scripted [`MigrationOps`] for the unit tests: a device like mtty whose data streams are
//! scratch files, with scripted arc failures and resets.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use vmm_sys_util::errno;

use super::caps::MigrationCaps;
use super::ops::{MigrationOps, PrecopyInfo};
use super::state::check_arc;
use super::state::MigState::{self, *};

/// A scratch file under the temp dir, removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Scratch(std::env::temp_dir().join(format!("tern-devmig-{}-{tag}-{n}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the fake does on one arc.
#[derive(Clone, Copy)]
pub(crate) struct Failure {
    pub(crate) arc: (MigState, MigState),
    pub(crate) errno: i32,
    pub(crate) then: MigState,
}

/// A device like mtty: PRE_COPY streams a header, entering STOP_COPY appends the rest to the
/// same stream (no new fd from PRE_COPY_P2P), STOP -> STOP_COPY opens a whole stream.
pub(crate) struct Fake {
    pub(crate) flags: Option<u64>,
    pub(crate) header: Vec<u8>,
    pub(crate) body: Vec<u8>,
    pub(crate) inner: Mutex<FakeState>,
}

pub(crate) struct FakeState {
    pub(crate) state: MigState,
    pub(crate) arcs: Vec<(MigState, MigState)>,
    pub(crate) fail: Option<Failure>,
    pub(crate) save: Scratch,
    pub(crate) resume: Scratch,
    pub(crate) resume_read_only: bool,
    pub(crate) no_fd: bool,
    pub(crate) resets: u32,
    pub(crate) reset_to: MigState,
}

impl Fake {
    pub(crate) fn new(header: Vec<u8>, body: Vec<u8>) -> Self {
        Fake {
            flags: Some(0x7),
            header,
            body,
            inner: Mutex::new(FakeState {
                state: Running,
                arcs: Vec::new(),
                fail: None,
                save: Scratch::new("save"),
                resume: Scratch::new("resume"),
                resume_read_only: false,
                no_fd: false,
                resets: 0,
                reset_to: Running,
            }),
        }
    }

    pub(crate) fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.inner.lock().expect("fake lock")
    }

    pub(crate) fn resumed(&self) -> Vec<u8> {
        std::fs::read(&self.st().resume.0).unwrap_or_default()
    }
}

pub(crate) fn errno_err(e: i32) -> errno::Error {
    errno::Error::new(e)
}

impl MigrationOps for Fake {
    fn migration_flags(&self) -> Result<Option<u64>, errno::Error> {
        Ok(self.flags)
    }
    fn device_state(&self) -> Result<u32, errno::Error> {
        Ok(self.st().state.raw())
    }
    fn set_device_state(&self, next: MigState) -> Result<Option<File>, errno::Error> {
        let mut st = self.st();
        let cur = st.state;
        // The handle must only ever send single arcs.
        check_arc(
            cur,
            next,
            MigrationCaps::from_flags(self.flags.unwrap_or(0)),
        )
        .expect("the handle sent a single arc");
        st.arcs.push((cur, next));
        if let Some(f) = st.fail.filter(|f| f.arc == (cur, next)) {
            st.state = f.then;
            return Err(errno_err(f.errno));
        }
        st.state = next;
        let io = |e: io::Error| errno_err(e.raw_os_error().unwrap_or(libc::EIO));
        match (cur, next) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                std::fs::write(&st.save.0, &self.header).map_err(io)?;
                Ok(Some(File::open(&st.save.0).map_err(io)?))
            }
            (PreCopyP2p | PreCopy, StopCopy) => {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&st.save.0)
                    .map_err(io)?;
                f.write_all(&self.body).map_err(io)?;
                Ok(None)
            }
            (Stop, StopCopy) if st.no_fd => Ok(None),
            (Stop, StopCopy) => {
                let whole = [self.header.as_slice(), &self.body].concat();
                std::fs::write(&st.save.0, whole).map_err(io)?;
                Ok(Some(File::open(&st.save.0).map_err(io)?))
            }
            (Stop, Resuming) => {
                std::fs::write(&st.resume.0, b"").map_err(io)?;
                let f = if st.resume_read_only {
                    File::open(&st.resume.0)
                } else {
                    std::fs::OpenOptions::new().write(true).open(&st.resume.0)
                };
                Ok(Some(f.map_err(io)?))
            }
            _ => Ok(None),
        }
    }
    fn stop_copy_size(&self) -> Result<u64, errno::Error> {
        Ok((self.header.len() + self.body.len()) as u64)
    }
    fn precopy_info(&self, data: &File) -> Result<PrecopyInfo, errno::Error> {
        let pos = (&*data)
            .stream_position()
            .map_err(|_| errno_err(libc::EINVAL))?;
        Ok(PrecopyInfo {
            initial_bytes: self.header.len() as u64 - pos.min(self.header.len() as u64),
            dirty_bytes: 0,
        })
    }
    fn reset(&self) -> Result<(), errno::Error> {
        let mut st = self.st();
        st.resets += 1;
        st.state = st.reset_to;
        Ok(())
    }
}
