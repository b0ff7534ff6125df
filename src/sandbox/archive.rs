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
    std::fs::create_dir_all(dest)?;
    let file = File::open(archive)?;
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
