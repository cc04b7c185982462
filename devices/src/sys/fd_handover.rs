//! Descriptors that cross a live update: duplicates to send (the sender keeps its own open until
//! the receiver took over) and, on the receiving side, an inherited fd adopted as an eventfd.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

/// A duplicate of `fd` (`F_DUPFD_CLOEXEC`): the same open file, a new descriptor.
pub fn duplicate(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: `fd` is borrowed from an owner that keeps it open for this call; the borrow does not
    // outlive it (the duplicate is a new descriptor the kernel hands out).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    borrowed.try_clone_to_owned()
}

/// Errors adopting an inherited descriptor.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot tell what file descriptor {fd} is")]
    Inspect {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("file descriptor {fd} is {what}, not an eventfd")]
    NotEventFd { fd: i32, what: String },
}

/// Takes an inherited descriptor as an eventfd, after checking it is one.
pub fn adopt_eventfd(fd: OwnedFd) -> Result<EventFd, AdoptError> {
    let raw = fd.as_raw_fd();
    let what = std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .map_err(|source| AdoptError::Inspect { fd: raw, source })?;
    let what = what.to_string_lossy().into_owned();
    if what != "anon_inode:[eventfd]" {
        return Err(AdoptError::NotEventFd { fd: raw, what });
    }
    // SAFETY: the descriptor is owned (moved in) and is an eventfd, as checked above; EventFd
    // becomes its only owner.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicated_eventfd_is_the_same_counter_and_a_file_is_not_adopted() {
        let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dup = adopt_eventfd(duplicate(&e).expect("dup")).expect("adopt");
        e.write(3).expect("write");
        assert_eq!(dup.read().expect("read"), 3);
        let f = vmm_sys_util::tempfile::TempFile::new()
            .expect("temp")
            .into_file();
        let err = adopt_eventfd(duplicate(&f).expect("dup")).unwrap_err();
        assert!(err.to_string().contains("not an eventfd"), "{err}");
    }
}
