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

/// The helper of one lane; holds at most one batch.
#[derive(Debug)]
pub struct ReadAhead {
    to: Option<SyncSender<MemoryBatch>>,
    from: Receiver<Result<MemoryBatch, MigrationError>>,
    handle: Option<JoinHandle<()>>,
}

impl ReadAhead {
    /// Starts the helper for lane `index` over `mem`; `None` (the lane reads its own pages) when
    /// no thread can be started.
    pub fn start(index: usize, mem: GuestMemoryMmap<GuestPageBitmap>) -> Option<Self> {
        let (to, jobs) = mpsc::sync_channel::<MemoryBatch>(1);
        let (done, from) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name(format!("tern-mig-read{index}"))
            .spawn(move || {
                for mut batch in jobs {
                    let result = batch.resolve(&mem).map(|()| batch);
                    if done.send(result).is_err() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(handle) => Some(ReadAhead {
                to: Some(to),
                from,
                handle: Some(handle),
            }),
            Err(e) => {
                log::warn!("lane {index} reads its own pages: no read-ahead thread: {e}");
                None
            }
        }
    }

    /// Hands `batch` over to be resolved. Call [`ReadAhead::take`] before the next `submit`.
    pub fn submit(&self, batch: MemoryBatch) -> Result<(), MigrationError> {
        self.to
            .as_ref()
            .and_then(|to| to.send(batch).ok())
            .ok_or(MigrationError::Panicked)
    }

    /// The submitted batch, resolved (waits for it).
    pub fn take(&self) -> Result<MemoryBatch, MigrationError> {
        self.from.recv().map_err(|_| MigrationError::Panicked)?
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Closing the job queue ends the helper after the batch it is reading, if any.
        self.to = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
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

        let helper = ReadAhead::start(0, mem.clone()).expect("helper thread");
        for _ in 0..2 {
            helper.submit(queued()).expect("submit");
            let read = helper.take().expect("take");
            assert_eq!(read.entries, own.entries);
            assert_eq!(read.sums, own.sums);
            assert_eq!(read.sums.len(), 2);
            assert_eq!((read.data_pages(), read.zero_pages), (2, 2));
        }
    }
}
