//! Running a command as a real process in its own process group, with its stdout and
//! stderr streamed separately, a timeout and cancellation that end the whole group.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a running command is sent: bytes for its stdin, or (on a terminal) a new window
/// size. The end of the channel is the end of its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Data(Vec<u8>),
    Resize(PtySize),
}

/// A terminal's window size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// A piece of a command's output, in the order it was read from each stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecExit {
    /// The exit code; `128 + n` when killed by signal `n`; 124 on timeout.
    pub code: i32,
    /// The signal's name when a signal ended it.
    pub signal: Option<String>,
    pub timed_out: bool,
    pub cancelled: bool,
}

/// Exit code reported when a command hits its timeout (as coreutils' `timeout` does).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// How long a cancelled or timed-out group gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output may keep flowing after the command exited before the leftovers of its
/// process group (background jobs holding the pipes open) are killed.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Environment variables passed through from the daemon to commands (the rest of its
/// environment, which may hold credentials, is not).
const PASSTHROUGH_ENV: [&str; 9] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TERM", "SHELL",
];

/// A command to run through `/bin/sh -c`.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub command: String,
    /// The working folder: a host path, or with `jail` a path as the sandbox sees it.
    pub cwd: PathBuf,
    /// Added on top of the passed-through variables.
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    /// Run inside a bubblewrap jail ([`Jail`]).
    pub jail: Option<Jail>,
    /// cgroup `cgroup.procs` files the command joins before it starts (its limits:
    /// [`super::cgroup`]); its children inherit them.
    pub cgroup_procs: Vec<PathBuf>,
    /// Run on a new pseudo-terminal of this size (its stdin, stdout and stderr; the output
    /// comes back as one stream, as a terminal shows it) instead of pipes.
    pub tty: Option<PtySize>,
    /// Descriptors the command writes its stdout/stderr to itself (a client's own, see
    /// [`crate::direct`]); those streams then do not come back as output. Not with `tty`.
    pub direct: crate::direct::DirectOutput,
    /// The sandbox's agent, which starts the command inside its jail and cgroups (then
    /// `jail` and `cgroup_procs` are the agent's already and not used again).
    pub agent: Option<std::sync::Arc<super::agent::Agent>>,
}

use super::jail::{Jail, jailed_command};

fn command_for(spec: &ProcessSpec) -> io::Result<tokio::process::Command> {
    let program = [
        OsStr::new("/bin/sh"),
        OsStr::new("-c"),
        OsStr::new(&spec.command),
    ];
    jailed_command(
        spec.jail.as_ref(),
        &spec.cgroup_procs,
        &spec.cwd,
        spec.tty.is_some(),
        &program,
    )
}

