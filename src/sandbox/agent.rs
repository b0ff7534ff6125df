//! A local sandbox's resident agent: one small process per sandbox, started once inside the
//! sandbox's jail and cgroup, that starts the sandbox's commands (posix_spawn; fork and exec
//! for one on a terminal) when the daemon asks, as Daytona's toolbox daemon does inside its
//! sandboxes.
//!
//! Why: a command started by the daemon itself paid, every time, a fork of the whole daemon,
//! a move into the sandbox's cgroup (on cgroup v1 the kernel waits for an RCU grace period:
//! 5-15 ms after any idle moment) and a bubblewrap start (3.4 ms of namespaces and mounts).
//! Forked by the agent, a command is born inside all of them.
//!
//! The agent is the daemon's own binary (`crabboxd --sandbox-agent CONTROL EXE`), executed
//! through a descriptor (`/proc/self/fd/EXE`), so it needs no path inside the jail. It
//! talks to the daemon over a Unix stream socket (descriptor CONTROL) in frames: a u32
//! length (little-endian) and a JSON message; a `Start` carries the command's stdin, stdout
//! and stderr as SCM_RIGHTS on its first byte, or asks for a terminal, which the agent opens
//! inside the sandbox and hands back (its master) on the first byte of its `Started`. Each
//! command runs as the leader of a session (and process group) of its own, with its
//! terminal, if any, as its controlling one;
//! `Signal` reaches its whole group. The agent ends when the daemon closes the socket or
//! goes away (SIGTERM through its parent-death signal), ending every group it started
//! first; in a jail its PID namespace ends everything else with it.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::MsgFlags;
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// The daemon binary's first argument that makes it an agent.
pub const AGENT_FLAG: &str = "--sandbox-agent";

/// The largest frame either side accepts (a command line and its environment are bounded by
/// the kernel's own limits well below this).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The daemon's word to the agent.
#[derive(Debug, Serialize, Deserialize)]
enum ToAgent {
    /// Run `/bin/sh -c command` in `cwd` with exactly `env`. Without `terminal`, three
    /// descriptors (stdin, stdout, stderr) come with it. With `terminal` (rows, columns),
    /// none: the agent opens a new terminal of that size from the sandbox's own
    /// `/dev/ptmx`, makes it the command's controlling terminal and stdio, and hands its
    /// other end back with `Started`. (Opened there, the terminal is one of the sandbox's:
    /// in a jail, whose `/dev/pts` is a devpts of its own, `ttyname` finds it.)
    Start {
        id: u64,
        command: String,
        env: Vec<(String, String)>,
        cwd: Vec<u8>,
        terminal: Option<(u16, u16)>,
        /// When the leader ends, the agent kills what is left of its process group before
        /// it says `Exited`, and forgets the command (no `Forget` follows): for a command
        /// whose output went straight to a client, which a background job must not hold.
        #[serde(default)]
        end_group: bool,
    },
    /// Send `signal` to the command's process group.
    Signal { id: u64, signal: i32 },
    /// The daemon is done with the command (it has been waited for).
    Forget { id: u64 },
}

/// The agent's word to the daemon.
#[derive(Debug, Serialize, Deserialize)]
enum FromAgent {
    /// With `terminal`, the terminal's other end (its master) comes with it.
    Started {
        id: u64,
        terminal: bool,
    },
    Failed {
        id: u64,
        error: String,
    },
    /// The command's leader ended; `status` is the raw wait status.
    Exited {
        id: u64,
        status: i32,
    },
}

// ---------------------------------------------------------------------------------------
// Framing (both sides)

fn frame<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(
        &u32::try_from(body.len())
            .map_err(io::Error::other)?
            .to_le_bytes(),
    );
    out.extend_from_slice(&body);
    Ok(out)
}

fn unframe<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn frame_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    Ok(len)
}

// ---------------------------------------------------------------------------------------
// The daemon's side

/// How the agent is to be started: its jail (none: unjailed) and the cgroups it joins
/// before it starts (its commands inherit them).
pub struct AgentSpec<'a> {
    pub jail: Option<&'a super::jail::Jail>,
    pub cgroup_procs: &'a [std::path::PathBuf],
    /// The sandbox folder, where the jail starts.
    pub dir: &'a Path,
}

