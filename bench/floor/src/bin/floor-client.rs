//! Connects to floor-server, sends its command, exits with the code it answers: the least
//! a `crabbox run` client can do. Usage: floor-client SOCKET COMMAND

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn ask(socket: &str, command: &str) -> std::io::Result<u8> {
    let mut s = UnixStream::connect(socket)?;
    s.write_all(command.as_bytes())?;
    let mut code = [0u8; 1];
    s.read_exact(&mut code)?;
    Ok(code[0])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, command] = &args[..] else {
        eprintln!("usage: floor-client SOCKET COMMAND");
        std::process::exit(2);
    };
    match ask(socket, command) {
        Ok(code) => std::process::exit(code.into()),
        Err(e) => {
            eprintln!("floor-client: {e}");
            std::process::exit(1);
        }
    }
}
