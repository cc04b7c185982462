//! A fake device with state of its own (VFIO migration v2 as the engine sees it): its pre-copy
//! stream is `initial` bytes; its STOP_COPY stream is its state as of STOP_COPY, streamed in
//! chunks; every state change lands in a log shared with the host and the destination, so tests
//! can check the order of events across both sides.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_migration::engine::{
    DevicePending, DeviceReadEnd, DeviceStateSink, DeviceStateSource, HostError, DEVICE_CHUNK_BYTES,
};

use super::HostLog;

/// The source side.
pub struct FakeSourceDevice {
    pub id: String,
    pub precopy: bool,
    pub p2p: bool,
    pub initial: Vec<u8>,
    /// The device's live state; what STOP_COPY captures.
    pub state: Arc<Mutex<Vec<u8>>>,
    pub log: Arc<HostLog>,
    /// Send nothing after STOP_COPY (the negative control: state lost in transit).
    pub drop_stop_copy_data: bool,
    stream: Vec<u8>,
    pos: usize,
    phase: &'static str,
}

impl FakeSourceDevice {
    pub fn new(id: &str, initial: Vec<u8>, state: Vec<u8>, log: Arc<HostLog>) -> Self {
        FakeSourceDevice {
            id: id.into(),
            precopy: !initial.is_empty(),
            p2p: true,
            initial,
            state: Arc::new(Mutex::new(state)),
            log,
            drop_stop_copy_data: false,
            stream: Vec::new(),
            pos: 0,
            phase: "RUNNING",
        }
    }

    fn to(&mut self, phase: &'static str) {
        self.phase = phase;
        self.log.push(format!("{} src {phase}", self.id));
    }
}

impl DeviceStateSource for FakeSourceDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn has_precopy(&self) -> bool {
        self.precopy
    }
    fn has_p2p(&self) -> bool {
        self.p2p
    }
    fn start(&mut self) -> Result<(), HostError> {
        if self.precopy {
            self.stream = self.initial.clone();
            self.pos = 0;
            self.to("PRE_COPY");
        }
        Ok(())
    }
    fn pending(&mut self) -> Result<DevicePending, HostError> {
        let left = (self.stream.len() - self.pos) as u64;
        Ok(DevicePending {
            initial_bytes: if self.phase == "PRE_COPY" { left } else { 0 },
            dirty_bytes: 0,
            stop_copy_bytes: self.state.lock().expect("state").len() as u64,
        })
    }
    fn read_chunk(&mut self, chunk: &mut Vec<u8>) -> Result<DeviceReadEnd, HostError> {
        let room = DEVICE_CHUNK_BYTES - chunk.len();
        let n = room.min(self.stream.len() - self.pos);
        chunk.extend_from_slice(&self.stream[self.pos..self.pos + n]);
        self.pos += n;
        Ok(if self.pos < self.stream.len() {
            DeviceReadEnd::ChunkFull
        } else if self.phase == "STOP_COPY" {
            DeviceReadEnd::EndOfStream
        } else {
            DeviceReadEnd::NoDataNow
        })
    }
    fn quiesce_p2p(&mut self) -> Result<(), HostError> {
        self.to("P2P");
        Ok(())
    }
    fn stop_copy(&mut self) -> Result<(), HostError> {
        self.stream = if self.drop_stop_copy_data {
            Vec::new()
        } else {
            self.state.lock().expect("state").clone()
        };
        self.pos = 0;
        self.to("STOP_COPY");
        Ok(())
    }
    fn recover(&mut self) -> Result<bool, HostError> {
        self.to("RUNNING (recovered)");
        Ok(false)
    }
    fn finish(&mut self) -> Result<(), HostError> {
        self.to("STOP");
        Ok(())
    }
}

/// The destination side: collects the stream; refuses a stream containing `poison`.
pub struct FakeSinkDevice {
    pub id: String,
    pub received: Arc<Mutex<Vec<u8>>>,
    pub log: Arc<HostLog>,
    /// How long loading the first piece takes (a slow device's initial data).
    pub first_write_delay: Duration,
    pub poison: Option<u8>,
    writes: u64,
}

impl FakeSinkDevice {
    pub fn new(id: &str, log: Arc<HostLog>) -> Self {
        FakeSinkDevice {
            id: id.into(),
            received: Arc::new(Mutex::new(Vec::new())),
            log,
            first_write_delay: Duration::ZERO,
            poison: None,
            writes: 0,
        }
    }

    fn note(&self, what: &str) {
        self.log.push(format!("{} dst {what}", self.id));
    }
}

impl DeviceStateSink for FakeSinkDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn begin(&mut self) -> Result<(), HostError> {
        self.note("RESUMING");
        Ok(())
    }
    fn write(&mut self, data: &[u8]) -> Result<(), HostError> {
        if self.poison.is_some_and(|p| data.contains(&p)) {
            return Err(HostError::new(
                "load device data",
                "the device refused the stream (Bad address)",
            ));
        }
        if self.writes == 0 {
            std::thread::sleep(self.first_write_delay);
        }
        self.writes += 1;
        self.received
            .lock()
            .expect("received")
            .extend_from_slice(data);
        self.note(&format!("loaded {} bytes", data.len()));
        Ok(())
    }
    fn end(&mut self) -> Result<(), HostError> {
        self.note("STOP");
        Ok(())
    }
    fn run_p2p(&mut self) -> Result<(), HostError> {
        self.note("RUNNING_P2P");
        Ok(())
    }
    fn run(&mut self) -> Result<(), HostError> {
        self.note("RUNNING");
        Ok(())
    }
    fn recover(&mut self) -> Result<bool, HostError> {
        self.note("reset");
        Ok(true)
    }
}
