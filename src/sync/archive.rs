//! The gzip tar a sync sends: relative paths only, symlinks as links, modes and mtimes kept.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::delta::{LiteralReader, Planned};
use super::{Manifest, SyncError};

/// Writes the archive of `paths` (relative to `root`, all in `manifest`) and of the
/// `deltas`' literal bytes to `out`; answers its size in bytes.
pub fn build(
    root: &Path,
    paths: &[String],
    deltas: &[Planned],
    manifest: &Manifest,
    out: &Path,
) -> Result<u64, SyncError> {
    let io = |what: String| move |e: std::io::Error| SyncError::Io(format!("{what}: {e}"));
    let file = File::create(out).map_err(io(format!("creating {}", out.display())))?;
    // Fast compression: the archive goes over loopback or a LAN-class link, where CPU is
    // the bottleneck, not bytes.
    let gz = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    for rel in paths {
        if !crate::sandbox::archive::plain_relative(rel) {
            return Err(SyncError::Io(format!(
                "refusing to archive {rel:?}: not a plain relative path"
            )));
        }
        let entry = manifest
            .files
            .get(rel)
            .ok_or_else(|| SyncError::Io(format!("{rel} is not in the manifest")))?;
        let full = root.join(rel);
        match &entry.link {
            Some(target) => {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                header.set_mtime((entry.mtime_ns.max(0) / 1_000_000_000) as u64);
                tar.append_link(&mut header, rel, target)
                    .map_err(io(format!("archiving link {rel}")))?;
            }
            None => tar
                .append_path_with_name(&full, rel)
                .map_err(io(format!("archiving {}", full.display())))?,
        }
    }
    for planned in deltas {
        let d = &planned.delta;
        if !crate::sandbox::archive::plain_relative(&d.literal) {
            return Err(SyncError::Io(format!(
                "refusing to archive {:?}: not a plain relative path",
                d.literal
            )));
        }
        let full = root.join(&d.path);
        let file = File::open(&full).map_err(io(format!("reading {}", full.display())))?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(planned.literal_bytes());
        header.set_mode(0o600);
        header.set_mtime(0);
        tar.append_data(&mut header, &d.literal, LiteralReader::new(file, planned))
            .map_err(|e| SyncError::Io(format!("archiving the changes of {}: {e}", d.path)))?;
        for (name, data) in d.recipe() {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_mtime(0);
            tar.append_data(&mut header, &name, &data[..])
                .map_err(io(format!("archiving the changes of {}", d.path)))?;
        }
    }
    let gz = tar
        .into_inner()
        .map_err(io("finishing the archive".into()))?;
    let mut w = gz.finish().map_err(io("compressing the archive".into()))?;
    w.flush().map_err(io("writing the archive".into()))?;
    let file = w
        .into_inner()
        .map_err(|e| SyncError::Io(format!("writing the archive: {}", e.error())))?;
    let len = file
        .metadata()
        .map_err(io("sizing the archive".into()))?
        .len();
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{SyncRules, manifest::collect};

    #[test]
    fn round_trip_through_the_sandbox_unpacker() {
        let src = tempfile::tempdir().expect("tempdir");
        let r = src.path();
        std::fs::create_dir_all(r.join("d")).expect("mkdir");
        std::fs::write(r.join("d/f.txt"), "hello").expect("w");
        std::fs::write(r.join("run.sh"), "#!/bin/sh\necho hi\n").expect("w");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("d/f.txt", r.join("link")).expect("ln");
        let m = collect(r, &SyncRules::default(), None)
            .expect("collect")
            .manifest;
        let paths: Vec<String> = m.files.keys().cloned().collect();
        let out = tempfile::tempdir().expect("tempdir");
        let archive = out.path().join("a.tgz");
        let size = build(r, &paths, &[], &m, &archive).expect("build");
        assert!(size > 0);
        let dest = out.path().join("dest");
        let n = crate::sandbox::archive::unpack(&archive, &dest).expect("unpack");
        assert_eq!(n, 3);
        assert_eq!(
            std::fs::read_to_string(dest.join("d/f.txt")).expect("r"),
            "hello"
        );
        assert_eq!(
            std::fs::read_link(dest.join("link"))
                .expect("link")
                .to_str(),
            Some("d/f.txt")
        );
        let mode = std::fs::metadata(dest.join("run.sh"))
            .expect("m")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "exec bit kept");
    }

    #[test]
    fn refuses_escaping_paths() {
        let m = Manifest::default();
        let out = tempfile::tempdir().expect("tempdir");
        let err = build(
            out.path(),
            &["../x".into()],
            &[],
            &m,
            &out.path().join("a.tgz"),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("plain relative"));
    }
}
