//! A session's shell, as Daytona keeps one: a single long-lived `bash` per session whose
//! commands run one after another in the shell itself, so `cd`, `export` and shell
//! variables carry over from one command to the next.
//!
//! Each command is written to the shell's stdin as
//! `{ eval '<command>'; } < IN > OUT 2> ERR; printf '<nonce> <cmd id> %d\n' "$?"`, where OUT
//! and ERR are FIFOs the sim reads while the command runs (stdout and stderr apart) and IN
//! is the command's stdin: a FIFO the input endpoint writes to for an async command,
//! `/dev/null` for a sync one (which must not read the shell's own script). The shell's
//! stdout carries only the completion lines. `eval` keeps a syntax error in one command
//! from ending the shell (its status is 2, as bash says); `exit` in a command ends the
//! shell, as on Daytona, and the session says so on its next command.
//!
//! An async command runs in a process group of its own (as Daytona's newer daemons run
//! every command, under `setsid`), still in order: the shell dumps its variables and
//! functions to a file, starts `setsid [setpriv --pdeathsig KILL] bash -c '. STATE; eval
//! CMD'` in the background with the same FIFOs, says its pid (`<nonce> pid <cmd id>
//! <pid>`) and waits for it. So the command sees the session's directory, environment,
//! variables and functions, but what it changes stays in it; its group can be signalled
//! alone, and it dies with the shell (a deleted session or a stopped sandbox kills the
//! groups still running; a killed sim takes it down through PDEATHSIG).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::sandbox::process::{self, ExecOutput, Input, ProcessSpec};

/// What became of a command: its exit code once it has ended and all its output was
/// passed on.
pub(super) type Done = watch::Receiver<Option<i32>>;

/// A command's FIFOs, host side, and how the shell names them.
struct Fifos {
    host: Vec<PathBuf>,
}

