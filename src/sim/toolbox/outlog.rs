//! A session command's output, kept on disk as Daytona's daemon keeps it (a log file per
//! command), not in memory: a chatty command in a long-lived sim costs disk, and the sim
//! holds only where each piece lies. Each piece is written after a 5-byte header (its
//! stream, its length), so a log outlives the sim: [`OutputLog::open`] reads one back
//! after a restart. A log file goes with its session ([`OutputLog::remove`]).

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
    /// Why output was lost, when some was (the first reason): the log is then not the
    /// command's whole output, and a follower is told so rather than shown a short log
    /// as if it were complete.
    lost: Option<String>,
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
        // Unique across runs too: the logs of an earlier run may be kept.
        let path = dir.join(format!(
            "{}-{}-{:08x}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        // Appends only (a refused write's partial piece is cut off with set_len, and the
        // next write must follow what is left).
        drop(file);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)?;
        Ok(OutputLog {
            file: Arc::new(file),
            path,
            pieces: Vec::new(),
            size: 0,
            lost: None,
        })
    }

    /// A log written by an earlier run of the sim: its pieces read back from their
    /// headers (a piece cut short by a crash is left out).
    pub fn open(path: &Path) -> std::io::Result<OutputLog> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)?;
        let end = file.metadata()?.len();
        let mut pieces = Vec::new();
        let mut at = 0u64;
        let mut header = [0u8; HEADER];
        while at + HEADER as u64 <= end {
            file.read_exact_at(&mut header, at)?;
            let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let offset = at + HEADER as u64;
            if offset + len as u64 > end {
                break;
            }
            pieces.push(Piece {
                stderr: header[0] == 2,
                offset,
                len,
            });
            at = offset + len as u64;
        }
        // Whatever follows the last whole piece is cut off, so appends start clean.
        file.set_len(at)?;
        Ok(OutputLog {
            file: Arc::new(file),
            path: path.to_path_buf(),
            pieces,
            size: at,
            lost: None,
        })
    }

    /// Where the log lies.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the log's file (its session is gone).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Appends a piece, if the log may grow to hold it (`limit` bytes; 0: no limit, as
    /// the `log_limit_bytes` fault says); a piece past the limit, or one the disk refuses,
    /// is lost, and the log says so ([`Self::lost`]).
    pub fn push(&mut self, o: ExecOutput, limit: u64) {
        let (stderr, bytes) = match o {
            ExecOutput::Stdout(b) => (false, b),
            ExecOutput::Stderr(b) => (true, b),
        };
        if limit > 0 && self.size + bytes.len() as u64 > limit {
            self.lose(format!(
                "the log is full ({limit} bytes: the log_limit_bytes fault)"
            ));
            return;
        }
        // Pieces longer than a header can say are split.
        for part in bytes.chunks(u32::MAX as usize) {
            if part.is_empty() {
                continue;
            }
            let mut header = [if stderr { 2u8 } else { 1u8 }; HEADER];
            header[1..].copy_from_slice(&(part.len() as u32).to_le_bytes());
            let written = (&*self.file)
                .write_all(&header)
                .and_then(|()| (&*self.file).write_all(part));
            if let Err(e) = written {
                // A header without its bytes would hide every later piece from `open`.
                let _ = self.file.set_len(self.size);
                self.lose(format!("writing the command's log: {e}"));
                return;
            }
            self.pieces.push(Piece {
                stderr,
                offset: self.size + HEADER as u64,
                len: part.len(),
            });
            self.size += (HEADER + part.len()) as u64;
        }
    }

    /// Output that could not be kept (`reason`): said in the sim's log, and to followers.
    fn lose(&mut self, reason: String) {
        tracing::warn!(path = %self.path.display(), "a command's output was lost: {reason}");
        self.lost.get_or_insert(reason);
    }

    /// Why output was lost, if any was.
    pub fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
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

/// A piece's header: 1 (stdout) or 2 (stderr), then its length (u32, little-endian).
const HEADER: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_read_back_piece_by_piece_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = OutputLog::create(dir.path()).expect("create");
        log.push(ExecOutput::Stdout(b"out\x01\x02".to_vec()), 0);
        log.push(ExecOutput::Stderr(b"err".to_vec()), 0);
        log.push(ExecOutput::Stdout(Vec::new()), 0);
        let path = log.path().to_path_buf();
        drop(log);
        // A crash in the middle of a piece: its header is there, its bytes are not all.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(&[1, 9, 0, 0, 0, b'x']).expect("torn");
        let mut back = OutputLog::open(&path).expect("open");
        let (pieces, file) = back.after(0, usize::MAX);
        let got = read(&file, &pieces);
        assert_eq!(
            got,
            vec![
                ExecOutput::Stdout(b"out\x01\x02".to_vec()),
                ExecOutput::Stderr(b"err".to_vec())
            ]
        );
        // Appends go after the last whole piece.
        back.push(ExecOutput::Stderr(b"more".to_vec()), 0);
        let again = OutputLog::open(&path).expect("open");
        assert_eq!(again.len(), 3);
        again.remove();
        assert!(!path.exists());
    }
}
