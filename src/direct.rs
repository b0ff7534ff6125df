//! Direct output: a client on this machine hands its own stdout and stderr to the daemon
//! (SCM_RIGHTS over a Unix socket beside the daemon's, `<socket>.fds`), so that a command
//! run on this machine writes to them itself instead of through the daemon and the gRPC
//! stream: the same file, pipe or socket the client was given, at the speed of a pipe.
//!
//! The exchange: one message from the client, a token (32 hex characters) and a byte
//! saying which streams follow (1 stdout, 2 stderr), with the descriptors attached; one
//! byte back (`k`) once the daemon holds them, which the client does not wait for: its
//! Run request, on the gRPC connection, may arrive first, and the run then waits for the
//! descriptors (up to [`RECEIVE_WITHIN`]; without them its output comes through the
//! daemon, as always). The run takes them by the token and drops them when it ends, so a
//! pipe's reader sees its end. The client keeps the connection open while it lives: when
//! it closes before its Run took them, the daemon drops them (and in any case after
//! [`KEEP_FOR`]). Only from the daemon's own user.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;

/// How long handed descriptors wait for their Run request.
pub const KEEP_FOR: Duration = Duration::from_secs(30);

const TOKEN_LEN: usize = 32;

/// A client's message: its token and a byte saying which streams follow.
const MESSAGE_LEN: usize = TOKEN_LEN + 1;

/// How long the daemon waits for a connected client's message, and a run for the
/// descriptors its request names.
pub const RECEIVE_WITHIN: Duration = Duration::from_secs(2);

/// The descriptor socket beside the daemon's socket.
pub fn socket_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".fds");
    PathBuf::from(name)
}

/// A command's output descriptors, handed over by its client.
#[derive(Debug, Clone, Default)]
pub struct DirectOutput {
    pub stdout: Option<Arc<OwnedFd>>,
    pub stderr: Option<Arc<OwnedFd>>,
}

impl DirectOutput {
    pub fn is_empty(&self) -> bool {
        self.stdout.is_none() && self.stderr.is_none()
    }
}

/// Client side: hands `stdout`/`stderr` (either may be absent) to the daemon listening at
/// `fds_socket`; answers the token to put in the Run request and the connection to keep
/// open until the run has ended, or why it could not. (Without waiting for the daemon's
/// acknowledgement: a round trip of two processes' wake-ups on every run.)
pub fn hand_over(
    fds_socket: &Path,
    stdout: Option<BorrowedFd<'_>>,
    stderr: Option<BorrowedFd<'_>>,
) -> Result<(String, UnixStream), String> {
    if stdout.is_none() && stderr.is_none() {
        return Err("nothing to hand over".into());
    }
    let stream = UnixStream::connect(fds_socket)
        .map_err(|e| format!("connecting to {}: {e}", fds_socket.display()))?;
    let token = format!("{:032x}", u128::from_le_bytes(random_bytes()?));
    send(&stream, &token, stdout, stderr)?;
    Ok((token, stream))
}

