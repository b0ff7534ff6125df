//! Listens on a Unix socket; per connection, reads a command, runs it with `/bin/sh -c`
//! (std's spawn: posix_spawn, as fast as a fork/exec gets) and answers its exit code in one
//! byte. Nothing else: no lease, no sync, no bookkeeping, no protocol beyond that.
//! Usage: floor-server SOCKET

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

fn serve(mut s: UnixStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf)?;
    let command = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .status()?;
    s.write_all(&[status.code().unwrap_or(255) as u8])
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: floor-server SOCKET");
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor-server: cannot listen on {path}: {e}");
            std::process::exit(1);
        }
    };
    for s in listener.incoming().flatten() {
        std::thread::spawn(move || {
            if let Err(e) = serve(s) {
                eprintln!("floor-server: {e}");
            }
        });
    }
}
