//! Before the first pass: telling the destination which memory it will receive as data, so that
//! it allocates those pages while they are on the way (`engine::prefault`) instead of faulting
//! each one in as its data arrives.

use super::*;
use crate::engine::pages::entry_run;
use crate::protocol::PageEncoding;

/// The most entries one hint carries (16 bytes each: 1 MiB); a guest fragmented beyond that
/// has its first ranges hinted and the rest faulted in as the data arrives.
const MAX_HINT_ENTRIES: usize = 1 << 16;

impl Source<'_> {
    /// Queues [`Frame::Populated`] with the host's populated memory, if the host knows it,
    /// ahead of the first pass's memory on the control connection (lane 0); a lane's failure
    /// path reports a destination that went away, with its reason. Only a hint: the first pass
    /// asks the host again chunk by chunk, after each chunk's claim (a page written since this
    /// snapshot must be read then, or it would go as a zero marker with its dirty bit dropped).
    pub(super) fn send_populated(&mut self) -> Result<(), MigrationError> {
        let mut entries = Vec::new();
        for (base, len) in self.regions.clone() {
            let range = GpaRange::new(base, len);
            let mut populated = DirtyBitmap::new(base, len).map_err(MigrationError::Bitmap)?;
            if !self
                .host
                .populated(range, &mut populated)
                .map_err(MigrationError::Host)?
            {
                return Ok(());
            }
            self.ranges.fill_from(&populated);
            for run in self.ranges.runs() {
                let gpa = base.0 + run.first_page * PAGE_SIZE;
                let room = MAX_HINT_ENTRIES.saturating_sub(entries.len());
                entries.extend(entry_run(gpa, run.npages, PageEncoding::Data).take(room));
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.lanes()?.send_frame(0, OwnedFrame::Populated(entries))
    }
}
