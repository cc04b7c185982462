//! A lane's read-ahead helper: a thread that reads the pages of the lane's next memory batch (the
//! zero check and the page sums, [`MemoryBatch::resolve`]) while the lane writes the current one.
//!
//! One connection's rate is bound by its writing thread, which over TCP also runs much of the
//! kernel's network work; reading every page for its sum on that thread slowed a summed tcp
//! migration to ~0.8 of a raw socket copy while the other core had time to spare. Reading a
//! batch ahead moves that work off the writer. Reading early is as safe as reading late: the
//! batch's pages were claimed before it was queued, so a page the guest rewrites afterwards has
//! its dirty bit set again and is resent.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;

use crate::dirty::GuestPageBitmap;

use super::error::MigrationError;
use super::pages::MemoryBatch;

/// The helper of one lane; holds at most one batch. Its thread starts with the first batch
/// handed over, so a lane that never has a second batch queued (an idle guest's, a device
/// stream's) never starts one.
#[derive(Debug)]
pub struct ReadAhead {
    index: usize,
    mem: GuestMemoryMmap<GuestPageBitmap>,
    helper: Helper,
}

#[derive(Debug)]
enum Helper {
    NotStarted,
    Running {
        to: SyncSender<MemoryBatch>,
        from: Receiver<Result<MemoryBatch, MigrationError>>,
        handle: JoinHandle<()>,
    },
    /// No thread could be started: the lane reads its own pages.
    Unavailable,
}

impl ReadAhead {
    /// The helper of lane `index` over `mem`.
    pub fn new(index: usize, mem: GuestMemoryMmap<GuestPageBitmap>) -> Self {
        ReadAhead {
            index,
            mem,
            helper: Helper::NotStarted,
        }
    }

    fn start(&mut self) {
        let (to, jobs) = mpsc::sync_channel::<MemoryBatch>(1);
        let (done, from) = mpsc::sync_channel(1);
        let mem = self.mem.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tern-mig-read{}", self.index))
            .spawn(move || {
                for mut batch in jobs {
                    let result = batch.resolve(&mem).map(|()| batch);
                    if done.send(result).is_err() {
                        return;
                    }
                }
            });
        self.helper = match spawned {
            Ok(handle) => Helper::Running { to, from, handle },
            Err(e) => {
                log::warn!(
                    "lane {} reads its own pages: no read-ahead thread: {e}",
                    self.index
                );
                Helper::Unavailable
            }
        };
    }

    /// Hands `batch` over to be prepared, or gives it back when there is no helper thread.
    /// Call [`ReadAhead::take`] before the next `submit`.
    pub fn submit(&mut self, batch: MemoryBatch) -> Result<(), MemoryBatch> {
        if matches!(self.helper, Helper::NotStarted) {
            self.start();
        }
        match &self.helper {
            Helper::Running { to, .. } => to.send(batch).map_err(|e| e.0),
            _ => Err(batch),
        }
    }

    /// The submitted batch, prepared (waits for it).
    pub fn take(&self) -> Result<MemoryBatch, MigrationError> {
        match &self.helper {
            Helper::Running { from, .. } => from.recv().map_err(|_| MigrationError::Panicked)?,
            _ => Err(MigrationError::Panicked),
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Helper::Running { to, handle, .. } =
            std::mem::replace(&mut self.helper, Helper::Unavailable)
        {
            // Closing the job queue ends the helper after the batch it is reading, if any.
            drop(to);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pages::BatchMode;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn helper_prepares_a_batch_as_the_lane_would() {
        // Pages 0 and 2 carry data, 1 and 3 are zero: the helper's entries, zero count and
        // sums must be what the lane's own resolve gives.
        let mem: GuestMemoryMmap<GuestPageBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 4 * 4096)]).expect("memory");
        mem.write_slice(&[7], GuestAddress(0x10_0000 + 100))
            .expect("write");
        mem.write_slice(&[9], GuestAddress(0x10_0000 + 2 * 4096 + 4095))
            .expect("write");
        let queued = || {
            let mut b = MemoryBatch::with_mode(BatchMode::StreamSummed);
            assert_eq!(
                b.push_pages(&mem, GuestAddress(0x10_0000), 4)
                    .expect("push"),
                4
            );
            b
        };
        let mut own = queued();
        own.resolve(&mem).expect("resolve");

        let mut helper = ReadAhead::new(0, mem.clone());
        for _ in 0..2 {
            assert!(helper.submit(queued()).is_ok(), "no helper thread");
            let read = helper.take().expect("take");
            assert_eq!(read.entries, own.entries);
            assert_eq!(read.sums, own.sums);
            assert_eq!(read.sums.len(), 2);
            assert_eq!((read.data_pages(), read.zero_pages), (2, 2));
        }
    }
}