/// 16 bytes straight from the kernel (one getrandom(2)): `rand::random` would first seed
/// a ChaCha generator, whose CPU feature probe (CPUID, a trap into the hypervisor on a VM)
/// costs a short-lived CLI more than the bytes, and `rand`'s OsRng, in the statically
/// linked CLI, cannot find glibc's getrandom and reads /dev/random and /dev/urandom.
fn random_bytes() -> Result<[u8; 16], String> {
    let mut bytes = [0u8; 16];
    // SAFETY: the kernel writes at most `bytes.len()` bytes into `bytes`. (Up to 256 bytes
    // come whole once the kernel's pool is ready, which it is long before a user runs.)
    let n = unsafe { nix::libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    match usize::try_from(n) {
        Ok(got) if got == bytes.len() => Ok(bytes),
        Ok(got) => Err(format!(
            "the kernel gave {got} random bytes of 16 (getrandom)"
        )),
        Err(_) => Err(format!(
            "no random token from the kernel (getrandom): {}",
            std::io::Error::last_os_error()
        )),
    }
}

/// The client's message on `stream`: `token`, which streams follow, and their descriptors.
fn send(
    stream: &UnixStream,
    token: &str,
    stdout: Option<BorrowedFd<'_>>,
    stderr: Option<BorrowedFd<'_>>,
) -> Result<(), String> {
    let mut message = token.as_bytes().to_vec();
    message.push(u8::from(stdout.is_some()) | (u8::from(stderr.is_some()) << 1));
    let fds: Vec<RawFd> = [stdout, stderr]
        .into_iter()
        .flatten()
        .map(|fd| fd.as_raw_fd())
        .collect();
    crate::fds::send(stream.as_raw_fd(), &message, &fds, MsgFlags::empty())
        .map(|_| ())
        .map_err(|e| format!("handing over the descriptors: {e}"))
}

/// Daemon side: what clients handed over, by token.
#[derive(Default)]
pub struct Handed {
    map: Mutex<HashMap<String, (Instant, DirectOutput)>>,
    /// Told whenever something is handed over.
    arrived: tokio::sync::Notify,
}

impl Handed {
    /// Takes what was handed under `token` (once).
    pub fn take(&self, token: &str) -> Option<DirectOutput> {
        if token.is_empty() {
            return None;
        }
        let mut map = self.map.lock().ok()?;
        map.remove(token).map(|(_, d)| d)
    }

    /// Takes what was handed under `token`, waiting up to `within` for it to arrive: its
    /// client sends it before its Run request, but on another connection.
    pub async fn take_within(&self, token: &str, within: Duration) -> Option<DirectOutput> {
        if token.is_empty() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Listening before looking, so that an arrival in between is not missed.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(out) = self.take(token) {
                return Some(out);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.take(token);
            }
        }
    }

    /// Drops what was handed under `token`, if no run took it (its client has gone).
    pub fn forget(&self, token: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(token);
        }
    }

    fn put(&self, token: String, out: DirectOutput) {
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, (at, _)| at.elapsed() < KEEP_FOR);
            map.insert(token, (Instant::now(), out));
        }
        self.arrived.notify_waiters();
    }

    /// Keeps what one client's message hands over: `bytes` (the token and which streams
    /// follow) with the descriptors `fds` that came with them; answers the token. The
    /// caller acknowledges it (`k`) once this succeeds.
    pub fn accept(&self, bytes: &[u8], fds: Vec<OwnedFd>) -> Result<String, String> {
        if bytes.len() != MESSAGE_LEN || !bytes[..TOKEN_LEN].iter().all(u8::is_ascii_hexdigit) {
            return Err("a malformed descriptor message".into());
        }
        let mask = bytes[TOKEN_LEN];
        let wanted = usize::from(mask & 1 != 0) + usize::from(mask & 2 != 0);
        if wanted == 0 || fds.len() != wanted {
            return Err(format!(
                "a descriptor message said {wanted} descriptors and carried {}",
                fds.len()
            ));
        }
        let mut fds = fds.into_iter().map(Arc::new);
        let out = DirectOutput {
            stdout: if mask & 1 != 0 { fds.next() } else { None },
            stderr: if mask & 2 != 0 { fds.next() } else { None },
        };
        let token = String::from_utf8_lossy(&bytes[..TOKEN_LEN]).into_owned();
        self.put(token.clone(), out);
        Ok(token)
    }

    /// Takes one client's message on `stream` within [`RECEIVE_WITHIN`] and acknowledges
    /// it; answers its token. (On the runtime's own socket: no thread is given to a client
    /// that connects and says nothing.)
    pub async fn receive(&self, stream: &mut tokio::net::UnixStream) -> Result<String, String> {
        self.receive_within(stream, RECEIVE_WITHIN).await
    }

    async fn receive_within(
        &self,
        stream: &mut tokio::net::UnixStream,
        within: Duration,
    ) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        let mut buf = [0u8; MESSAGE_LEN + 1];
        let (len, fds) = tokio::time::timeout(within, crate::fds::receive_from(stream, &mut buf))
            .await
            .map_err(|_| "no descriptor message in time".to_string())?
            .map_err(|e| format!("receiving descriptors: {e}"))?;
        let token = self.accept(&buf[..len], fds)?;
        stream
            .write_all(b"k")
            .await
            .map_err(|e| format!("acknowledging descriptors: {e}"))?;
        Ok(token)
    }
}

