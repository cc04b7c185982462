//! Local mode with devices handed over (live update): the descriptors and their descriptions
//! reach the destination's factory before its config, the source releases the devices only once
//! paused, and either lets them go for good (success) or takes them back (the destination failed),
//! never both; a host that refuses the handover stops the migration before anything connects.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tern_migration::dirty::{DirtyBitmap, DirtySource, GpaRange};
use tern_migration::engine::{
    error_chain, receive_on, start_send, DeviceStateSource, Handover, HandoverFd, HostError,
    LocalRegion, MigrationError, MigrationHost, MigrationState, MigrationStats, MigrationStatus,
    MigrationTarget, MigrationTargetFactory, SendParams,
};
use tern_migration::transport::{MigrationListener, MigrationUrl};

/// The fake VM with one device to hand over (its "fd" is one end of a socket pair, so the test
/// can tell the destination got the same file), recording the handover calls in order.
struct HandoverHost {
    inner: FakeHost,
    device_fd: UnixStream,
    refuse: bool,
    calls: Arc<Mutex<Vec<&'static str>>>,
}

impl HandoverHost {
    fn call(&self, c: &'static str) {
        self.calls.lock().expect("lock").push(c);
    }
}

impl MigrationHost for HandoverHost {
    fn guest_memory(&self) -> Mem {
        self.inner.guest_memory()
    }
    fn config(&mut self) -> Result<Vec<u8>, HostError> {
        self.inner.config()
    }
    fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError> {
        self.inner.dirty_sources()
    }
    fn populated(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, HostError> {
        self.inner.populated(range, out)
    }
    fn pause(&mut self) -> Result<(), HostError> {
        self.inner.pause()
    }
    fn pause_devices(&mut self) -> Result<(), HostError> {
        self.inner.pause_devices()
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.inner.resume()
    }
    fn save_state(&mut self) -> Result<MigrationState, HostError> {
        self.inner.save_state()
    }
    fn throttle(&mut self, percent: u8) -> Result<(), HostError> {
        self.inner.throttle(percent)
    }
    fn device_states(&mut self) -> Result<Vec<Box<dyn DeviceStateSource>>, HostError> {
        self.inner.device_states()
    }
    fn handover(&mut self) -> Result<Handover, HostError> {
        self.call("handover");
        if self.refuse {
            return Err(HostError::new(
                "hand the devices to the new process",
                "device mtty0 is an mdev",
            ));
        }
        let dup = |s: &UnixStream| {
            s.try_clone()
                .map(OwnedFd::from)
                .map_err(|e| HostError::new("dup", e))
        };
        Ok(Handover {
            fds: vec![
                HandoverFd {
                    meta: br#"{"kind":"device","id":"dev0"}"#.to_vec(),
                    fd: dup(&self.device_fd)?,
                },
                HandoverFd {
                    meta: br#"{"kind":"vector","id":"dev0","vector":0}"#.to_vec(),
                    fd: dup(&self.device_fd)?,
                },
            ],
            devices: vec!["dev0".into()],
            notes: vec![("dev0".into(), "accounting note".into())],
        })
    }
    fn handover_release(&mut self) -> Result<(), HostError> {
        assert!(self.inner.guest.is_paused(), "released while the guest ran");
        self.call("release");
        Ok(())
    }
    fn handover_reclaim(&mut self) -> Result<(), HostError> {
        self.call("reclaim");
        Ok(())
    }
    fn handover_done(&mut self) {
        self.call("done");
    }
}

/// The fake factory, recording what was inherited (and writing a byte to each fd to prove it is
/// the source's socket, whose peer the test reads).
#[derive(Default)]
struct InheritingFactory {
    inner: FakeFactory,
    inherited: Arc<Mutex<Vec<Vec<u8>>>>,
    refuse: bool,
}

impl MigrationTargetFactory for InheritingFactory {
    fn inherit(&mut self, fds: Vec<HandoverFd>) -> Result<(), HostError> {
        if self.refuse {
            return Err(HostError::new(
                "inherit devices",
                "injected: cannot take them",
            ));
        }
        for h in fds {
            UnixStream::from(h.fd)
                .write_all(b"x")
                .map_err(|e| HostError::new("write", e))?;
            self.inherited.lock().expect("lock").push(h.meta);
        }
        Ok(())
    }
    fn create(
        &mut self,
        config: &[u8],
        local: Vec<LocalRegion>,
    ) -> Result<Box<dyn MigrationTarget>, HostError> {
        self.inner.create(config, local)
    }
}

struct Outcome {
    src: Result<(), MigrationError>,
    src_stats: Arc<MigrationStats>,
}

fn live_update(host: HandoverHost, factory: InheritingFactory) -> Outcome {
    let path = sock_path();
    let listener = MigrationListener::bind(&MigrationUrl::Unix(path.clone())).expect("bind");
    let url = listener.url().clone();
    let dst = std::thread::spawn(move || {
        let mut f = factory;
        let stats = MigrationStats::new();
        let _ = receive_on(&listener, &mut f, &stats);
    });
    let mut params = SendParams::new(url);
    params.local = true;
    params.timeout = Duration::from_secs(60);
    let src_stats = Arc::new(MigrationStats::new());
    let out = start_send(Box::new(host), params, src_stats.clone())
        .expect("spawn")
        .join()
        .expect("source thread");
    // A source that stopped before connecting leaves the destination waiting: a connection that
    // closes at once ends its wait (one whose migration ran finds no listener any more).
    let _ = UnixStream::connect(&path);
    dst.join().expect("destination thread");
    Outcome {
        src: out.result,
        src_stats,
    }
}

type Calls = Arc<Mutex<Vec<&'static str>>>;

/// The host, its recorded calls, and the peer of its device socket.
fn host(refuse: bool) -> (HandoverHost, Calls, UnixStream) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (device_fd, peer) = UnixStream::pair().expect("socketpair");
    (
        HandoverHost {
            inner: FakeHost::new(shared_memory(), 16, 50),
            device_fd,
            refuse,
            calls: calls.clone(),
        },
        calls,
        peer,
    )
}

