//! A session command's output, kept on disk as Daytona's daemon keeps it (a log file per
//! command), not in memory: a chatty command in a long-lived sim costs disk, and the sim
//! holds only where each piece lies.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sandbox::process::ExecOutput;

/// Numbers the log files of this process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// One command's output: the file, and each piece's stream, offset and length.
pub(super) struct OutputLog {
    file: Arc<File>,
    path: PathBuf,
    pieces: Vec<Piece>,
    size: u64,
}

/// Where one piece of output lies in the file.
#[derive(Clone, Copy)]
pub(super) struct Piece {
    stderr: bool,
    offset: u64,
    len: usize,
}

impl OutputLog {
    /// A new, empty log in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<OutputLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(OutputLog {
            file: Arc::new(file),
            path,
            pieces: Vec::new(),
            size: 0,
        })
    }

    /// Appends a piece; a piece the disk refuses is dropped (and said in the sim's log).
    pub fn push(&mut self, o: ExecOutput) {
        let (stderr, bytes) = match o {
            ExecOutput::Stdout(b) => (false, b),
            ExecOutput::Stderr(b) => (true, b),
        };
        if bytes.is_empty() {
            return;
        }
        if let Err(e) = (&*self.file).write_all(&bytes) {
            tracing::warn!(path = %self.path.display(), "a command's output was lost: {e}");
            return;
        }
        self.pieces.push(Piece {
            stderr,
            offset: self.size,
            len: bytes.len(),
        });
        self.size += bytes.len() as u64;
    }

    /// How many pieces there are.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// The pieces from `from` on, at most about `max` bytes of them (at least one), and
    /// the file to read them from: read with [`read`] outside any lock.
    pub fn after(&self, from: usize, max: usize) -> (Vec<Piece>, Arc<File>) {
        let mut taken = 0;
        let pieces = self
            .pieces
            .iter()
            .skip(from)
            .take_while(|p| {
                let go = taken == 0 || taken + p.len <= max;
                taken += p.len;
                go
            })
            .copied()
            .collect();
        (pieces, self.file.clone())
    }
}

/// The bytes of `pieces` from `file`.
pub(super) fn read(file: &File, pieces: &[Piece]) -> Vec<ExecOutput> {
    pieces
        .iter()
        .filter_map(|p| {
            let mut buf = vec![0u8; p.len];
            file.read_exact_at(&mut buf, p.offset).ok()?;
            Some(if p.stderr {
                ExecOutput::Stderr(buf)
            } else {
                ExecOutput::Stdout(buf)
            })
        })
        .collect()
}

impl Drop for OutputLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
