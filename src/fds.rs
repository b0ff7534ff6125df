//! Descriptors passed over Unix sockets (SCM_RIGHTS): a client's stdout to the daemon
//! ([`crate::direct`]), a command's stdio to a sandbox's agent ([`crate::sandbox::agent`]);
//! and blocking writes into a descriptor that may have been made non-blocking.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The most descriptors one message carries here.
const MAX_FDS: usize = 4;

/// Sends `bytes` on `socket`, `fds` attached to them (none: a plain send); answers how
/// many bytes went.
pub fn send(socket: RawFd, bytes: &[u8], fds: &[RawFd], flags: MsgFlags) -> nix::Result<usize> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(socket, &[IoSlice::new(bytes)], cmsgs, flags, None)
}

/// Receives into `buf` from `socket`, with the descriptors that came along (close-on-exec,
/// owned here); answers the bytes read and the descriptors.
pub fn receive(
    socket: RawFd,
    buf: &mut [u8],
    flags: MsgFlags,
) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel has just installed these descriptors in this process for
            // us; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}

/// Waits until `socket` has something to read, then receives it as [`receive`] does
/// (the socket is the runtime's, non-blocking).
pub async fn receive_from(
    socket: &tokio::net::UnixStream,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use std::os::fd::AsRawFd;
    loop {
        socket.readable().await?;
        match socket.try_io(tokio::io::Interest::READABLE, || {
            receive(socket.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            got => return got,
        }
    }
}

/// Writes all of `buf` to `fd`, waiting for room when the descriptor is non-blocking
/// (someone else's choice for a file it shares, or a socket's) rather than failing with
/// EAGAIN.
pub fn write_all(fd: BorrowedFd<'_>, buf: &[u8]) -> std::io::Result<()> {
    write_all_with(fd, buf, None)
}

/// [`write_all`], with `attached` (a descriptor) sent on the first byte: `fd` is then a
/// Unix socket.
pub fn write_all_with(
    fd: BorrowedFd<'_>,
    mut buf: &[u8],
    mut attached: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    use nix::errno::Errno;
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        let wrote = match attached {
            Some(a) => send(
                fd.as_raw_fd(),
                buf,
                &[a.as_raw_fd()],
                MsgFlags::MSG_NOSIGNAL,
            ),
            None => nix::unistd::write(fd, buf),
        };
        match wrote {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                attached = None;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait_writable(fd)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn wait_writable(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut polled = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut polled, PollTimeout::NONE) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes every descriptor from 3 up close-on-exec, so that nothing this process inherited
/// (a shell's stray pipe, the descriptors a daemon's starter had open) or was handed goes
/// on into the programs it starts: a sandbox command that holds a pipe open keeps its
/// reader from ever seeing the end (a CI step that never finishes), and one that holds the
/// agent's control socket could speak for the agent. This process's own use of them is
/// unchanged. One `close_range` (Linux 5.11); on an older kernel each open descriptor (as
/// `/proc/self/fd` lists them).
pub fn close_on_exec_from_3() -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on open descriptors.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD on a descriptor number; one that closed in between
        // (the directory's own) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod cloexec_tests {
    use std::os::fd::AsRawFd;

    #[test]
    fn inherited_descriptors_become_close_on_exec() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        for fd in [r.as_raw_fd(), w.as_raw_fd()] {
            // SAFETY: clearing FD_CLOEXEC on a pipe this test owns.
            assert_eq!(unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) }, 0);
        }
        super::close_on_exec_from_3().expect("marked");
        for fd in [r.as_raw_fd(), w.as_raw_fd()] {
            // SAFETY: reading the flags of a descriptor this test owns.
            let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
            assert_eq!(
                flags & nix::libc::FD_CLOEXEC,
                nix::libc::FD_CLOEXEC,
                "fd {fd}"
            );
        }
    }
}
