//! A real terminal for `crabbox run -t`: the CLI runs on a pseudo-terminal this test opens,
//! as under a person's terminal emulator; the test types, reads the screen's bytes, resizes
//! the window, and looks at the terminal's modes.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::termios::{self, LocalFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Daemon;

/// The CLI on a terminal of its own.
pub struct Term {
    pub child: tokio::process::Child,
    writer: pty_process::OwnedWritePty,
    /// The terminal's other end, kept open to read its modes.
    pts: pty_process::Pts,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Term {
    /// Starts `crabbox <prefix> ARGS` in `repo` on a `rows` x `cols` terminal whose TERM is
    /// `term`.
    pub fn spawn(
        d: &Daemon,
        repo: &Path,
        prefix: &[&str],
        args: &[&str],
        (rows, cols): (u16, u16),
    ) -> Term {
        let mut cli = d.cli(repo);
        cli.args(prefix);
        Term::spawn_command(cli, args, (rows, cols))
    }

    /// Starts the CLI command `cli` (made by `Daemon::cli`) with `args` on a terminal.
    pub fn spawn_command(
        mut cli: tokio::process::Command,
        args: &[&str],
        (rows, cols): (u16, u16),
    ) -> Term {
        let (pty, pts) = pty_process::open().expect("openpty");
        pty.resize(pty_process::Size::new(rows, cols))
            .expect("resize");
        cli.args(args).env("TERM", "xterm-crabbox-test");
        let mut cmd = pty_process::Command::from(cli);
        let child = cmd.spawn_borrowed(&pts).expect("spawn on the pty");
        let (mut reader, writer) = pty.into_split();
        let screen = Arc::new(Mutex::new(Vec::new()));
        let s2 = screen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                s2.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        });
        Term {
            child,
            writer,
            pts,
            screen,
        }
    }

    /// `crabbox <prefix> run -q -t -- sh -c SCRIPT` on a terminal of `size`.
    pub fn sh(d: &Daemon, repo: &Path, prefix: &[&str], script: &str, size: (u16, u16)) -> Term {
        Term::spawn(
            d,
            repo,
            prefix,
            &["run", "-q", "-t", "--", "sh", "-c", script],
            size,
        )
    }

    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().expect("screen")).into_owned()
    }

    /// Waits until the screen shows `text` (at most 30 s).
    pub async fn wait_for(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.screen().contains(text) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the screen never showed {text:?}:\n{}",
                self.screen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn type_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("type");
        self.writer.flush().await.expect("flush");
    }

    /// Changes the window's size (the kernel tells the CLI with SIGWINCH).
    pub fn resize(&self, rows: u16, cols: u16) {
        self.writer
            .resize(pty_process::Size::new(rows, cols))
            .expect("resize");
    }

    /// Is the terminal in canonical mode with echo (as a shell prompt wants it)?
    pub fn is_cooked(&self) -> bool {
        let t = termios::tcgetattr(self.pts.as_fd()).expect("tcgetattr");
        t.local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO)
    }

    /// Waits for the CLI to exit (at most 60 s), and for the screen to show all it wrote;
    /// its exit code.
    pub async fn exit_code(&mut self) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("crabbox did not exit; screen:\n{}", self.screen()))
            .expect("wait");
        self.settle().await;
        status.code().unwrap_or(-1)
    }

    /// Waits until the screen's reader has read everything written to the terminal so
    /// far: a mark written now comes after it, and is taken off the screen again.
    async fn settle(&self) {
        const MARK: &str = "<<screen-settled>>";
        nix::unistd::write(self.pts.as_fd(), MARK.as_bytes()).expect("write the mark");
        self.wait_for(MARK).await;
        let mut screen = self.screen.lock().expect("screen");
        if let Some(at) = screen
            .windows(MARK.len())
            .position(|w| w == MARK.as_bytes())
        {
            screen.drain(at..at + MARK.len());
        }
    }
}