/// A running agent. Dropping it ends the agent, and with it every command it started.
pub struct Agent {
    /// The end of what it said on stderr.
    said: Arc<Mutex<String>>,
    /// The socket's writing half (its reading half is the reader task's).
    stream: tokio::net::unix::OwnedWriteHalf,
    /// One frame at a time.
    writing: tokio::sync::Mutex<()>,
    waiters: Arc<Mutex<HashMap<u64, Waiter>>>,
    next: AtomicU64,
    alive: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    _process: tokio::process::Child,
}

enum Waiter {
    /// Waiting for `Started` (with the terminal's master, for a command on one) or
    /// `Failed`.
    Starting(
        oneshot::Sender<Result<Option<OwnedFd>, String>>,
        oneshot::Sender<i32>,
    ),
    /// Started; waiting for `Exited`.
    Running(oneshot::Sender<i32>),
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("alive", &self.alive.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.reader.abort();
        // The process is killed on drop (kill_on_drop): in a jail its PID namespace ends
        // with it.
    }
}

/// A command the agent started.
pub struct AgentChild {
    agent: Arc<Agent>,
    id: u64,
    exited: Option<oneshot::Receiver<i32>>,
    status: Option<std::process::ExitStatus>,
    /// Started with `end_group`: once it has exited, the agent has ended its group and
    /// forgotten it (nothing more to tell it).
    end_group: bool,
}

/// The agent's program: `crabboxd` itself, or (a daemon embedded in another program, as the
/// tests embed it) the `crabboxd` beside that program or one folder up (cargo's
/// `target/<profile>/deps/..`). None: there is none to be found; commands are then started
/// by the daemon itself.
pub fn program() -> Option<&'static Path> {
    static PROGRAM: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    PROGRAM
        .get_or_init(|| {
            let me = std::env::current_exe().ok()?;
            if me.file_name() == Some(OsStr::new("crabboxd")) {
                return Some("/proc/self/exe".into());
            }
            let dir = me.parent()?;
            [dir.join("crabboxd"), dir.parent()?.join("crabboxd")]
                .into_iter()
                .find(|p| p.is_file())
        })
        .as_deref()
}