#[test]
fn devices_go_with_their_descriptions_and_are_let_go_only_after_the_destination_runs() {
    let (h, calls, mut peer) = host(false);
    let factory = InheritingFactory::default();
    let inherited = factory.inherited.clone();
    let r = live_update(h, factory);
    if let Err(e) = &r.src {
        panic!("live update failed: {}", error_chain(e));
    }
    assert_eq!(*calls.lock().unwrap(), ["handover", "release", "done"]);
    let got = inherited.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    assert!(String::from_utf8_lossy(&got[1]).contains("vector"));
    // Both descriptors were the source's own socket: the destination's two bytes arrive.
    let mut got2 = [0u8; 2];
    peer.read_exact(&mut got2)
        .expect("the destination wrote on the handed fds");
    assert_eq!(&got2, b"xx");
    let s = r.src_stats.snapshot();
    assert_eq!(s.status, MigrationStatus::Completed);
    let d = s.devices.iter().find(|d| d.id == "dev0").expect("record");
    assert!(d.handed_over);
    assert_eq!(d.handover_note.as_deref(), Some("accounting note"));
}

#[test]
fn a_destination_that_fails_after_the_release_gives_the_devices_back() {
    let (h, calls, _peer) = host(false);
    let factory = InheritingFactory {
        inner: FakeFactory {
            fail_start: true,
            ..FakeFactory::default()
        },
        ..InheritingFactory::default()
    };
    let r = live_update(h, factory);
    assert!(r.src.is_err(), "the destination failed to start");
    assert_eq!(*calls.lock().unwrap(), ["handover", "release", "reclaim"]);
    assert!(r
        .src_stats
        .snapshot()
        .devices
        .iter()
        .all(|d| !d.handed_over));
}

#[test]
fn a_destination_that_refuses_the_devices_fails_it_before_any_release() {
    let (h, calls, _peer) = host(false);
    let factory = InheritingFactory {
        refuse: true,
        ..InheritingFactory::default()
    };
    let r = live_update(h, factory);
    let e = error_chain(&r.src.expect_err("refused"));
    assert!(e.contains("cannot take them"), "{e}");
    assert_eq!(*calls.lock().unwrap(), ["handover"]);
}

#[test]
fn a_host_that_cannot_hand_its_devices_over_stops_it_first() {
    let (h, calls, _peer) = host(true);
    let r = live_update(h, InheritingFactory::default());
    let e = error_chain(&r.src.expect_err("refused"));
    assert!(e.contains("mtty0 is an mdev"), "{e}");
    assert_eq!(*calls.lock().unwrap(), ["handover"]);
}
