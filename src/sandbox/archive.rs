//! Putting a sync archive into a folder safely: relative paths only, no `..`, and never
//! through a symlink (a stale link in the target is removed before a file takes its place).

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Only plain relative paths are ever synced: no absolute path, no `..`.
pub fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Joins a relative path under `root`, refusing absolute paths, `..`, and any existing
/// ancestor inside `root` that is a symlink (which could lead out of `root`).
pub fn safe_join(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let rel_path = Path::new(rel);
    let mut out = root.to_path_buf();
    let mut comps = rel_path.components().peekable();
    if comps.peek().is_none() {
        return Err(invalid(format!("empty path {rel:?}")));
    }
    while let Some(c) = comps.next() {
        match c {
            Component::Normal(part) => {
                out.push(part);
                let is_last = comps.peek().is_none();
                if !is_last
                    && let Ok(meta) = std::fs::symlink_metadata(&out)
                    && meta.file_type().is_symlink()
                {
                    return Err(invalid(format!(
                        "path {rel:?} goes through a symlink in the sandbox"
                    )));
                }
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "path {rel:?} is not a plain relative path (absolute or `..`)"
                )));
            }
        }
    }
    Ok(out)
}

/// Removes each relative path under `root` (a file, a link, or a whole folder); missing
/// paths are fine.
pub fn remove_paths(root: &Path, rels: &[String]) -> io::Result<()> {
    for rel in rels {
        let path = safe_join(root, rel)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => remove_tree(&path)?,
            Ok(_) => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `rm -rf`, with a missing folder being fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unpacks a gzip tar into `dest` (created if missing). Every entry must be a plain
/// relative path; one that is not fails the whole unpack with its name. Symlinks are
/// created as links, never followed.
pub fn unpack(archive: &Path, dest: &Path) -> io::Result<u64> {
    unpack_counted(archive, dest, &std::sync::atomic::AtomicU64::new(0))
}

/// [`unpack`], adding to `read` each byte of the archive as it is read (progress).
pub fn unpack_counted(
    archive: &Path,
    dest: &Path,
    read: &std::sync::atomic::AtomicU64,
) -> io::Result<u64> {
    std::fs::create_dir_all(dest)?;
    let file = Counted {
        inner: File::open(archive)?,
        read,
    };
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    tar.set_preserve_permissions(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    let mut count = 0;
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel = path.to_string_lossy().into_owned();
        // Checks the name and that no existing ancestor is a symlink.
        safe_join(dest, &rel)?;
        if !entry.unpack_in(dest)? {
            return Err(invalid(format!(
                "archive entry {rel:?} escapes the workdir"
            )));
        }
        count += 1;
    }
    Ok(count)
}

/// A reader that counts what passes through it.
struct Counted<'a, R> {
    inner: R,
    read: &'a std::sync::atomic::AtomicU64,
}

impl<R: io::Read> io::Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// A changed file sent as the difference from the version the sandbox holds: the new
/// content is a sequence of byte ranges, each from the old file or from the delta's
/// literal bytes (which travel in the sync archive at `literal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDelta {
    /// The file, relative to the workdir; the sandbox holds its previous version there.
    pub path: String,
    /// Where the literal bytes land when the archive is unpacked (workdir-relative).
    pub literal: String,
    pub ops: Vec<DeltaOp>,
    /// The new content's length, checked once it is put together.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch (as the archive keeps it for whole files).
    pub mtime: i64,
}

impl FileDelta {
    /// The delta as text files that travel in the archive beside the literal bytes, for a
    /// sandbox that has nothing but a POSIX shell to put it together: `<literal>.ops` holds
    /// `size mode(octal) mtime` on its first line, then one `o|l offset len` line per range
    /// (`o`: the old file, `l`: the literal bytes); `<literal>.path` holds the file's path
    /// followed by an `x` (so that a trailing newline survives `$(cat ...)`).
    pub fn recipe(&self) -> [(String, Vec<u8>); 2] {
        let mut ops = format!("{} {:o} {}\n", self.size, self.mode & 0o7777, self.mtime);
        for op in &self.ops {
            let from = match op.from {
                DeltaSource::Old => 'o',
                DeltaSource::Literal => 'l',
            };
            ops.push_str(&format!("{from} {} {}\n", op.offset, op.len));
        }
        [
            (format!("{}.ops", self.literal), ops.into_bytes()),
            (
                format!("{}.path", self.literal),
                format!("{}x", self.path).into_bytes(),
            ),
        ]
    }
}

/// Where a range of a delta's new content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaSource {
    /// The file's previous version, in place.
    Old,
    /// The delta's literal bytes.
    Literal,
}

/// `len` bytes at `offset` of `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaOp {
    pub from: DeltaSource,
    pub offset: u64,
    pub len: u64,
}

/// Puts each delta's new content together beside its old version (as `<literal>.new`),
/// then, once every one is built, moves them into place: a failure before the moves leaves
/// every old file as it was.
pub fn apply_deltas(root: &Path, deltas: &[FileDelta]) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut built = Vec::with_capacity(deltas.len());
    for d in deltas {
        let target = safe_join(root, &d.path)?;
        let literal = safe_join(root, &d.literal)?;
        let new_path = safe_join(root, &format!("{}.new", d.literal))?;
        let mut old = File::open(&target)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.path)))?;
        let mut lit = File::open(&literal)?;
        let mut out = io::BufWriter::new(File::create(&new_path)?);
        for op in &d.ops {
            let src = match op.from {
                DeltaSource::Old => &mut old,
                DeltaSource::Literal => &mut lit,
            };
            src.seek(SeekFrom::Start(op.offset))?;
            let copied = io::copy(&mut Read::by_ref(src).take(op.len), &mut out)?;
            if copied != op.len {
                return Err(invalid(format!(
                    "{}: the sandbox's previous version is shorter than the sync expects",
                    d.path
                )));
            }
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.flush()?;
        if file.metadata()?.len() != d.size {
            return Err(invalid(format!(
                "{}: rebuilt with the wrong length",
                d.path
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(d.mode & 0o7777))?;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(d.mtime.max(0) as u64);
        file.set_modified(mtime)?;
        built.push((new_path, target));
    }
    for (new_path, target) in built {
        std::fs::rename(new_path, target)?;
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_join_refuses_escapes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        assert_eq!(
            safe_join(root, "a/b.txt").expect("ok"),
            root.join("a/b.txt")
        );
        for bad in ["/etc/passwd", "../x", "a/../../x", ""] {
            assert!(safe_join(root, bad).is_err(), "{bad}");
        }
        std::os::unix::fs::symlink("/etc", root.join("link")).expect("symlink");
        assert!(safe_join(root, "link/passwd").is_err());
        // The link itself may be named (to remove or replace it).
        assert!(safe_join(root, "link").is_ok());
    }

    #[test]
    fn remove_paths_removes_links_not_targets() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("keep"), "x").expect("write");
        let root = tmp.path();
        std::os::unix::fs::symlink(outside.path(), root.join("l")).expect("symlink");
        std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
        remove_paths(root, &["l".into(), "d".into(), "missing".into()]).expect("remove");
        assert!(outside.path().join("keep").exists());
        assert!(!root.join("l").exists() && !root.join("d").exists());
    }
}