impl Agent {
    /// Starts an agent as `spec` says, from `program` ([`program`]).
    pub fn spawn(program: &Path, spec: &AgentSpec<'_>) -> io::Result<Arc<Agent>> {
        let (mine, theirs) = StdUnixStream::pair()?;
        let exe = std::fs::File::open(program)?;
        let exe_fd = exe.as_raw_fd();
        let control_fd = theirs.as_raw_fd();
        let program = format!("/proc/self/fd/{exe_fd}");
        let (control_arg, exe_arg) = (control_fd.to_string(), exe_fd.to_string());
        let mut cmd = super::jail::jailed_command(
            spec.jail,
            spec.cgroup_procs,
            spec.dir,
            false,
            &[
                OsStr::new(&program),
                OsStr::new(AGENT_FLAG),
                OsStr::new(&control_arg),
                OsStr::new(&exe_arg),
            ],
        )?;
        cmd.env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // The two descriptors go through exec (both are close-on-exec here); the agent
        // closes the binary's once it runs. Unjailed, the agent is told of the daemon's
        // end by SIGTERM and ends its commands (jailed, bubblewrap ends them all).
        let jailed = spec.jail.is_some();
        // SAFETY: fcntl and prctl are async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [control_fd, exe_fd] {
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if !jailed
                    && nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM, 0, 0, 0)
                        != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = cmd.spawn()?;
        drop(theirs);
        // What the agent (or bubblewrap, setting up the jail) says on stderr: the end of it
        // goes into the error of a command it could not run.
        let said: Arc<Mutex<String>> = Arc::default();
        if let Some(mut stderr) = process.stderr.take() {
            let said = said.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    tracing::warn!(said = %text.trim_end(), "a sandbox agent");
                    if let Ok(mut s) = said.lock() {
                        s.push_str(&text);
                        if s.len() > 2048 {
                            let cut = s.len() - 2048;
                            let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                            s.drain(..cut);
                        }
                    }
                }
            });
        }
        drop(exe);
        mine.set_nonblocking(true)?;
        let (read, write) = UnixStream::from_std(mine)?.into_split();
        let waiters: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let reader = {
            let (waiters, alive) = (waiters.clone(), alive.clone());
            tokio::spawn(async move {
                let why = read_answers(read, &waiters).await;
                alive.store(false, Ordering::SeqCst);
                tracing::debug!(error = %why, "a sandbox agent ended");
                // Everyone still waiting learns that the agent is gone (their senders go).
                if let Ok(mut map) = waiters.lock() {
                    map.clear();
                }
            })
        };
        Ok(Arc::new(Agent {
            said,
            stream: write,
            writing: tokio::sync::Mutex::new(()),
            waiters,
            next: AtomicU64::new(1),
            alive,
            reader,
            _process: process,
        }))
    }

    /// Is the agent still there to start commands?
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Starts `/bin/sh -c command` with exactly `env`, in `cwd`, on the three descriptors.
    /// With `end_group`, the agent kills what is left of the command's process group the
    /// moment its leader ends, before the exit is told (one message fewer on the way to
    /// the exit, and no window in which the exit is known and a background job still
    /// holds the descriptors).
    pub async fn start(
        self: &Arc<Self>,
        command: &str,
        env: Vec<(String, String)>,
        cwd: &Path,
        stdio: [BorrowedFd<'_>; 3],
        end_group: bool,
    ) -> io::Result<AgentChild> {
        let fds = stdio.map(|fd| fd.as_raw_fd());
        let (child, _) = self.begin(command, env, cwd, None, &fds, end_group).await?;
        Ok(child)
    }

    /// Starts `/bin/sh -c command` as [`Agent::start`] does, on a new terminal of `rows` x
    /// `cols` that the agent opens inside the sandbox; answers the terminal's master too
    /// (non-blocking), through which the command is read, typed to and resized.
    pub async fn start_on_terminal(
        self: &Arc<Self>,
        command: &str,
        env: Vec<(String, String)>,
        cwd: &Path,
        (rows, cols): (u16, u16),
    ) -> io::Result<(AgentChild, OwnedFd)> {
        let (child, master) = self
            .begin(command, env, cwd, Some((rows, cols)), &[], false)
            .await?;
        let master = master.ok_or_else(|| {
            io::Error::other(
                "the sandbox's agent started a command on a terminal without its terminal",
            )
        })?;
        if !nix::unistd::isatty(&master).unwrap_or(false) {
            return Err(io::Error::other(
                "the sandbox's agent handed back something that is not a terminal",
            ));
        }
        let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)?;
        nix::fcntl::fcntl(
            &master,
            nix::fcntl::FcntlArg::F_SETFL(
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK,
            ),
        )?;
        Ok((child, master))
    }

    async fn begin(
        self: &Arc<Self>,
        command: &str,
        env: Vec<(String, String)>,
        cwd: &Path,
        terminal: Option<(u16, u16)>,
        fds: &[RawFd],
        end_group: bool,
    ) -> io::Result<(AgentChild, Option<OwnedFd>)> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.waiters
            .lock()
            .map_err(|_| io::Error::other("agent state poisoned"))?
            .insert(id, Waiter::Starting(started_tx, exited_tx));
        let bytes = frame(&ToAgent::Start {
            id,
            command: command.to_string(),
            env,
            cwd: cwd.as_os_str().as_bytes().to_vec(),
            terminal,
            end_group,
        })?;
        let sent = self.send(&bytes, fds).await;
        let child = AgentChild {
            agent: self.clone(),
            id,
            exited: Some(exited_rx),
            status: None,
            end_group,
        };
        sent?;
        match started_rx.await {
            Ok(Ok(master)) => Ok((child, master)),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(self.gone()),
        }
    }

    /// Sends one frame, `fds` on its first byte.
    async fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if !self.is_alive() {
            return Err(self.gone());
        }
        let _one = self.writing.lock().await;
        let mut at = 0;
        let stream: &UnixStream = self.stream.as_ref();
        while at < bytes.len() {
            stream.writable().await?;
            let rest = &bytes[at..];
            let attached = if at == 0 { fds } else { &[] };
            let n = stream.try_io(Interest::WRITABLE, || {
                crate::fds::send(stream.as_raw_fd(), rest, attached, MsgFlags::MSG_NOSIGNAL)
                    .map_err(io::Error::from)
            });
            match n {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Tells the agent something that needs no answer; a gone agent is no error here.
    fn tell(self: &Arc<Self>, message: ToAgent) {
        let agent = self.clone();
        if let Ok(bytes) = frame(&message) {
            tokio::spawn(async move {
                let _ = agent.send(&bytes, &[]).await;
            });
        }
    }
}

impl Agent {
    /// The error for a command the agent is no longer there for, with what it said last.
    fn gone(&self) -> io::Error {
        let said = self
            .said
            .lock()
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut message =
            "the sandbox's agent has ended (the next command starts a new one)".to_string();
        if !said.is_empty() {
            message.push_str(": it said: ");
            message.push_str(&said);
        }
        io::Error::new(io::ErrorKind::BrokenPipe, message)
    }
}

/// Reads the agent's answers until it goes; answers why.
async fn read_answers(
    stream: tokio::net::unix::OwnedReadHalf,
    waiters: &Mutex<HashMap<u64, Waiter>>,
) -> io::Error {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    // Terminals handed back, in the order of the `Started` answers they came with.
    let mut terminals: std::collections::VecDeque<OwnedFd> = Default::default();
    loop {
        // Whole frames first.
        while buf.len() >= 4 {
            let len = match frame_len([buf[0], buf[1], buf[2], buf[3]]) {
                Ok(l) => l,
                Err(e) => return e,
            };
            if buf.len() < 4 + len {
                break;
            }
            let message: io::Result<FromAgent> = unframe(&buf[4..4 + len]);
            buf.drain(..4 + len);
            let Ok(mut map) = waiters.lock() else {
                return io::Error::other("agent state poisoned");
            };
            match message {
                Ok(FromAgent::Started { id, terminal }) => {
                    let master = if terminal {
                        match terminals.pop_front() {
                            Some(fd) => Some(fd),
                            None => {
                                return io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "a command started on a terminal came without it",
                                );
                            }
                        }
                    } else {
                        None
                    };
                    if let Some(Waiter::Starting(started, exited)) = map.remove(&id) {
                        let _ = started.send(Ok(master));
                        map.insert(id, Waiter::Running(exited));
                    }
                }
                Ok(FromAgent::Failed { id, error }) => {
                    if let Some(Waiter::Starting(started, _)) = map.remove(&id) {
                        let _ = started.send(Err(error));
                    }
                }
                Ok(FromAgent::Exited { id, status }) => match map.remove(&id) {
                    Some(Waiter::Running(exited)) | Some(Waiter::Starting(_, exited)) => {
                        let _ = exited.send(status);
                    }
                    None => {}
                },
                Err(e) => return e,
            }
        }
        match crate::fds::receive_from(stream.as_ref(), &mut chunk).await {
            Ok((0, _)) => {
                return io::Error::new(io::ErrorKind::UnexpectedEof, "the agent closed");
            }
            Ok((n, fds)) => {
                buf.extend_from_slice(&chunk[..n]);
                terminals.extend(fds);
            }
            Err(e) => return e,
        }
    }
}

