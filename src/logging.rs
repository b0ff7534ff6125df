//! Log filtering for the binaries: `RUST_LOG` as given, except for the targets of
//! dependencies that log raw HTTP requests (with their `Authorization` headers) at trace
//! or debug level, which are always capped at info: secrets never reach a log line.

use std::path::Path;

use tracing_subscriber::EnvFilter;

/// A daemon log file rotates when it reaches a size (10 MiB unless `--log-max-size`),
/// keeping this many older files (`crabboxd.log.1` the newest).
pub const LOG_KEEP: usize = 5;

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

/// Where the daemon's log goes: a file of its own (rotated at `max_bytes`, the
/// [`LOG_KEEP`] older ones kept as `<file>.1` ...), the journal when systemd started it
/// (no timestamps of our own, the journal's priority prefix per line), else stderr.
/// Panics are logged too.
pub fn init_daemon(log_file: Option<&Path>, max_bytes: u64) -> std::io::Result<()> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let fmt = tracing_subscriber::fmt::layer();
    let log: Boxed = if let Some(path) = log_file {
        fmt.with_ansi(false)
            .with_writer(LogFile::open(path, max_bytes)?)
            .with_filter(env_filter("info"))
            .boxed()
    } else if stderr_is_journal() {
        fmt.with_ansi(false)
            .event_format(journal::Format)
            .with_writer(std::io::stderr)
            .with_filter(env_filter("info"))
            .boxed()
    } else {
        fmt.with_ansi(colour_stderr())
            .with_writer(std::io::stderr)
            .with_filter(env_filter("info"))
            .boxed()
    };
    // `crabbox -v`: crabbox's own debug lines of a lease, whatever the log's level.
    let relay = crate::relay::Relay.with_filter(
        tracing_subscriber::filter::Targets::new().with_target("crabbox", tracing::Level::DEBUG),
    );
    tracing_subscriber::registry().with(log).with(relay).init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "crabboxd panicked");
        default_hook(info);
    }));
    Ok(())
}

type Appender = tracing_rolling_file::RollingFileAppenderBase;

/// The daemon's rotated log file; each line is flushed as it is written (`daemon logs
/// -f` sees it at once).
struct LogFile(std::sync::Mutex<Appender>);

impl LogFile {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<LogFile> {
        if path.to_str().is_none() {
            return Err(std::io::Error::other("the path is not UTF-8"));
        }
        let appender = Appender::new(
            path,
            tracing_rolling_file::RollingConditionBase::new().max_size(max_bytes),
            LOG_KEEP,
        )?;
        Ok(LogFile(std::sync::Mutex::new(appender)))
    }
}

/// One line being written: flushed when it is done.
struct LogLine<'a>(std::sync::MutexGuard<'a, Appender>);

impl std::io::Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for LogLine<'_> {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = self.0.flush();
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogLine<'a>;
    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` to the stream it connects stderr to.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let v = v.to_string_lossy();
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

mod journal {
    use tracing::{Level, Subscriber};
    use tracing_subscriber::fmt::FmtContext;
    use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
    use tracing_subscriber::registry::LookupSpan;

    /// Lines for the journal: `<N>` (the syslog priority systemd reads off stderr), no
    /// time of our own, no level word.
    pub struct Format;

    impl<S, N> FormatEvent<S, N> for Format
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &tracing::Event<'_>,
        ) -> std::fmt::Result {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{priority}>")?;
            format::format()
                .without_time()
                .with_level(false)
                .with_ansi(false)
                .format_event(ctx, writer, event)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_file_rotates_at_its_size_keeping_the_older_ones() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crabboxd.log");
        let mut w = tracing_rolling_file::RollingFileAppenderBase::new(
            &path,
            tracing_rolling_file::RollingConditionBase::new().max_size(1000),
            2,
        )
        .expect("appender");
        for i in 0..100 {
            writeln!(
                w,
                "line {i:04} ............................................."
            )
            .expect("write");
        }
        w.flush().expect("flush");
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 1100, "{}", size(&path));
        assert!(size(&dir.path().join("crabboxd.log.1")) > 0);
        assert!(size(&dir.path().join("crabboxd.log.2")) > 0);
        assert!(!dir.path().join("crabboxd.log.3").exists(), "only 2 kept");
        let newest = std::fs::read_to_string(&path).expect("read");
        assert!(newest.contains("line 0099"), "{newest}");
    }
}
