//! The migration engine: the source's pre-copy loop ([`start_send`]) and the destination's
//! receiver ([`receive`]), the traits a VMM implements ([`MigrationHost`], [`MigrationTarget`],
//! [`MigrationTargetFactory`]), convergence policy and live stats.

mod device;
mod device_sinks;
mod dirty_rate;
mod error;
mod host;
mod in_doubt;
mod lanes;
mod pages;
mod params;
mod policy;
mod precopy;
mod prefault;
mod read_ahead;
mod receive;
mod stats;
mod steps;

pub use device::{
    DeviceMigrationRecord, DevicePending, DeviceReadEnd, DeviceStateSink, DeviceStateSource,
    DEVICE_CHUNK_BYTES,
};
pub use error::{error_chain, MigrationError};
pub use host::{
    Handover, HandoverFd, HostCause, HostError, LocalRegion, MigrationHost, MigrationState,
    MigrationTarget, MigrationTargetFactory,
};
pub use in_doubt::InDoubtVm;
pub use pages::{is_zero_page, MemoryBatch, PageWriter, BATCH_DATA_PAGES};
pub use params::{SendParams, TimeoutStrategy};
pub use policy::{
    decide, expected_downtime_ms, switchover_ms, AutoConverge, Decision, SwitchoverLoad,
};
pub use precopy::{send, start_send, MigrationOutcome, STATE_ESTIMATE_BYTES};
pub use receive::{receive, receive_on};
pub use stats::{
    DirtyPagesBySource, IterationRecord, MigrationStats, MigrationStatsSnapshot, MigrationStatus,
    PassKind, SwitchoverBreakdown, HISTORY_LIMIT,
};
pub use steps::{StepTimes, TimedStep};