impl AgentChild {
    /// Waits for the command's leader to end.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(s) = self.status {
            return Ok(s);
        }
        let Some(rx) = self.exited.as_mut() else {
            return Err(self.agent.gone());
        };
        let raw = rx.await.map_err(|_| self.agent.gone())?;
        self.exited = None;
        let status = std::process::ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(status)
    }

    /// Sends `signal` to the command's process group (nothing when it is all gone).
    pub fn signal(&self, signal: Signal) {
        self.agent.tell(ToAgent::Signal {
            id: self.id,
            signal: signal as i32,
        });
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        if let Ok(mut map) = self.agent.waiters.lock() {
            map.remove(&self.id);
        }
        // One started with `end_group` and seen to exit is forgotten by the agent already.
        if !(self.end_group && self.status.is_some()) {
            self.agent.tell(ToAgent::Forget { id: self.id });
        }
    }
}

// ---------------------------------------------------------------------------------------
// The agent's side

/// When `args` (the process's arguments after the program) ask for the agent, runs it and
/// never returns; otherwise returns at once. Called first thing in `crabboxd`'s main.
pub fn run_if_asked() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().map(|a| a.as_os_str()) != Some(OsStr::new(AGENT_FLAG)) {
        return;
    }
    let fd = |i: usize| -> Option<RawFd> { args.get(i)?.to_str()?.parse().ok() };
    let (Some(control), Some(exe)) = (fd(1), fd(2)) else {
        eprintln!("crabboxd {AGENT_FLAG}: expected CONTROL and EXE descriptors");
        std::process::exit(2);
    };
    // Executed through a descriptor, the process would be named after its number.
    // SAFETY: prctl with a NUL-terminated name of at most 16 bytes.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_NAME, c"crabbox-agent".as_ptr(), 0, 0, 0);
    }
    // SAFETY: both were handed to this process at exec for it alone.
    drop(unsafe { OwnedFd::from_raw_fd(exe) });
    let control = unsafe { OwnedFd::from_raw_fd(control) };
    // The commands get their three descriptors and nothing else: not the control socket
    // (which came through exec), nor whatever the daemon's own starter left open.
    if let Err(e) = crate::fds::close_on_exec_from_3() {
        eprintln!("crabboxd {AGENT_FLAG}: cannot keep descriptors from the commands: {e}");
        std::process::exit(1);
    }
    let code = match serve(control) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("crabboxd {AGENT_FLAG}: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// One command the agent started.
struct Started {
    /// Its pid, which is also its process group's (and session's) id.
    pid: nix::unistd::Pid,
    exited: bool,
    /// Kill what is left of the group when the leader ends, and forget it then.
    end_group: bool,
}

/// The agent's loop: requests from `control`, children's ends from SIGCHLD.
fn serve(control: OwnedFd) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    // Become the reaper of what the commands leave behind (their orphans).
    // SAFETY: prctl with constant arguments.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block().map_err(io::Error::from)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(io::Error::from)?;
    let mut children: HashMap<u64, Started> = HashMap::new();
    let mut inbox: Vec<u8> = Vec::new();
    let mut fds_in: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let result = loop {
        let mut polled = [
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut polled, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(io::Error::from(e)),
        }
        let control_ready = polled[0].revents().is_some_and(|r| !r.is_empty());
        let signal_ready = polled[1].revents().is_some_and(|r| !r.is_empty());
        if signal_ready {
            let mut stop = false;
            while let Ok(Some(info)) = signals.read_signal() {
                if info.ssi_signo != Signal::SIGCHLD as u32 {
                    stop = true;
                }
            }
            if let Err(e) = reap(&control, &mut children) {
                break Err(e);
            }
            if stop {
                break Ok(());
            }
        }
        if control_ready {
            match receive(&control, &mut chunk, &mut inbox, &mut fds_in) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
            while let Some((message, fds)) = next_request(&mut inbox, &mut fds_in)? {
                handle(&control, message, fds, &mut children)?;
            }
        }
    };
    // The daemon is done (or gone): nothing the agent started outlives it.
    for c in children.values() {
        let _ = nix::sys::signal::killpg(c.pid, Signal::SIGKILL);
    }
    result
}

