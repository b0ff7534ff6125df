//! `crabbox`: the CLI. Parses arguments and hands them to the library.
//!
//! It has its own C `main` instead of std's wrapper around `fn main`: `crabbox` is started
//! for every command, and what std's start-up does besides (a guard for a main-thread stack
//! overflow: /proc/self/maps read and parsed, an alternate signal stack mapped, two signal
//! handlers) cost ~60 us of a warm `crabbox run` that takes ~3.5 ms in all. What of it the
//! CLI relies on is done here: stdin/stdout/stderr are open (a descriptor the CLI then opens
//! never stands in for one), SIGPIPE is ignored (a write to a closed pipe is an error the
//! CLI reports, as in any Rust program), and a panic ends it with 101, as std does. A stack
//! overflow ends it with SIGSEGV rather than std's message.

// (Its test harness, which has no tests, keeps std's main.)
#![cfg_attr(not(test), no_main)]
#![cfg_attr(test, allow(dead_code))]

#[cfg(not(test))]
#[unsafe(no_mangle)]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // The arguments come from std::env::args_os (glibc hands them to std before main).
    std_start();
    let code = std::panic::catch_unwind(run).unwrap_or(101);
    // Straight out: what std's exit would add (its clean-up, atexit handlers, thread-local
    // destructors) is of no use to a process whose work is done; what it printed is
    // flushed first.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { nix::libc::_exit(code) }
}

/// What std's start-up does that the CLI needs (see the module's note).
fn std_start() {
    use nix::libc;
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: plain system calls on a local array and constant strings.
    unsafe {
        if libc::poll(fds.as_mut_ptr(), 3, 0) != -1 {
            for fd in fds.iter().filter(|p| p.revents & libc::POLLNVAL != 0) {
                // Opened on the lowest free descriptor: the closed one.
                let mode = if fd.fd == 0 {
                    libc::O_RDONLY
                } else {
                    libc::O_WRONLY
                };
                if libc::open(c"/dev/null".as_ptr(), mode) == -1 {
                    libc::abort();
                }
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

fn run() -> i32 {
    // `COMPLETE=bash crabbox ...`: the shell asks for completions (lease names come live
    // from the daemon); answered, then the process ends.
    clap_complete::CompleteEnv::with_factory(<crabbox::cli::Cli as clap::CommandFactory>::command)
        .complete();
    // Arguments first (`--help` and `--version` need nothing else), then a runtime on
    // this thread alone: a CLI waits on one daemon, worker threads would only cost start-up.
    let cli = crabbox::cli::parse_args();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(crabbox::cli::main(cli));
            // Not dropped: the process ends next, and a runtime's shutdown (its tasks,
            // connections and drivers, one by one) would only delay the exit code; nor
            // does the exit wait for a thread still blocked reading stdin.
            std::mem::forget(rt);
            code
        }
        Err(e) => {
            eprintln!("crabbox: error: cannot start the async runtime: {e}");
            crabbox::error::exit::INTERNAL
        }
    }
}
