#![no_main]

libfuzzer_sys::fuzz_target!(init: {
    // The client half of the in-memory connection may write after the server closed it.
    // SAFETY: setting a signal disposition to SIG_IGN before any thread of this target exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}, |data: &[u8]| tern_fuzz::api::request(data));