/// The command of `spec` (jailed when asked) with its environment: the passed-through
/// variables and `spec.env`, nothing else. Stdio is left to the caller.
pub fn prepared_command(spec: &ProcessSpec) -> io::Result<tokio::process::Command> {
    let mut cmd = command_for(spec)?;
    cmd.env_clear();
    for key in PASSTHROUGH_ENV {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(&spec.env);
    Ok(cmd)
}

/// Runs the command; output goes to `out` as it is read, and what arrives on `input` goes to
/// its stdin (closed when the sender is dropped; without `input` stdin is empty). Ends when
/// the command exits, the timeout passes, or `cancel` fires (the whole process group is
/// then terminated).
pub async fn run(
    spec: &ProcessSpec,
    input: Option<mpsc::Receiver<Input>>,
    out: mpsc::Sender<ExecOutput>,
    cancel: CancellationToken,
) -> io::Result<ExecExit> {
    // Open until the command has ended, also when no stream is read here (both handed to
    // the command directly): whoever reads `out` reads until the end of the command.
    let _open = out.clone();
    let (mut child, pumps) = match (&spec.agent, spec.tty) {
        (Some(agent), tty) => by_agent(agent, spec, tty, input, out).await?,
        (None, Some(size)) => match terminal_agent(spec) {
            Some(agent) => by_agent(&agent?, spec, Some(size), input, out).await?,
            None => spawn_on_pty(spec, size, input, out)?,
        },
        (None, None) => spawn_piped(spec, input, out)?,
    };

    let timeout = async {
        match spec.timeout {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let (status, timed_out, cancelled) = tokio::select! {
        status = child.wait() => (status?, false, false),
        () = timeout => (terminate(&mut child).await?, true, false),
        () = cancel.cancelled() => (terminate(&mut child).await?, false, true),
    };

    // A command whose output went straight to its client (no pipe here to watch) ends
    // with its leader: a background job would otherwise hold the client's pipe open. The
    // agent did that itself when the leader ended (`end_group`, see by_agent).
    // The command has exited; its output may still be in the pipes. Background processes
    // that keep the pipes open would hold us forever: give them a moment, then end them.
    let mut pumps = pumps;
    if tokio::time::timeout(DRAIN_GRACE, &mut pumps).await.is_err() {
        child.signal(Signal::SIGKILL);
        let _ = tokio::time::timeout(DRAIN_GRACE, pumps).await;
    }

    use std::os::unix::process::ExitStatusExt;
    let signal = status
        .signal()
        .map(|n| Signal::try_from(n).map_or_else(|_| format!("signal {n}"), |s| s.to_string()));
    let code = if timed_out {
        TIMEOUT_EXIT_CODE
    } else {
        status
            .code()
            .or_else(|| status.signal().map(|n| 128 + n))
            .unwrap_or(1)
    };
    Ok(ExecExit {
        code,
        signal,
        timed_out,
        cancelled,
    })
}

/// A started command: a child of the daemon, or of the sandbox's agent.
enum Running {
    /// The child and its process group (taken at the start: a child that has been waited
    /// for no longer says its id, and the group's leftovers still need it).
    Own(tokio::process::Child, Option<i32>),
    Agent(super::agent::AgentChild),
}

impl Running {
    fn own(child: tokio::process::Child) -> Running {
        let pgid = child.id().map(|p| p as i32);
        Running::Own(child, pgid)
    }
}

impl Running {
    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        match self {
            Running::Own(c, _) => c.wait().await,
            Running::Agent(c) => c.wait().await,
        }
    }

    /// `signal` to the command's whole process group (nothing when it is gone).
    fn signal(&self, signal: Signal) {
        match self {
            Running::Own(_, pgid) => {
                if let Some(pgid) = pgid {
                    // ESRCH (the group is gone) is the expected outcome once everything
                    // has exited.
                    let _ = killpg(Pid::from_raw(*pgid), signal);
                }
            }
            Running::Agent(c) => c.signal(signal),
        }
    }
}

/// For a jailed command on a terminal without a sandbox agent (daytona-sim's): an agent of
/// its own, started in the command's jail for this command alone, so that the terminal is
/// opened inside the jail and has a name there (`/dev/pts/N`, as on Daytona; one opened
/// here is of this machine's devpts, which the jail does not show). It ends with the
/// command (the command's child holds it). None without a jail or an agent program: the
/// terminal is then opened here.
fn terminal_agent(spec: &ProcessSpec) -> Option<io::Result<std::sync::Arc<super::agent::Agent>>> {
    let jail = spec.jail.as_ref()?;
    let program = super::agent::program()?;
    Some(super::agent::Agent::spawn(
        program,
        &super::agent::AgentSpec {
            jail: Some(jail),
            cgroup_procs: &spec.cgroup_procs,
            dir: &spec.cwd,
        },
    ))
}

/// The command started by the sandbox's agent: on pipes made here (stdout and stderr
/// apart, or the client's own), or on a new terminal.
async fn by_agent(
    agent: &std::sync::Arc<super::agent::Agent>,
    spec: &ProcessSpec,
    tty: Option<PtySize>,
    input: Option<mpsc::Receiver<Input>>,
    out: mpsc::Sender<ExecOutput>,
) -> io::Result<(Running, tokio::task::JoinHandle<()>)> {
    use std::os::fd::{AsFd, OwnedFd};
    use tokio::net::unix::pipe;
    let env = environment(spec);
    if let Some(size) = tty {
        // The agent opens the terminal inside the sandbox (one opened here would be of this
        // machine's devpts, which a jail does not show: `tty` would say "not a tty").
        let (child, master) = agent
            .start_on_terminal(&spec.command, env, &spec.cwd, (size.rows, size.cols))
            .await?;
        // SAFETY: `start_on_terminal` answers a terminal's master, non-blocking, that
        // nothing else here holds.
        let pty = unsafe { pty_process::Pty::from_fd(master) }.map_err(io::Error::other)?;
        let pumps = pump_pty(pty, input, out);
        return Ok((Running::Agent(child), pumps));
    }
    let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
    };
    let null = || -> io::Result<OwnedFd> { Ok(std::fs::File::open("/dev/null")?.into()) };
    // (the command's end, ours)
    let (stdin_theirs, stdin_ours) = match &input {
        Some(_) => {
            let (r, w) = pipe()?;
            (r, Some(w))
        }
        None => (null()?, None),
    };
    let stream =
        |direct: Option<&std::sync::Arc<OwnedFd>>| -> io::Result<(OwnedFd, Option<OwnedFd>)> {
            match direct {
                Some(fd) => Ok((fd.try_clone()?, None)),
                None => {
                    let (r, w) = pipe()?;
                    Ok((w, Some(r)))
                }
            }
        };
    let (stdout_theirs, stdout_ours) = stream(spec.direct.stdout.as_ref())?;
    let (stderr_theirs, stderr_ours) = stream(spec.direct.stderr.as_ref())?;
    let child = agent
        .start(
            &spec.command,
            env,
            &spec.cwd,
            [
                stdin_theirs.as_fd(),
                stdout_theirs.as_fd(),
                stderr_theirs.as_fd(),
            ],
            !spec.direct.is_empty(),
        )
        .await?;
    drop((stdin_theirs, stdout_theirs, stderr_theirs));
    if let (Some(stdin), Some(input)) = (stdin_ours, input) {
        let stdin = pipe::Sender::from_owned_fd(stdin)?;
        tokio::spawn(feed(stdin, input));
    }
    let stdout = stdout_ours.map(pipe::Receiver::from_owned_fd).transpose()?;
    let stderr = stderr_ours.map(pipe::Receiver::from_owned_fd).transpose()?;
    let pumps = tokio::spawn(async move {
        tokio::join!(
            pump(stdout, out.clone(), ExecOutput::Stdout),
            pump(stderr, out, ExecOutput::Stderr)
        );
    });
    Ok((Running::Agent(child), pumps))
}

/// Writes what arrives on `input` to a command's stdin pipe until either ends.
async fn feed(mut stdin: impl tokio::io::AsyncWrite + Unpin, mut input: mpsc::Receiver<Input>) {
    use tokio::io::AsyncWriteExt;
    while let Some(msg) = input.recv().await {
        // A window size means nothing to a pipe.
        let Input::Data(data) = msg else { continue };
        if stdin.write_all(&data).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

/// The command's environment: the passed-through variables and `spec.env`, nothing else.
fn environment(spec: &ProcessSpec) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = PASSTHROUGH_ENV
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

/// The command on pipes, in its own process group: stdout and stderr apart.
fn spawn_piped(
    spec: &ProcessSpec,
    input: Option<mpsc::Receiver<Input>>,
    out: mpsc::Sender<ExecOutput>,
) -> io::Result<(Running, tokio::task::JoinHandle<()>)> {
    let mut cmd = prepared_command(spec)?;
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(direct_or_piped(spec.direct.stdout.as_deref())?)
    .stderr(direct_or_piped(spec.direct.stderr.as_deref())?)
    .process_group(0);
    let mut child = cmd.spawn()?;
    if let (Some(stdin), Some(input)) = (child.stdin.take(), input) {
        tokio::spawn(feed(stdin, input));
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pumps = tokio::spawn(async move {
        tokio::join!(
            pump(stdout, out.clone(), ExecOutput::Stdout),
            pump(stderr, out, ExecOutput::Stderr)
        );
    });
    Ok((Running::own(child), pumps))
}

/// A stream of the command: its client's own descriptor when handed over, else a pipe.
fn direct_or_piped(fd: Option<&std::os::fd::OwnedFd>) -> io::Result<Stdio> {
    Ok(match fd {
        Some(fd) => Stdio::from(fd.try_clone()?),
        None => Stdio::piped(),
    })
}

/// The command on a new pseudo-terminal, as the leader of its own session (and so of its
/// process group), with the terminal as its controlling one: what it prints comes back as
/// one stream, as on a screen.
fn spawn_on_pty(
    spec: &ProcessSpec,
    size: PtySize,
    input: Option<mpsc::Receiver<Input>>,
    out: mpsc::Sender<ExecOutput>,
) -> io::Result<(Running, tokio::task::JoinHandle<()>)> {
    let (pty, pts) = pty_process::open().map_err(io::Error::other)?;
    pty.resize(pty_process::Size::new(size.rows, size.cols))
        .map_err(io::Error::other)?;
    let child = if spec.jail.is_some() {
        // The jail's own `setsid`s give the terminal to the command (see `command_for`).
        use std::os::fd::AsFd;
        let fd = || pts.as_fd().try_clone_to_owned().map(Stdio::from);
        let mut cmd = prepared_command(spec)?;
        cmd.stdin(fd()?).stdout(fd()?).stderr(fd()?);
        cmd.spawn()?
    } else {
        pty_process::Command::from(prepared_command(spec)?)
            .spawn_borrowed(&pts)
            .map_err(io::Error::other)?
    };
    // The terminal's other end is closed here once the command has it, so that reading
    // ends (EIO) when the last process holding it is gone.
    drop(pts);
    Ok((Running::own(child), pump_pty(pty, input, out)))
}

/// Feeds a terminal from `input` (bytes and window sizes) and reads what it shows to `out`.
fn pump_pty(
    pty: pty_process::Pty,
    input: Option<mpsc::Receiver<Input>>,
    out: mpsc::Sender<ExecOutput>,
) -> tokio::task::JoinHandle<()> {
    let (reader, mut writer) = pty.into_split();
    if let Some(mut input) = input {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(msg) = input.recv().await {
                let ok = match msg {
                    Input::Data(d) => writer.write_all(&d).await.is_ok(),
                    Input::Resize(s) => writer
                        .resize(pty_process::Size::new(s.rows, s.cols))
                        .is_ok(),
                };
                if !ok {
                    break;
                }
            }
            // The end of the client's input is not the end of the terminal (the reading
            // half keeps it open): a terminal has no EOF of its own, a person types ^D.
        });
    }
    tokio::spawn(pump(Some(reader), out, ExecOutput::Stdout))
}

/// SIGTERM to the group, SIGKILL after a grace period; waits for the leader.
async fn terminate(child: &mut Running) -> io::Result<std::process::ExitStatus> {
    child.signal(Signal::SIGTERM);
    let status = match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            child.signal(Signal::SIGKILL);
            child.wait().await?
        }
    };
    // Whatever else of the group survived SIGTERM goes now.
    child.signal(Signal::SIGKILL);
    Ok(status)
}