impl Drop for Fifos {
    fn drop(&mut self) {
        for p in &self.host {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One session's shell.
pub(super) struct Shell {
    script: mpsc::Sender<Input>,
    nonce: String,
    /// The FIFO folder, on the host and as the shell sees it.
    host_dir: PathBuf,
    guest_dir: String,
    /// Commands written to the shell and not yet ended, by id.
    pending: Arc<Mutex<BTreeMap<String, watch::Sender<Option<i32>>>>>,
    /// The shell's own exit code once it has ended.
    ended: watch::Receiver<Option<i32>>,
    /// Async commands' process groups still running (killed when the shell ends, or when
    /// it is dropped without ending: a sim dropped in a test, a runtime shut down).
    groups: Groups,
    seq: Mutex<u64>,
}

/// The exit code of a command that was running when the sim went down: killed, as by
/// SIGKILL (128 + 9), which is what happened to it.
pub(super) const GONE: i32 = 137;

/// Async commands' process groups (their leaders' pids), by command id.
type Groups = Arc<Mutex<BTreeMap<String, i32>>>;

/// Kills what is left of async commands' process groups (their shell has ended).
fn kill_groups(groups: &Groups) {
    let left = groups.lock().map(|mut g| std::mem::take(&mut *g));
    for (_, pid) in left.into_iter().flatten() {
        if pid > 1 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        kill_groups(&self.groups);
    }
}

/// Quotes `s` for the shell as one word.
pub(super) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Shell {
    /// Starts the shell of `spec` (its folder, environment and jail; its command is
    /// replaced); its FIFOs live in `host_dir`, which the shell sees as `guest_dir`.
    pub fn start(
        mut spec: ProcessSpec,
        host_dir: PathBuf,
        guest_dir: String,
        cancel: CancellationToken,
    ) -> io::Result<Shell> {
        std::fs::create_dir_all(&host_dir)?;
        spec.command =
            "if command -v bash >/dev/null 2>&1; then exec bash --noprofile --norc; fi; exec sh"
                .into();
        spec.timeout = None;
        let nonce = format!("sim-{:016x}", rand::random::<u64>());
        let (script, script_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let pending: Arc<Mutex<BTreeMap<String, watch::Sender<Option<i32>>>>> = Arc::default();
        let (ended_tx, ended) = watch::channel(None);
        let run =
            tokio::spawn(async move { process::run(&spec, Some(script_rx), out_tx, cancel).await });
        let marks = pending.clone();
        let started: Groups = Arc::default();
        let groups = started.clone();
        let prefix = format!("{nonce} ");
        tokio::spawn(async move {
            // Completion lines: `<nonce> <cmd id> <code>`; anything else the shell prints
            // (its own complaints) is not a command's and is dropped.
            let mut line = Vec::new();
            while let Some(o) = out_rx.recv().await {
                let ExecOutput::Stdout(bytes) = o else {
                    continue;
                };
                for b in bytes {
                    if b != b'\n' {
                        line.push(b);
                        continue;
                    }
                    let text = String::from_utf8_lossy(&line).into_owned();
                    line.clear();
                    let Some(rest) = text.strip_prefix(&prefix) else {
                        continue;
                    };
                    if let Some(said) = rest.strip_prefix("pid ") {
                        if let Some((id, pid)) = said.split_once(' ')
                            && let Ok(pid) = pid.trim().parse::<i32>()
                            && let Ok(mut g) = started.lock()
                        {
                            g.insert(id.to_string(), pid);
                        }
                        continue;
                    }
                    let Some((id, code)) = rest.split_once(' ') else {
                        continue;
                    };
                    let code = code.trim().parse().unwrap_or(1);
                    if let Ok(mut g) = started.lock() {
                        g.remove(id);
                    }
                    if let Some(done) = marks.lock().ok().and_then(|mut m| m.remove(id)) {
                        let _ = done.send(Some(code));
                    }
                }
            }
            // The shell has ended (deleted, or `exit` in a command): what was running ends
            // with its code, and what was queued behind it never runs.
            let code = match run.await {
                Ok(Ok(exit)) => exit.code,
                _ => 1,
            };
            // Async commands left their shell's group: theirs go too.
            kill_groups(&started);
            // Under the lock: a command is either taken here or refused by `run`.
            if let Ok(mut m) = marks.lock() {
                for (_, done) in std::mem::take(&mut *m) {
                    let _ = done.send(Some(code));
                }
                let _ = ended_tx.send(Some(code));
            }
        });
        Ok(Shell {
            script,
            nonce,
            host_dir,
            guest_dir,
            pending,
            ended,
            groups,
            seq: Mutex::new(0),
        })
    }

    /// The shell's exit code, once it has ended.
    pub fn ended(&self) -> Option<i32> {
        *self.ended.borrow()
    }

    /// The shell of a session kept across a restart of the sim: it died with the sim, so
    /// the session's commands and output can be read but nothing more runs in it.
    pub fn gone() -> Shell {
        let (script, _) = mpsc::channel(1);
        let (_, ended) = watch::channel(Some(GONE));
        Shell {
            script,
            nonce: String::new(),
            host_dir: PathBuf::new(),
            guest_dir: String::new(),
            pending: Arc::default(),
            ended,
            groups: Arc::default(),
            seq: Mutex::new(0),
        }
    }

    /// Runs `command` as the command `id` after those before it: its output goes to
    /// `out` as it is written, and with `stdin` what arrives there is its stdin (never at
    /// its end while it runs, as on Daytona); without, it reads an empty stdin.
    pub async fn run(
        &self,
        id: &str,
        command: &str,
        stdin: Option<mpsc::Receiver<Vec<u8>>>,
        out: impl Fn(ExecOutput) + Send + Sync + 'static,
    ) -> io::Result<Done> {
        if self.ended() == Some(GONE) && self.nonce.is_empty() {
            return Err(io::Error::other(
                "this session's shell ended when daytona-sim restarted (its commands and \
                 their output are kept); delete the session and create a new one",
            ));
        }
        if let Some(code) = self.ended() {
            return Err(io::Error::other(format!(
                "the session's shell has exited (code {code}, e.g. after `exit` in a \
                 command); delete the session and create a new one"
            )));
        }
        let n = {
            let mut seq = self
                .seq
                .lock()
                .map_err(|_| io::Error::other("lock poisoned"))?;
            *seq += 1;
            *seq
        };
        let name = |s: &str| format!("{n}.{s}");
        let mut fifos = Fifos { host: Vec::new() };
        let mut open = |s: &str| -> io::Result<String> {
            let host = self.host_dir.join(name(s));
            let _ = std::fs::remove_file(&host);
            nix::unistd::mkfifo(&host, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(io::Error::from)?;
            fifos.host.push(host);
            Ok(format!("{}/{}", self.guest_dir, name(s)))
        };
        let (out_g, err_g) = (open("out")?, open("err")?);
        let in_g = match stdin {
            Some(_) => open("in")?,
            None => "/dev/null".into(),
        };
        // An async command's dump of the shell's state (a plain file the shell writes).
        let state_g = match stdin {
            Some(_) => {
                fifos.host.push(self.host_dir.join(name("state")));
                Some(format!("{}/{}", self.guest_dir, name("state")))
            }
            None => None,
        };
        // Opened read-write: neither end waits for the shell, nor sees an end of file
        // between the shell's opens.
        let opts = || {
            let mut o = pipe::OpenOptions::new();
            o.read_write(true);
            o
        };
        let out_rx = opts().open_receiver(&fifos.host[0])?;
        let err_rx = opts().open_receiver(&fifos.host[1])?;
        let in_tx = match &stdin {
            Some(_) => Some(opts().open_sender(&fifos.host[2])?),
            None => None,
        };
        let (done_tx, done) = watch::channel(None);
        {
            let mut pending = self
                .pending
                .lock()
                .map_err(|_| io::Error::other("lock poisoned"))?;
            // Checked under the lock the shell's end takes: never a command left waiting
            // on a shell that has gone.
            if let Some(code) = self.ended() {
                return Err(io::Error::other(format!(
                    "the session's shell has exited (code {code}); delete the session and \
                     create a new one"
                )));
            }
            pending.insert(id.to_string(), done_tx);
        }
        let redirects = format!(
            "< {} > {} 2> {}",
            quote(&in_g),
            quote(&out_g),
            quote(&err_g)
        );
        let script = if let Some(state) = &state_g {
            // Async: in a process group of its own, with the session's state (see the
            // module's notes).
            format!(
                "{{ declare -p; declare -f; }} > {state} 2>/dev/null; \
                 setsid $(command -v setpriv >/dev/null 2>&1 && echo setpriv --pdeathsig KILL) \
                 \"${{BASH:-sh}}\" -c '__sim_s=$1 __sim_c=$2; shift 2; . \"$__sim_s\" 2>/dev/null; \
                 rm -f \"$__sim_s\"; unset __sim_s; eval \"unset __sim_c
$__sim_c\"' _ {state} {cmd} \
                 {redirects} & _sim_pid=$!; printf '{nonce} pid {id} %d\\n' \"$_sim_pid\"; \
                 wait \"$_sim_pid\"; printf '{nonce} {id} %d\\n' \"$?\"\n",
                state = quote(state),
                cmd = quote(command),
                nonce = self.nonce,
            )
        } else {
            format!(
                "{{ eval {}\n}} {redirects}; printf '{} {id} %d\\n' \"$?\"\n",
                quote(command),
                self.nonce,
            )
        };
        if self
            .script
            .send(Input::Data(script.into_bytes()))
            .await
            .is_err()
        {
            if let Ok(mut m) = self.pending.lock() {
                m.remove(id);
            }
            return Err(io::Error::other("the session's shell has exited"));
        }
        let out = Arc::new(out);
        if let (Some(mut input), Some(mut tx)) = (stdin, in_tx) {
            let done = done.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                loop {
                    tokio::select! {
                        data = input.recv() => match data {
                            Some(d) => if tx.write_all(&d).await.is_err() { break },
                            None => break,
                        },
                        _ = wait(done.clone()) => break,
                    }
                }
            });
        }
        let (finished_tx, finished) = watch::channel(None);
        tokio::spawn(async move {
            let o1 = out.clone();
            let o2 = out;
            tokio::join!(
                pump(out_rx, done.clone(), move |b| o1(ExecOutput::Stdout(b))),
                pump(err_rx, done.clone(), move |b| o2(ExecOutput::Stderr(b))),
            );
            let mut done = done;
            let code = done.wait_for(Option::is_some).await.ok().and_then(|c| *c);
            drop(fifos);
            let _ = finished_tx.send(code.or(Some(1)));
        });
        Ok(finished)
    }
}

/// Reads a FIFO until the command has ended, then what is left in it (all the command
/// wrote before it ended is in the pipe by then).
async fn pump(mut rx: pipe::Receiver, done: watch::Receiver<Option<i32>>, out: impl Fn(Vec<u8>)) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            biased;
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => out(buf[..n].to_vec()),
            },
            () = wait(done.clone()) => break,
        }
    }
    loop {
        match rx.try_read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => out(buf[..n].to_vec()),
        }
    }
}

/// Until the command has ended.
async fn wait(mut done: watch::Receiver<Option<i32>>) {
    let _ = done.wait_for(Option::is_some).await;
}
