//! Descriptors that outlive an `exec` of the daemon: what a planned restart hands over.
//!
//! A planned restart (`cutover up --upgrade`, `cutover reload`, SIGUSR2) replaces the daemon's
//! program in place. Its listening sockets, the client connections parked between requests
//! and its instances must survive that, so their descriptors are kept open across `exec`
//! (their close-on-exec flag cleared) and the new program takes them back by number. Every
//! other descriptor still closes on `exec`, as Rust opens them all with `O_CLOEXEC`.
//!
//! This is the only place that turns a number into a descriptor, which is why it lives in the
//! one crate that may use `unsafe`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Keeps `fd` open across the coming `exec`; returns its number for the new program.
pub fn keep_across_exec(fd: BorrowedFd<'_>) -> std::io::Result<RawFd> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor we borrow, valid for the call; F_GETFD/F_SETFD only
    // read and write its flags.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raw)
}

/// Takes ownership of descriptor `raw`, inherited from the program this one replaced, and
/// marks it close-on-exec again. Fails when `raw` is not an open descriptor.
///
/// Each number must be taken once: the hand-over file lists each once, and it is read once
/// and deleted, so no other owner of these numbers exists in this process.
pub fn take_inherited(raw: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_GETFD only asks whether `raw` is open; it touches no memory.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is open (checked above) and nothing else in this process owns it: it was
    // inherited across exec for exactly this hand-over and is taken once (see above).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fcntl on the descriptor we now own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_kept_descriptor_is_taken_back_and_a_closed_number_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dup = l.as_fd().try_clone_to_owned().unwrap();
        let raw = keep_across_exec(dup.as_fd()).unwrap();
        // Hand the number over as a new program would get it.
        std::mem::forget(dup);
        let back = std::net::TcpListener::from(take_inherited(raw).unwrap());
        assert_eq!(back.local_addr().unwrap(), addr);
        drop(back);
        assert!(
            take_inherited(raw).is_err(),
            "a closed number is not a descriptor"
        );
    }
}
