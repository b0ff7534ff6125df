//! A run's output kept in files: `--capture-stdout FILE` / `--capture-stderr FILE` (the
//! whole stream, written as it comes), and `--capture-on-fail DIR` (the last bytes of
//! both streams, the command, its environment's names, timings and exit code, written
//! only when the command fails).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cli::{CliError, RunArgs, exit};

/// How much of each stream `--capture-on-fail` keeps.
pub const TAIL_BYTES: usize = 4 * 1024 * 1024;

pub struct Capture {
    stdout: Option<(PathBuf, std::fs::File)>,
    stderr: Option<(PathBuf, std::fs::File)>,
    on_fail: Option<PathBuf>,
    tail_out: Tail,
    tail_err: Tail,
    /// `-q` with a capture file: that stream goes to its file only.
    pub quiet_out: bool,
    pub quiet_err: bool,
}

/// The last [`TAIL_BYTES`] of a stream.
#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.bytes.extend(b);
        let over = self.bytes.len().saturating_sub(TAIL_BYTES);
        if over > 0 {
            self.bytes.drain(..over);
            self.dropped += over as u64;
        }
    }
}

fn create(path: &Path, flag: &str) -> Result<std::fs::File, CliError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(CliError::usage(format!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    std::fs::File::create(path)
        .map_err(|e| CliError::usage(format!("{flag} {}: {e}", path.display())))
}

impl Capture {
    /// Opens the capture files (before the run starts: a bad path is refused first).
    pub fn open(args: &RunArgs, quiet: bool) -> Result<Capture, CliError> {
        if let (Some(o), Some(e)) = (&args.capture_stdout, &args.capture_stderr)
            && o == e
        {
            return Err(CliError::usage(format!(
                "--capture-stdout and --capture-stderr name the same file {}: give each its own",
                o.display()
            )));
        }
        let stdout = match &args.capture_stdout {
            Some(p) => Some((p.clone(), create(p, "--capture-stdout")?)),
            None => None,
        };
        let stderr = match &args.capture_stderr {
            Some(p) => Some((p.clone(), create(p, "--capture-stderr")?)),
            None => None,
        };
        Ok(Capture {
            quiet_out: quiet && stdout.is_some(),
            quiet_err: quiet && stderr.is_some(),
            stdout,
            stderr,
            on_fail: args.capture_on_fail.clone(),
            tail_out: Tail::default(),
            tail_err: Tail::default(),
        })
    }

    /// Does it need to see the command's output (a capture file or a failure report)?
    pub fn sees_output(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some() || self.on_fail.is_some()
    }

    /// Keeps a chunk of the command's stdout (`err`: stderr).
    pub fn keep(&mut self, err: bool, b: &[u8]) -> Result<(), CliError> {
        let (file, tail) = if err {
            (&mut self.stderr, &mut self.tail_err)
        } else {
            (&mut self.stdout, &mut self.tail_out)
        };
        if self.on_fail.is_some() {
            tail.push(b);
        }
        if let Some((path, f)) = file {
            f.write_all(b).map_err(|e| {
                CliError::new(exit::INTERNAL, format!("writing {}: {e}", path.display()))
            })?;
        }
        Ok(())
    }

    /// After the command: flushes the files, and with `--capture-on-fail` and a failed
    /// command writes its report folder; answers that folder.
    pub fn finish(
        &mut self,
        code: i32,
        argv: &[String],
        env: &[String],
        timings: impl FnOnce() -> serde_json::Value,
    ) -> Result<Option<PathBuf>, CliError> {
        for (path, f) in self.stdout.iter_mut().chain(self.stderr.iter_mut()) {
            f.flush().map_err(|e| {
                CliError::new(exit::INTERNAL, format!("writing {}: {e}", path.display()))
            })?;
        }
        let Some(dir) = &self.on_fail else {
            return Ok(None);
        };
        if code == 0 {
            return Ok(None);
        }
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace(':', "");
        let report = dir.join(format!("run-{stamp}-exit{code}"));
        let io = |e: std::io::Error| {
            CliError::new(exit::INTERNAL, format!("writing {}: {e}", report.display()))
        };
        std::fs::create_dir_all(&report).map_err(io)?;
        let write = |name: &str, t: &Tail| -> Result<(), CliError> {
            let (a, b) = t.bytes.as_slices();
            let mut f = std::fs::File::create(report.join(name)).map_err(io)?;
            f.write_all(a).and_then(|()| f.write_all(b)).map_err(io)
        };
        write("stdout.log", &self.tail_out)?;
        write("stderr.log", &self.tail_err)?;
        let doc = serde_json::json!({
            "command": argv,
            "exit_code": code,
            // Names only: a value may be a secret.
            "env_names": env
                .iter()
                .map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k))
                .collect::<Vec<_>>(),
            "timings": timings(),
            "stdout_bytes_dropped": self.tail_out.dropped,
            "stderr_bytes_dropped": self.tail_err.dropped,
            "kept_bytes_per_stream": TAIL_BYTES,
        });
        std::fs::write(
            report.join("run.json"),
            serde_json::to_vec_pretty(&doc).unwrap_or_default(),
        )
        .map_err(io)?;
        Ok(Some(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; TAIL_BYTES]);
        t.push(b"end");
        assert_eq!(t.bytes.len(), TAIL_BYTES);
        assert_eq!(t.dropped, 3);
        let v: Vec<u8> = t.bytes.iter().copied().collect();
        assert!(v.ends_with(b"aend"));
    }
}
