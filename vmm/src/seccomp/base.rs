//! What every tern thread needs just to be a Rust thread: the allocator, locks, time, its own exit
//! and the few calls std makes when a thread starts or ends. Each kind's list starts from this one.

/// The base allow list.
pub(super) fn syscalls() -> Vec<i64> {
    vec![
        // The allocator (glibc malloc arenas, large allocations, trimming freed memory).
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        // Mutex, Condvar, channels, thread join (all futex based).
        libc::SYS_futex,
        libc::SYS_sched_yield,
        // Time: Instant/SystemTime (vDSO, with this as the fallback), thread::sleep.
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // HashMap's RandomState seeds itself once per thread.
        libc::SYS_getrandom,
        // Log records and error messages on stderr.
        libc::SYS_write,
        libc::SYS_writev,
        // Signal plumbing: the vCPU kick signal returns through rt_sigreturn; std masks signals around
        // thread creation and removes its alternate signal stack when a thread ends.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        // Thread identity (log records, tgkill targets).
        libc::SYS_gettid,
        libc::SYS_getpid,
        // A panic's abort raises SIGABRT at itself.
        libc::SYS_tgkill,
        // Closing a descriptor dropped on this thread.
        libc::SYS_close,
        // The end of a thread or the process.
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
}

/// What a thread needs to start threads of its own: clone, and what the new thread does before it
/// installs its own filter (the child runs under this thread's filter until then: robust futex list,
/// rseq, name, alternate signal stack, then no_new_privs and the filter itself).
pub(super) fn spawn_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_seccomp,
        libc::SYS_sched_getaffinity,
    ]
}
