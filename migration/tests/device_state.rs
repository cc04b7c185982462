//! Devices with state of their own (VFIO migration v2 as the engine drives it), with fake devices:
//! the state streams in chunks and arrives whole, the switchover waits for the destination to load
//! each device's initial data (switchover-ack), several devices go through P2P first, and a
//! stream the destination refuses fails the migration with its reason while the source resumes.

mod common;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::common::device::{FakeSinkDevice, FakeSourceDevice};
    use super::common::*;
    use tern_migration::engine::{error_chain, SendParams, DEVICE_CHUNK_BYTES};
    use tern_migration::transport::MigrationUrl;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Index of the first log event containing `what` (panics naming it when missing).
    fn at(events: &[String], what: &str) -> usize {
        events
            .iter()
            .position(|e| e.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} in {events:?}"))
    }

    struct Setup {
        host: FakeHost,
        factory: FakeFactory,
        received: Vec<Arc<std::sync::Mutex<Vec<u8>>>>,
        expected: Vec<Vec<u8>>,
    }

    /// An idle guest (it converges at once) with `n` devices; device i has `initial` pre-copy
    /// bytes and a STOP_COPY state of `state` bytes.
    fn setup(n: usize, initial: usize, state: usize) -> Setup {
        let host = FakeHost::hot_set(anon_memory(), 0, 100);
        let mut factory = FakeFactory::default();
        let mut s = Setup {
            host,
            factory: FakeFactory::default(),
            received: Vec::new(),
            expected: Vec::new(),
        };
        for i in 0..n {
            let id = format!("dev{i}");
            let init = pattern(initial, i as u8);
            let st = pattern(state, 100 + i as u8);
            s.expected.push([init.clone(), st.clone()].concat());
            let log = s.host.log.clone();
            s.host
                .devices
                .push(Box::new(FakeSourceDevice::new(&id, init, st, log.clone())));
            let sink = FakeSinkDevice::new(&id, log);
            s.received.push(sink.received.clone());
            factory.sinks.push(Box::new(sink));
        }
        s.factory = factory;
        s
    }

    fn run_setup(
        s: Setup,
        tweak: impl FnOnce(&mut SendParams),
    ) -> (Run, Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let received = s.received.clone();
        let r = run(MigrationUrl::Unix(sock_path()), s.host, s.factory, tweak);
        let got = received
            .iter()
            .map(|m| m.lock().expect("received").clone())
            .collect();
        (r, got, s.expected)
    }

    #[test]
    fn device_state_arrives_whole_after_the_destination_loaded_its_initial_data() {
        // 2.5 MiB + 7 of final state: three chunks, the last one partial.
        let state = 5 * DEVICE_CHUNK_BYTES / 2 + 7;
        let mut s = setup(1, 100 << 10, state);
        let log = s.host.log.clone();
        let mut sink = FakeSinkDevice::new("dev0", log.clone());
        sink.first_write_delay = Duration::from_millis(400);
        s.received[0] = sink.received.clone();
        s.factory.sinks = vec![Box::new(sink)];
        let (r, got, want) = run_setup(s, |_| {});
        r.src.as_ref().expect("source");
        assert!(
            r.dst.is_ok(),
            "{:?}",
            r.dst.as_ref().err().map(|e| error_chain(e))
        );
        assert_eq!(got[0].len(), want[0].len());
        assert!(got[0] == want[0], "the device stream arrived altered");
        let st = r.src_stats.snapshot();
        let d = &st.devices[0];
        assert_eq!(
            (d.precopy_bytes, d.stop_copy_bytes),
            ((100 << 10) as u64, state as u64)
        );
        assert!(d.initial_data_acked && !d.reset && !d.p2p, "{d:?}");
        let ev = log.events();
        // Switchover-ack: the guest paused only after the (slow) destination loaded the data.
        assert!(at(&ev, "dev0 dst loaded") < at(&ev, "pause"), "{ev:?}");
        assert!(at(&ev, "dev0 src PRE_COPY") < at(&ev, "pause"), "{ev:?}");
        assert!(
            at(&ev, "pause_devices") < at(&ev, "dev0 src STOP_COPY"),
            "{ev:?}"
        );
        assert!(
            at(&ev, "dev0 dst STOP") < at(&ev, "dev0 dst RUNNING"),
            "{ev:?}"
        );
        let src_stop = ev
            .iter()
            .position(|e| e == "dev0 src STOP")
            .expect("source STOP");
        assert!(at(&ev, "dev0 dst RUNNING") < src_stop, "{ev:?}");
    }

    #[test]
    fn without_switchover_ack_the_guest_pauses_before_the_device_loaded() {
        // The negative control of the test above: the same run with the ack off must show the
        // pause before the destination's slow first load, or that test proves nothing.
        let mut s = setup(1, 100 << 10, 4096);
        let log = s.host.log.clone();
        let mut sink = FakeSinkDevice::new("dev0", log.clone());
        sink.first_write_delay = Duration::from_millis(400);
        s.received[0] = sink.received.clone();
        s.factory.sinks = vec![Box::new(sink)];
        let (r, got, want) = run_setup(s, |p| p.switchover_ack = false);
        r.src.as_ref().expect("source");
        assert_eq!(got[0], want[0]);
        let ev = log.events();
        assert!(at(&ev, "pause") < at(&ev, "dev0 dst loaded"), "{ev:?}");
    }

    #[test]
    fn device_state_not_sent_is_seen_at_the_destination() {
        // What the lab's guest oracle checks end to end, here on bytes: drop the STOP_COPY data.
        let mut s = setup(1, 512, 9000);
        let log = s.host.log.clone();
        let mut dev = FakeSourceDevice::new("dev0", pattern(512, 0), pattern(9000, 100), log);
        dev.drop_stop_copy_data = true;
        s.host.devices = vec![Box::new(dev)];
        let (r, got, want) = run_setup(s, |_| {});
        r.src.as_ref().expect("source");
        assert_ne!(got[0], want[0]);
    }

    #[test]
    fn several_devices_pass_through_p2p_and_their_data_uses_its_own_connection() {
        let s = setup(2, 4096, DEVICE_CHUNK_BYTES + 1);
        let log = s.host.log.clone();
        let (r, got, want) = run_setup(s, |p| p.connections = 3);
        r.src.as_ref().expect("source");
        assert!(
            r.dst.is_ok(),
            "{:?}",
            r.dst.as_ref().err().map(|e| error_chain(e))
        );
        assert!(got == want, "device streams arrived altered");
        let ev = log.events();
        let last_p2p = at(&ev, "dev1 src P2P").max(at(&ev, "dev0 src P2P"));
        let first_stop = at(&ev, "dev0 src STOP_COPY").min(at(&ev, "dev1 src STOP_COPY"));
        assert!(last_p2p < first_stop, "{ev:?}");
        let last_run_p2p = at(&ev, "dev0 dst RUNNING_P2P").max(at(&ev, "dev1 dst RUNNING_P2P"));
        let first_run = ev
            .iter()
            .position(|e| e.ends_with("dst RUNNING"))
            .expect("running");
        assert!(last_run_p2p < first_run, "{ev:?}");
        assert!(r.src_stats.snapshot().devices.iter().all(|d| d.p2p));
    }

    #[test]
    fn a_stream_the_destination_refuses_fails_with_its_reason_and_the_source_resumes() {
        let s = setup(1, 0, 64 << 10);
        let log = s.host.log.clone();
        let mut factory = FakeFactory::default();
        let mut sink = FakeSinkDevice::new("dev0", log.clone());
        sink.poison = Some(pattern(64 << 10, 100)[0]);
        factory.sinks.push(Box::new(sink));
        let started = factory.started.clone();
        let r = run(MigrationUrl::Unix(sock_path()), s.host, factory, |_| {});
        let e = r.src.expect_err("the destination refused the device state");
        let chain = error_chain(&e);
        assert!(
            chain.contains("refused the stream") && chain.contains("dev0"),
            "{chain}"
        );
        let ev = log.events();
        assert!(
            at(&ev, "dev0 src RUNNING (recovered)") < at(&ev, "resume"),
            "{ev:?}"
        );
        assert!(ev.iter().any(|e| e == "dev0 dst reset"), "{ev:?}");
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_destination_device_whose_state_never_comes_fails_the_migration() {
        // The destination expects dev0; the source has no such device.
        let mut s = setup(1, 0, 4096);
        s.host.devices.clear();
        let log = s.host.log.clone();
        let (r, _, _) = run_setup(s, |_| {});
        let chain = error_chain(&r.src.expect_err("no state for dev0"));
        assert!(
            chain.contains("dev0") && chain.contains("did not arrive"),
            "{chain}"
        );
        assert!(log.events().iter().any(|e| e == "resume"));
    }
}