/// Reads what is there on `control` into `inbox` (descriptors into `fds`), through
/// `chunk`; false at its end.
fn receive(
    control: &OwnedFd,
    chunk: &mut [u8],
    inbox: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<bool> {
    let (n, got) = match crate::fds::receive(control.as_raw_fd(), chunk, MsgFlags::MSG_DONTWAIT) {
        Ok(r) => r,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(true),
        Err(e) => return Err(io::Error::from(e)),
    };
    if n == 0 {
        return Ok(false);
    }
    inbox.extend_from_slice(&chunk[..n]);
    fds.extend(got);
    Ok(true)
}

/// The next whole request in `inbox`, with the descriptors it carries.
fn next_request(
    inbox: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Option<(ToAgent, Vec<OwnedFd>)>> {
    if inbox.len() < 4 {
        return Ok(None);
    }
    let len = frame_len([inbox[0], inbox[1], inbox[2], inbox[3]])?;
    if inbox.len() < 4 + len {
        return Ok(None);
    }
    let message: ToAgent = unframe(&inbox[4..4 + len])?;
    inbox.drain(..4 + len);
    let mine = match &message {
        ToAgent::Start { terminal: None, .. } if fds.len() >= 3 => fds.drain(..3).collect(),
        _ => Vec::new(),
    };
    Ok(Some((message, mine)))
}

fn answer(control: &OwnedFd, message: &FromAgent) -> io::Result<()> {
    answer_with(control, message, None)
}

/// Answers `message`, `fd` attached to its first byte.
fn answer_with(control: &OwnedFd, message: &FromAgent, fd: Option<&OwnedFd>) -> io::Result<()> {
    let bytes = frame(message)?;
    // Blocking writes: the daemon reads its answers all the time.
    crate::fds::write_all_with(control.as_fd(), &bytes, fd.map(AsFd::as_fd))
}

fn handle(
    control: &OwnedFd,
    message: ToAgent,
    fds: Vec<OwnedFd>,
    children: &mut HashMap<u64, Started>,
) -> io::Result<()> {
    match message {
        ToAgent::Start {
            id,
            command,
            env,
            cwd,
            terminal,
            end_group,
        } => match start_with(&command, &env, &cwd, fds, terminal) {
            Ok((pid, master)) => {
                children.insert(
                    id,
                    Started {
                        pid,
                        exited: false,
                        end_group,
                    },
                );
                let terminal = master.is_some();
                answer_with(
                    control,
                    &FromAgent::Started { id, terminal },
                    master.as_ref(),
                )
            }
            Err(e) => answer(
                control,
                &FromAgent::Failed {
                    id,
                    error: e.to_string(),
                },
            ),
        },
        ToAgent::Signal { id, signal } => {
            if let (Some(c), Ok(signal)) = (children.get(&id), Signal::try_from(signal)) {
                // ESRCH: the group is all gone already.
                let _ = nix::sys::signal::killpg(c.pid, signal);
            }
            Ok(())
        }
        ToAgent::Forget { id } => {
            // A command forgotten before its end is still reaped (reap() tells no one).
            children.remove(&id);
            Ok(())
        }
    }
}

/// Reaps every child that has ended, telling the daemon of the commands it waits for.
fn reap(control: &OwnedFd, children: &mut HashMap<u64, Started>) -> io::Result<()> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
            Ok(s) => s,
        };
        let (pid, raw) = match status {
            WaitStatus::Exited(pid, code) => (pid, (code & 0xff) << 8),
            WaitStatus::Signaled(pid, signal, core) => {
                (pid, signal as i32 | if core { 0x80 } else { 0 })
            }
            _ => continue,
        };
        if let Some((id, c)) = children.iter_mut().find(|(_, c)| c.pid == pid && !c.exited) {
            c.exited = true;
            let (id, end_group) = (*id, c.end_group);
            if end_group {
                // Before the exit is told: whoever learns of it finds the group gone (its
                // leftovers are this subreaper's to reap, later).
                let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
                children.remove(&id);
            }
            answer(control, &FromAgent::Exited { id, status: raw })?;
        }
    }
}

