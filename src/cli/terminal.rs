//! This side's terminal for `run -t`: raw mode, always restored (when the run ends, on an
//! error, on a panic, on SIGTERM/SIGHUP), and the window's size.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

use nix::sys::termios::{self, SetArg, Termios};

/// The settings to put back, for the panic hook (which cannot reach the guard).
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// The terminal in raw mode until this is dropped: every key goes to the command as a byte
/// (Ctrl-C too), and the command's terminal does the echoing.
pub struct RawMode {
    _private: (),
}

impl RawMode {
    /// Puts stdin's terminal in raw mode.
    pub fn enter() -> std::io::Result<RawMode> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if let Ok(mut s) = SAVED.lock() {
            *s = Some(saved);
        }
        install_panic_hook();
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { _private: () })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal back as it was before raw mode (once; later calls do nothing).
pub fn restore() {
    let saved = SAVED.lock().ok().and_then(|mut s| s.take());
    if let Some(saved) = saved {
        let stdin = std::io::stdin();
        // TCSADRAIN: what the command printed last is shown with the old settings' care.
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &saved);
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::libc::winsize);

/// The window size of the terminal on `fd`: (rows, cols); `None` when it is not a terminal.
fn size_of(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    use std::os::fd::AsRawFd;
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointed-to struct, which lives for
    // the call; the fd is borrowed, so open.
    unsafe { tiocgwinsz(fd.as_raw_fd(), &mut ws) }.ok()?;
    Some((ws.ws_row, ws.ws_col))
}

/// This terminal's size: stdout's, else stdin's; (0, 0) when neither says (the daemon then
/// uses 80x24).
pub fn window_size() -> (u16, u16) {
    size_of(std::io::stdout().as_fd())
        .or_else(|| size_of(std::io::stdin().as_fd()))
        .unwrap_or((0, 0))
}