async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    out: mpsc::Sender<ExecOutput>,
    wrap: fn(Vec<u8>) -> ExecOutput,
) {
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; 32 * 1024];
    let mut receiver_gone = false;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            // Keep draining after the receiver left, so the command never blocks on a full
            // pipe; the caller decides whether to cancel it.
            Ok(n) if !receiver_gone => {
                receiver_gone = out.send(wrap(buf[..n].to_vec())).await.is_err();
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(spec: ProcessSpec, cancel: CancellationToken) -> (ExecExit, Vec<u8>, Vec<u8>) {
        let (tx, mut rx) = mpsc::channel(16);
        let run = tokio::spawn(async move { run(&spec, None, tx, cancel).await });
        let (mut so, mut se) = (Vec::new(), Vec::new());
        while let Some(o) = rx.recv().await {
            match o {
                ExecOutput::Stdout(b) => so.extend(b),
                ExecOutput::Stderr(b) => se.extend(b),
            }
        }
        let exit = run.await.expect("join").expect("run");
        (exit, so, se)
    }

    fn spec(cmd: &str) -> ProcessSpec {
        ProcessSpec {
            command: cmd.into(),
            cwd: std::env::temp_dir(),
            env: BTreeMap::from([("CBX_T".to_string(), "v a l".to_string())]),
            timeout: None,
            jail: None,
            tty: None,
            direct: Default::default(),
            cgroup_procs: Vec::new(),
            agent: None,
        }
    }

    #[tokio::test]
    async fn streams_are_separate_and_code_passes_through() {
        let (exit, so, se) = collect(
            spec("echo out; echo err >&2; echo \"$CBX_T\"; exit 3"),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(exit.code, 3);
        assert_eq!(String::from_utf8_lossy(&so), "out\nv a l\n");
        assert_eq!(String::from_utf8_lossy(&se), "err\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let mut s = spec("sleep 30 & sleep 30; echo never");
        s.timeout = Some(Duration::from_millis(200));
        let (exit, so, _) = collect(s, CancellationToken::new()).await;
        assert!(exit.timed_out);
        assert_eq!(exit.code, TIMEOUT_EXIT_CODE);
        assert!(so.is_empty());
    }

    #[tokio::test]
    async fn cancel_kills_the_group() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.cancel();
        });
        let (exit, _, _) = collect(spec("trap '' TERM; sleep 30"), cancel).await;
        assert!(exit.cancelled);
        assert_eq!(exit.signal.as_deref(), Some("SIGKILL"));
        assert_eq!(exit.code, 128 + 9);
    }

    #[tokio::test]
    async fn background_jobs_do_not_hold_the_run() {
        // (A group left alive would hold the pipe, and so this, for its 30 s.)
        let (exit, so, _) = tokio::time::timeout(
            Duration::from_secs(15),
            collect(
                spec("sleep 30 & echo $!; echo done"),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("the background job was not ended with the run");
        assert_eq!(exit.code, 0);
        let so = String::from_utf8_lossy(&so).into_owned();
        let (pid, rest) = so.split_once('\n').expect("the pid, then done");
        assert_eq!(rest, "done\n");
        // The job that held the pipe is gone with the run (its group was killed).
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the background job lives on"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