/// Starts one command on `fds`, or on a new terminal of the `terminal` size opened here;
/// answers its pid and the terminal's master.
fn start_with(
    command: &str,
    env: &[(String, String)],
    cwd: &[u8],
    fds: Vec<OwnedFd>,
    terminal: Option<(u16, u16)>,
) -> io::Result<(nix::unistd::Pid, Option<OwnedFd>)> {
    let Some((rows, cols)) = terminal else {
        return Ok((start(command, env, cwd, &fds, false)?, None));
    };
    let (master, terminal) = open_terminal(rows, cols)?;
    let pid = start(
        command,
        env,
        cwd,
        &[terminal.try_clone()?, terminal.try_clone()?, terminal],
        true,
    )?;
    // The command's end is closed here once it has it, so that reading the master ends
    // (EIO) when the last process holding the terminal is gone.
    Ok((pid, Some(master)))
}

/// A new terminal from this sandbox's `/dev/ptmx`, `rows` x `cols`: (master, terminal).
fn open_terminal(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| io::Error::other(format!("opening a terminal (/dev/ptmx): {e}")))?;
    nix::pty::grantpt(&master).map_err(io::Error::from)?;
    nix::pty::unlockpt(&master).map_err(io::Error::from)?;
    let name = nix::pty::ptsname_r(&master).map_err(io::Error::from)?;
    let terminal: OwnedFd = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| io::Error::other(format!("opening the terminal {name}: {e}")))?;
    let size = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    if unsafe { nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((master.into(), terminal))
}

