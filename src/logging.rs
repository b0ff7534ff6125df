//! Log filtering for the binaries: `RUST_LOG` as given, except for the targets of
//! dependencies that log raw HTTP requests (with their `Authorization` headers) at trace
//! or debug level, which are always capped at info: secrets never reach a log line.

use tracing_subscriber::EnvFilter;

/// Dependency log targets that print secrets verbatim: WebSocket handshakes (with their
/// `Authorization` header) and the SSH server's authentication (whose user name is the
/// Daytona access token).
pub const SECRET_BEARING_TARGETS: [&str; 3] = [
    // Handshakes carry the Authorization header; frames at trace carry the events
    // channel's token, stdin and terminal bytes.
    "tungstenite",
    "tokio_tungstenite",
    "russh",
];

/// Colour on stderr only when it is a terminal, and never with `NO_COLOR` set (unless
/// `CLICOLOR_FORCE` asks for it): a log file never holds escape codes.
pub fn colour_stderr() -> bool {
    use std::io::IsTerminal;
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty() && v != "0");
    if set("CLICOLOR_FORCE") {
        return true;
    }
    !set("NO_COLOR") && std::io::stderr().is_terminal()
}

/// `RUST_LOG` (or `default`), with [`SECRET_BEARING_TARGETS`] capped at `info`.
pub fn env_filter(default: &str) -> EnvFilter {
    let base = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    secret_safe(base)
}

/// Caps the secret-bearing targets of an existing filter.
pub fn secret_safe(mut filter: EnvFilter) -> EnvFilter {
    for target in SECRET_BEARING_TARGETS {
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}