/// What `run -t` must do on any provider: a real terminal of this window's size and TERM,
/// the exit code back, raw mode here while it runs and cooked after, window changes
/// followed, Ctrl-C to the command as a byte, SIGTERM restoring the terminal.
pub async fn tty_run_behaves_like_a_terminal(d: &Daemon, repo: &Path, prefix: &[&str]) {
    // A terminal, of this window's size, with this TERM; the code comes back.
    let mut t = Term::sh(
        d,
        repo,
        prefix,
        "test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; stty size; echo term=$TERM; echo \"tty=$(tty)\"; exit 3",
        (30, 100),
    );
    assert_eq!(t.exit_code().await, 3, "{}", t.screen());
    let screen = t.screen();
    assert!(screen.contains("is-a-tty"), "{screen}");
    assert!(screen.contains("30 100"), "{screen}");
    assert!(screen.contains("term=xterm-crabbox-test"), "{screen}");
    // The terminal has a name where the command runs (ttyname: `tty`, a password prompt),
    // not only the answers of isatty and TIOCGWINSZ: a pseudo-terminal's, as on Daytona.
    assert!(screen.contains("tty=/dev/pts/"), "{screen}");
    assert!(t.is_cooked(), "the terminal is cooked again after the run");

    // Raw here while it runs (the command's terminal echoes and edits), typed lines arrive,
    // window changes are followed, ^D ends input as on a terminal.
    let mut t = Term::sh(
        d,
        repo,
        prefix,
        "echo ready; while read x; do echo got:$x; stty size; done; echo bye",
        (24, 80),
    );
    t.wait_for("ready").await;
    assert!(!t.is_cooked(), "the terminal is raw while the command runs");
    t.type_bytes(b"hello\r").await;
    t.wait_for("got:hello").await;
    t.resize(40, 120);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !t.screen().contains("40 120") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new size never arrived:\n{}",
            t.screen()
        );
        t.type_bytes(b"again\r").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.type_bytes(b"\x04").await;
    t.wait_for("bye").await;
    assert_eq!(t.exit_code().await, 0, "{}", t.screen());
    assert!(t.is_cooked());

    // Ctrl-C is the command's: it gets SIGINT from its terminal, crabbox goes on and passes
    // the command's own exit code back. Also when the daemon ignores SIGINT, as one started
    // in the background does (`(crabboxd &)`): this process holds the daemon (and the sim),
    // and an ignored signal would pass to the command, whose shell cannot even trap it.
    // SAFETY: SIG_IGN installs no handler; nothing in these tests relies on SIGINT.
    unsafe {
        nix::libc::signal(nix::libc::SIGINT, nix::libc::SIG_IGN);
    }
    let mut t = Term::sh(
        d,
        repo,
        prefix,
        "trap 'echo got-int; exit 42' INT; echo ready; while :; do sleep 1; done",
        (24, 80),
    );
    t.wait_for("ready").await;
    t.type_bytes(b"\x03").await;
    t.wait_for("got-int").await;
    assert_eq!(t.exit_code().await, 42, "{}", t.screen());
    assert!(t.is_cooked());

    // SIGTERM to crabbox in raw mode: the terminal is put back, the command is cancelled.
    let mut t = Term::sh(d, repo, prefix, "echo ready; sleep 60", (24, 80));
    t.wait_for("ready").await;
    assert!(!t.is_cooked());
    let pid = t.child.id().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    assert_eq!(t.exit_code().await, 143, "{}", t.screen());
    assert!(t.is_cooked(), "SIGTERM put the terminal back");

    // -t without a terminal on stdin: said, and run on pipes (as ssh does).
    let out = d
        .run(
            repo,
            &[
                prefix,
                &["run", "-t", "--", "sh", "-c", "test -t 1 || echo pipes"],
            ]
            .concat(),
        )
        .await
        .expect(0);
    assert!(out.stdout().contains("pipes"), "{}", out.stdout());
    assert!(
        out.stderr().contains("stdin is not a terminal"),
        "{}",
        out.stderr()
    );
}