/// Starts one command ([`spawn_plain`], else fork and exec); answers its pid once it runs
/// (a working folder it cannot enter ends it with 1, a failed exec with 127, each with a
/// line on its stderr, as a shell does).
fn start(
    command: &str,
    env: &[(String, String)],
    cwd: &[u8],
    fds: &[OwnedFd],
    tty: bool,
) -> io::Result<nix::unistd::Pid> {
    let [stdin, stdout, stderr] = fds else {
        return Err(io::Error::other("a start without its three descriptors"));
    };
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::other("a NUL byte in a command"));
    let program = c(b"/bin/sh")?;
    let argv = [c(b"sh")?, c(b"-c")?, c(command.as_bytes())?];
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| c(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let cwd = c(cwd)?;
    let cd_failed = format!(
        "crabbox: cannot enter the working folder {}\n",
        String::from_utf8_lossy(cwd.as_bytes())
    );
    let exec_failed = b"crabbox: cannot start /bin/sh in the sandbox\n";
    let argv_p: [*const nix::libc::c_char; 4] = [
        argv[0].as_ptr(),
        argv[1].as_ptr(),
        argv[2].as_ptr(),
        std::ptr::null(),
    ];
    let envp_p: Vec<*const nix::libc::c_char> = envp
        .iter()
        .map(|v| v.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let (i, o, e) = (stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd());
    // Without a terminal to make its own, as posix_spawn does it (vfork-like: no copy of the
    // agent's memory, 0.2 ms per command here); should that fail (no such folder, no
    // /bin/sh), the fork below does it again and says what failed on the command's stderr.
    if !tty && let Some(pid) = spawn_plain(&program, &argv_p, &envp_p, &cwd, [i, o, e]) {
        return Ok(pid);
    }
    // SAFETY: the agent has one thread; the child only calls async-signal-safe functions
    // on memory prepared above, then execs or exits.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => unsafe {
            use nix::libc;
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Ignored signals stay ignored across exec (the Rust runtime ignores SIGPIPE; a
            // daemon started in the background ignores SIGINT and SIGQUIT).
            super::jail::default_signals();
            libc::setsid();
            // Above 2 first, so that the dup2s below cannot overwrite one another.
            let (i, o, e) = (
                libc::fcntl(i, libc::F_DUPFD_CLOEXEC, 3),
                libc::fcntl(o, libc::F_DUPFD_CLOEXEC, 3),
                libc::fcntl(e, libc::F_DUPFD_CLOEXEC, 3),
            );
            if i < 0 || o < 0 || e < 0 {
                libc::_exit(126);
            }
            libc::dup2(i, 0);
            libc::dup2(o, 1);
            libc::dup2(e, 2);
            if tty {
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                libc::write(2, cd_failed.as_ptr().cast(), cd_failed.len());
                libc::_exit(1);
            }
            libc::execve(program.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            libc::write(2, exec_failed.as_ptr().cast(), exec_failed.len());
            libc::_exit(127);
        },
    }
}

/// Starts `program` as [`start`]'s child does (a session of its own, every signal at its
/// default and unblocked, `fds` as its stdin/stdout/stderr, in `cwd`) through
/// posix_spawn; None when that cannot be done so (descriptors among 0-2, whose dup2s could
/// overwrite one another) or it failed, in which case nothing was started.
fn spawn_plain(
    program: &CString,
    argv: &[*const nix::libc::c_char],
    envp: &[*const nix::libc::c_char],
    cwd: &CString,
    fds: [RawFd; 3],
) -> Option<nix::unistd::Pid> {
    use nix::libc;
    if fds.iter().any(|fd| *fd < 3) {
        return None;
    }
    // SAFETY: the attribute and file-action objects are initialised before use and
    // destroyed once; every pointer handed to posix_spawn (program, argv, envp, cwd) lives
    // across the call, and argv and envp end with a null pointer.
    unsafe {
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        if libc::posix_spawnattr_init(&mut attr) != 0 {
            return None;
        }
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        if libc::posix_spawn_file_actions_init(&mut actions) != 0 {
            libc::posix_spawnattr_destroy(&mut attr);
            return None;
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        // Every signal at its default, as super::jail::default_signals does: ignored ones
        // (SIGPIPE by the Rust runtime, SIGINT and SIGQUIT in a daemon started in the
        // background) are not the command's. The set is written by hand: sigaddset refuses
        // glibc's two internal real-time signals (32, 33), which posix_spawn would
        // otherwise leave ignored in the command.
        const _: () = assert!(std::mem::size_of::<libc::sigset_t>() == 16 * 8);
        let mut words = [0u64; 16];
        for s in 1..=64 {
            if s != libc::SIGKILL && s != libc::SIGSTOP {
                words[(s as usize - 1) / 64] |= 1 << ((s - 1) % 64);
            }
        }
        // SAFETY (of the transmute): glibc's sigset_t is 1024 bits, one per signal from bit
        // 0 (signal 1), as 16 words (checked above).
        let defaults: libc::sigset_t = std::mem::transmute(words);
        let flags = (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short
            | libc::POSIX_SPAWN_SETSID;
        let ready = libc::posix_spawnattr_setflags(&mut attr, flags) == 0
            && libc::posix_spawnattr_setsigmask(&mut attr, &none) == 0
            && libc::posix_spawnattr_setsigdefault(&mut attr, &defaults) == 0
            && fds
                .iter()
                .zip(0..)
                .all(|(fd, to)| libc::posix_spawn_file_actions_adddup2(&mut actions, *fd, to) == 0)
            && libc::posix_spawn_file_actions_addchdir_np(&mut actions, cwd.as_ptr()) == 0;
        let mut pid: libc::pid_t = 0;
        let spawned = ready
            && libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                &actions,
                &attr,
                argv.as_ptr().cast(),
                envp.as_ptr().cast(),
            ) == 0;
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        spawned.then(|| nix::unistd::Pid::from_raw(pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Starts `command` on a fresh stdout/stderr pair in `cwd` (stdin /dev/null), waits for
    /// it; answers its exit code, stdout, stderr and pid.
    fn run(command: &str, cwd: &Path) -> (i32, String, String, i32) {
        let stdin: OwnedFd = std::fs::File::open("/dev/null").expect("null").into();
        let (mut out_r, out_w) = std::io::pipe().expect("pipe");
        let (mut err_r, err_w) = std::io::pipe().expect("pipe");
        let fds = [stdin, out_w.into(), err_w.into()];
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let pid = start(command, &env, cwd.as_os_str().as_bytes(), &fds, false).expect("start");
        drop(fds);
        let (mut out, mut err) = (String::new(), String::new());
        out_r.read_to_string(&mut out).expect("stdout");
        err_r.read_to_string(&mut err).expect("stderr");
        let code = match nix::sys::wait::waitpid(pid, None).expect("wait") {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        };
        (code, out, err, pid.as_raw())
    }

    #[test]
    fn a_command_leads_a_session_of_its_own_with_every_signal_at_its_default() {
        // This test process ignores SIGPIPE (the Rust runtime); the command must not.
        let dir = tempfile::tempdir().expect("tempdir");
        let (code, out, err, pid) = run(
            "echo $$ $(cut -d' ' -f6 /proc/$$/stat) $(pwd); grep -E '^Sig(Ign|Blk)' /proc/$$/status",
            dir.path(),
        );
        assert_eq!(code, 0, "{err}");
        let mut lines = out.lines();
        let first: Vec<&str> = lines.next().expect("a line").split(' ').collect();
        assert_eq!(first[0], pid.to_string(), "{out}");
        assert_eq!(first[1], pid.to_string(), "its own session: {out}");
        let cwd = std::fs::canonicalize(dir.path()).expect("canonical");
        assert_eq!(first[2], cwd.to_string_lossy(), "{out}");
        for line in lines {
            let mask = line.split_whitespace().nth(1).expect("a mask");
            assert!(mask.bytes().all(|b| b == b'0'), "{line}");
        }
    }

    #[test]
    fn a_working_folder_that_cannot_be_entered_is_the_commands_failure_said_on_its_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("gone");
        let (code, out, err, _) = run("echo ran", &gone);
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(out, "");
        assert_eq!(
            err,
            format!(
                "crabbox: cannot enter the working folder {}\n",
                gone.display()
            )
        );
    }
}
