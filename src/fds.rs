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