/// A run's output written into a descriptor its client handed over, by the daemon itself
/// (for a command that runs elsewhere, whose output the daemon receives): from a blocking
/// task of its own, since a handed pipe or terminal may block on a slow reader, and it is
/// never made non-blocking (the client and whatever else shares it would see that too).
/// Bounded: a slow reader makes [`Sink::write`] wait, as a pipe slows a command.
pub struct Sink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Sink {
    /// Starts writing into `fd`.
    pub fn start(fd: Arc<OwnedFd>) -> Sink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        let writer = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            while let Some(bytes) = rx.blocking_recv() {
                crate::fds::write_all(fd.as_fd(), &bytes)?;
            }
            Ok(())
        });
        Sink { tx, writer }
    }

    /// Passes `bytes` on; false once writing has failed (the descriptor's reader has gone:
    /// a broken pipe), after which nothing more is written.
    pub async fn write(&self, bytes: Vec<u8>) -> bool {
        self.tx.send(bytes).await.is_ok()
    }

    /// Waits until everything passed on is written; answers the write's error, if any.
    pub async fn finish(self) -> std::io::Result<()> {
        drop(self.tx);
        self.writer.await.map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn tokens_are_random() {
        let (a, b) = (random_bytes().expect("a"), random_bytes().expect("b"));
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 16]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_writes_everything_in_order_even_into_a_non_blocking_pipe() {
        let (mut read_end, write_end) = std::io::pipe().expect("pipe");
        // Non-blocking, as a client's stdout may be: a full pipe answers EAGAIN.
        let fd = OwnedFd::from(write_end);
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("O_NONBLOCK");
        let sink = Sink::start(Arc::new(fd));
        // A slow reader: 8 MiB against a 64 KiB pipe.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut got = Vec::new();
            read_end.read_to_end(&mut got).expect("read");
            got
        });
        let mut sent = Vec::new();
        for i in 0..128u32 {
            let chunk: Vec<u8> = (0..65536u32).map(|j| (i ^ j) as u8).collect();
            sent.extend_from_slice(&chunk);
            assert!(sink.write(chunk).await, "chunk {i} refused");
        }
        sink.finish().await.expect("finished without an error");
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes came out of order or changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_whose_reader_has_gone_says_so() {
        let (read_end, write_end) = std::io::pipe().expect("pipe");
        drop(read_end);
        let sink = Sink::start(Arc::new(OwnedFd::from(write_end)));
        // The first write fails (EPIPE: this process ignores SIGPIPE, as Rust programs do);
        // the writer then stops taking chunks.
        let mut refused = false;
        for _ in 0..100 {
            if !sink.write(vec![b'x'; 1024]).await {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            refused,
            "writes into a pipe without a reader kept being taken"
        );
        let err = sink.finish().await.expect_err("a broken pipe");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }

    /// The daemon's end of a socket pair, on the runtime.
    fn daemon_end(s: UnixStream) -> tokio::net::UnixStream {
        s.set_nonblocking(true).expect("non-blocking");
        tokio::net::UnixStream::from_std(s).expect("tokio")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn descriptors_handed_over_are_taken_once_by_token() {
        let (client, daemon) = UnixStream::pair().expect("pair");
        let mut daemon = daemon_end(daemon);
        let handed = Arc::new(Handed::default());
        let (mut read_end, write_end) = std::io::pipe().expect("pipe");
        // The client side of `hand_over`, on the pair instead of a named socket.
        let token = format!("{:032x}", 7u128);
        send(&client, &token, Some(write_end.as_fd()), None).expect("send");
        drop(write_end);
        assert_eq!(handed.receive(&mut daemon).await.expect("received"), token);
        let mut ack = [0u8; 1];
        (&client).read_exact(&mut ack).expect("ack");
        assert_eq!(&ack, b"k");
        let out = handed.take(&token).expect("held");
        assert!(out.stderr.is_none());
        let fd = out.stdout.expect("stdout");
        nix::unistd::write(fd.as_fd(), b"through the handed pipe").expect("write");
        drop(fd);
        let mut got = String::new();
        read_end.read_to_string(&mut got).expect("read");
        assert_eq!(got, "through the handed pipe");
        assert!(handed.take(&token).is_none(), "taken once");
        assert!(handed.take("").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_waits_for_descriptors_that_arrive_after_its_request() {
        let (client, daemon) = UnixStream::pair().expect("pair");
        let mut daemon = daemon_end(daemon);
        let handed = Arc::new(Handed::default());
        let token = format!("{:032x}", 11u128);
        let waiting = {
            let (handed, token) = (handed.clone(), token.clone());
            tokio::spawn(async move { handed.take_within(&token, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_read_end, write_end) = std::io::pipe().expect("pipe");
        send(&client, &token, Some(write_end.as_fd()), None).expect("send");
        assert_eq!(handed.receive(&mut daemon).await.expect("received"), token);
        let got = waiting.await.expect("joined").expect("taken once it came");
        assert!(got.stdout.is_some());
        // Never handed: given up on after the wait.
        let started = std::time::Instant::now();
        assert!(
            handed
                .take_within(&format!("{:032x}", 12u128), Duration::from_millis(100))
                .await
                .is_none()
        );
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_that_does_not_match_its_descriptors_is_refused() {
        let (client, daemon) = UnixStream::pair().expect("pair");
        let mut daemon = daemon_end(daemon);
        let mut message = format!("{:032x}", 9u128).into_bytes();
        message.push(3);
        crate::fds::send(client.as_raw_fd(), &message, &[], MsgFlags::empty()).expect("send");
        let handed = Handed::default();
        let err = handed.receive(&mut daemon).await.expect_err("refused");
        assert!(err.contains("said 2 descriptors and carried 0"), "{err}");
        // Nothing acknowledged.
        client.set_nonblocking(true).expect("non-blocking");
        let mut ack = [0u8; 1];
        assert!(
            (&client)
                .read(&mut ack)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_says_nothing_is_let_go() {
        let (_client, daemon) = UnixStream::pair().expect("pair");
        let mut daemon = daemon_end(daemon);
        let err = Handed::default()
            .receive_within(&mut daemon, Duration::from_millis(50))
            .await
            .expect_err("timed out");
        assert!(err.contains("in time"), "{err}");
    }
}
