//! `crabbox cp`: files between this machine and a lease's sandbox, as `docker cp` and
//! `cp -r` do it: one tar stream each way (modes, mtimes and symlinks kept), written
//! here atomically (unpacked beside the destination, then renamed into place).

use std::io::Read;
use std::path::{Path, PathBuf};

use tokio_stream::StreamExt;

use super::Ctx;
use crate::cli::{CliError, exit};
use crate::pb;

/// One side of a copy: here, or in a lease (`LEASE:PATH`, `:PATH` for the repo's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    Local(PathBuf),
    Remote { lease: String, path: String },
}

impl Side {
    /// `LEASE:PATH` when the part before the first `:` has no `/` (write `./a:b` for a
    /// local name with a colon).
    pub fn parse(arg: &str) -> Side {
        match arg.split_once(':') {
            Some((lease, path)) if !lease.contains('/') => Side::Remote {
                lease: lease.to_string(),
                path: path.to_string(),
            },
            _ => Side::Local(PathBuf::from(arg)),
        }
    }
}

/// Runs `crabbox cp SRC... DST`.
pub async fn cp(ctx: &Ctx, args: &[String], any_path: bool) -> Result<i32, CliError> {
    let (dst, srcs) = args
        .split_last()
        .filter(|(_, s)| !s.is_empty())
        .ok_or_else(|| {
            CliError::usage("cp needs a source and a destination: crabbox cp :target/report.xml .")
        })?;
    let dst = Side::parse(dst);
    let srcs: Vec<Side> = srcs.iter().map(|s| Side::parse(s)).collect();
    match (
        &dst,
        srcs.iter().all(|s| matches!(s, Side::Remote { .. })),
        srcs.iter().all(|s| matches!(s, Side::Local(_))),
    ) {
        (Side::Local(to), true, _) => {
            let mut lease = None;
            let mut paths = Vec::new();
            for s in &srcs {
                if let Side::Remote { lease: l, path } = s {
                    if lease.get_or_insert_with(|| l.clone()) != l {
                        return Err(CliError::usage("cp copies from one lease at a time"));
                    }
                    paths.push(if path.is_empty() {
                        ".".to_string()
                    } else {
                        path.clone()
                    });
                }
            }
            download(ctx, lease.unwrap_or_default(), paths, to, any_path).await
        }
        (Side::Remote { lease, path }, _, true) => {
            let locals: Vec<PathBuf> = srcs
                .iter()
                .filter_map(|s| match s {
                    Side::Local(p) => Some(p.clone()),
                    Side::Remote { .. } => None,
                })
                .collect();
            upload(ctx, lease, path, &locals, any_path).await
        }
        _ => Err(CliError::usage(
            "cp copies between this machine and a lease: the sources on one side, the \
             destination on the other (a remote one is LEASE:PATH, or :PATH for this repo's \
             lease; write ./a:b for a local name with a colon)",
        )),
    }
}

/// Counts bytes on a terminal (a bar without a known total), else nothing.
fn meter(ctx: &Ctx, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if ctx.quiet || ctx.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {what} {{bytes}} ({{binary_bytes_per_sec}}) {{elapsed}}"
    )) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(bar)
}

/// A blocking reader over chunks sent from async code.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Unpacks an archive stream as it arrives (a blocking thread, constant memory) into a
/// staging folder, from which [`Placement::commit`] renames each entry into place.
pub(super) struct Unpacker {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    staging: tempfile::TempDir,
    pub bytes: u64,
}

impl Unpacker {
    /// Starts one, staging in `parent` (made if missing; the destinations' file system
    /// is best, for atomic renames).
    pub(super) fn start(parent: &Path) -> Result<Unpacker, CliError> {
        std::fs::create_dir_all(parent).map_err(|e| {
            CliError::new(exit::SYNC, format!("creating {}: {e}", parent.display()))
        })?;
        let staging = tempfile::Builder::new()
            .prefix(".crabbox-cp.")
            .tempdir_in(parent)
            .map_err(|e| {
                CliError::new(
                    exit::SYNC,
                    format!("a staging folder in {}: {e}", parent.display()),
                )
            })?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        let into = staging.path().to_path_buf();
        let task = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut archive = tar::Archive::new(ChunkReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            });
            archive.set_preserve_permissions(true);
            archive.set_preserve_mtime(true);
            archive.set_overwrite(true);
            archive.unpack(&into)?;
            // Drain: a reader that stopped early must not block the sender.
            Ok(())
        });
        Ok(Unpacker {
            tx: Some(tx),
            task,
            staging,
            bytes: 0,
        })
    }

    /// Hands over the next bytes of the archive.
    pub(super) fn feed(&mut self, data: Vec<u8>) {
        self.bytes += data.len() as u64;
        if let Some(tx) = &self.tx
            && tx.send(data).is_err()
        {
            // The unpacker stopped (its error is told by `finish`).
            self.tx = None;
        }
    }

    /// The archive is complete: waits for the unpacking; answers the staging folder.
    pub(super) async fn finish(mut self) -> Result<tempfile::TempDir, CliError> {
        drop(self.tx.take());
        self.task
            .await
            .map_err(|e| CliError::new(exit::INTERNAL, format!("unpacking: {e}")))?
            .map_err(|e| CliError::new(exit::SYNC, format!("unpacking the files: {e}")))?;
        Ok(self.staging)
    }
}

/// Where each fetched entry goes: (its path in the archive, `<source>/<name>`, and its
/// final path), decided before anything is written.
#[derive(Debug, Default)]
pub(super) struct Placement {
    pub moves: Vec<(PathBuf, PathBuf)>,
}

impl Placement {
    /// `cp`'s rules (as `cp -r`): into an existing folder; else one entry takes the
    /// destination's name; several (or a glob's) go into the destination, made a folder.
    /// A `.` entry is a folder's contents.
    pub(super) fn for_cp(
        to: &Path,
        entries: &[pb::CopyEntry],
        many: bool,
    ) -> Result<Placement, CliError> {
        let is_dir = to.is_dir();
        let into = is_dir || many || entries.len() > 1;
        if into && to.exists() && !is_dir {
            return Err(CliError::usage(format!(
                "{} is not a folder: several files cannot be copied onto it",
                to.display()
            )));
        }
        if !into {
            let parent = to.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.exists()) {
                return Err(CliError::usage(format!(
                    "{}: no such folder to copy into",
                    parent.map_or_else(String::new, |p| p.display().to_string())
                )));
            }
        }
        let moves = entries
            .iter()
            .map(|e| {
                let dest = if e.name == "." || !into {
                    to.to_path_buf()
                } else {
                    to.join(&e.name)
                };
                (staged(e), dest)
            })
            .collect();
        Ok(Placement { moves })
    }

    /// A folder on the destinations' file system to stage in.
    pub(super) fn staging_parent(&self) -> PathBuf {
        self.moves
            .first()
            .map(|(_, to)| {
                to.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            })
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Renames each unpacked entry into place (a folder onto a folder merges).
    pub(super) fn commit(&self, staged: &Path) -> Result<(), CliError> {
        for (from, dest) in &self.moves {
            merge(&staged.join(from), dest).map_err(|e| {
                CliError::new(
                    exit::SYNC,
                    format!("putting {} in place: {e}", dest.display()),
                )
            })?;
        }
        Ok(())
    }
}

/// An entry's path in the archive.
pub(super) fn staged(e: &pb::CopyEntry) -> PathBuf {
    let p = PathBuf::from(e.source.to_string());
    if e.name == "." { p } else { p.join(&e.name) }
}

async fn download(
    ctx: &Ctx,
    lease: String,
    sources: Vec<String>,
    to: &Path,
    any_path: bool,
) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let globbed = sources.iter().any(|s| s.contains(['*', '?', '[']));
    let mut stream = c
        .leases
        .copy_from(pb::CopyFromRequest {
            lease,
            repo_root: ctx.repo(),
            sources: sources.clone(),
            any_path,
        })
        .await?
        .into_inner();
    let header = match stream.next().await {
        Some(Ok(pb::CopyChunk {
            chunk: Some(pb::copy_chunk::Chunk::Header(h)),
        })) => h,
        Some(Err(s)) => return Err(s.into()),
        _ => {
            return Err(CliError::new(
                exit::INTERNAL,
                "the daemon's copy began without a header",
            ));
        }
    };
    if !header.entries.is_empty() {
        let plan = Placement::for_cp(to, &header.entries, sources.len() > 1 || globbed)?;
        let mut unpacker = Unpacker::start(&plan.staging_parent())?;
        let bar = meter(ctx, "copying");
        while let Some(chunk) = stream.next().await {
            if let Some(pb::copy_chunk::Chunk::Data(d)) = chunk?.chunk {
                unpacker.feed(d);
                if let Some(b) = &bar {
                    b.set_position(unpacker.bytes);
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let bytes = unpacker.bytes;
        let staged = unpacker.finish().await?;
        plan.commit(staged.path())?;
        let names: Vec<&str> = header.entries.iter().map(|e| e.name.as_str()).collect();
        ctx.progress(format!(
            "copied {} from {} ({})",
            copied_what(&names),
            header
                .lease
                .as_ref()
                .map_or("the lease", |l| l.slug.as_str()),
            bytesize::ByteSize::b(bytes)
        ));
    }
    if ctx.json {
        super::output::print_json(&serde_json::json!({
            "copied": header.entries.iter().map(|e| &e.name).collect::<Vec<_>>(),
            "missing": header.missing,
            "to": to.display().to_string(),
        }));
    }
    if !header.missing.is_empty() {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "no such file or folder in the lease (relative paths start at {}): {}",
                header.base,
                header.missing.join(", ")
            ),
        ));
    }
    Ok(exit::OK)
}

/// Moves `from` to `to`: a rename (atomic) when `to` is absent or a file; a folder onto
/// a folder merges entry by entry.
fn merge(from: &Path, to: &Path) -> std::io::Result<()> {
    let from_meta = std::fs::symlink_metadata(from)?;
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() && from_meta.is_dir() => {
            for e in std::fs::read_dir(from)? {
                let e = e?;
                merge(&e.path(), &to.join(e.file_name()))?;
            }
            Ok(())
        }
        Ok(m) if m.is_dir() => Err(std::io::Error::other(
            "a folder is there: it is not replaced by a file",
        )),
        Ok(_) if from_meta.is_dir() => Err(std::io::Error::other(
            "a file is there: it is not replaced by a folder",
        )),
        _ => {
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p)?;
            }
            match std::fs::rename(from, to) {
                // Another file system: copied beside the destination, then renamed.
                Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => copy_across(from, to),
                r => r,
            }
        }
    }
}

/// `from` onto another file system at `to`: each file written to a temp name beside its
/// destination and renamed into place (links as links, modes and mtimes kept).
fn copy_across(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, meta.permissions())?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            merge(&e.path(), &to.join(e.file_name()))?;
        }
        return Ok(());
    }
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".crabbox-cp.")
        .tempfile_in(dir)?;
    let staged = tmp.path().to_path_buf();
    if meta.file_type().is_symlink() {
        drop(tmp);
        std::os::unix::fs::symlink(std::fs::read_link(from)?, &staged)?;
    } else {
        std::fs::copy(from, &staged)?;
        let mtime = filetime_of(&meta);
        let f = std::fs::File::options().write(true).open(&staged)?;
        f.set_modified(mtime)?;
        std::fs::set_permissions(&staged, meta.permissions())?;
        tmp.keep().map_err(|e| e.error)?;
    }
    std::fs::rename(&staged, to)
}

fn filetime_of(meta: &std::fs::Metadata) -> std::time::SystemTime {
    meta.modified()
        .unwrap_or_else(|_| std::time::SystemTime::now())
}

async fn upload(
    ctx: &Ctx,
    lease: &str,
    dest: &str,
    locals: &[PathBuf],
    any_path: bool,
) -> Result<i32, CliError> {
    // Everything is checked before the first byte goes.
    let mut names = Vec::new();
    for p in locals {
        std::fs::symlink_metadata(p).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                format!("no such file or folder here: {}", p.display())
            } else {
                format!("cannot read {}: {e}", p.display())
            };
            CliError::new(exit::NOT_FOUND, why)
        })?;
        names.push(entry_name(p)?);
    }
    let single = (locals.len() == 1 && names[0] != ".").then(|| names[0].clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let sources: Vec<(PathBuf, String)> = locals.iter().cloned().zip(names).collect();
    let pack = tokio::task::spawn_blocking(move || pack(&sources, tx));
    let start = pb::CopyToChunk {
        chunk: Some(pb::copy_to_chunk::Chunk::Start(pb::CopyToStart {
            lease: lease.to_string(),
            repo_root: ctx.repo(),
            dest: if dest.is_empty() {
                ".".into()
            } else {
                dest.to_string()
            },
            any_path,
            single_entry: single.unwrap_or_default(),
        })),
    };
    let bar = meter(ctx, "copying");
    let bar2 = bar.clone();
    let data = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |d| {
        if let Some(b) = &bar2 {
            b.inc(d.len() as u64);
        }
        pb::CopyToChunk {
            chunk: Some(pb::copy_to_chunk::Chunk::Data(d)),
        }
    });
    let mut c = ctx.clients().await?;
    let answer = c
        .leases
        .copy_to(tokio_stream::iter([start]).chain(data))
        .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let packed = pack
        .await
        .map_err(|e| CliError::new(exit::INTERNAL, format!("packing: {e}")))?;
    let result = answer?.into_inner();
    packed.map_err(|e| CliError::new(exit::SYNC, format!("packing the files: {e}")))?;
    if ctx.json {
        super::output::print_json(&serde_json::json!({
            "to": result.dest,
            "bytes": result.bytes,
            "lease": result.lease.as_ref().map(super::output::lease_json),
        }));
    } else {
        let names: Vec<String> = locals.iter().map(|p| p.display().to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        ctx.progress(format!(
            "copied {} into {} ({})",
            copied_what(&names),
            result.dest,
            bytesize::ByteSize::b(result.bytes)
        ));
    }
    Ok(exit::OK)
}

/// What a copy copied, for its line: the names of one or two, else how many.
fn copied_what(names: &[&str]) -> String {
    let name = |n: &str| {
        if n == "." {
            "a folder's contents".to_string()
        } else {
            n.to_string()
        }
    };
    match names {
        [one] => name(one),
        [a, b] => format!("{} and {}", name(a), name(b)),
        _ => format!("{} files and folders", names.len()),
    }
}

/// The name a local source has in the archive: its last component (`.` for a folder's
/// contents: `dir/.` or `.`).
fn entry_name(p: &Path) -> Result<String, CliError> {
    let text = p.to_string_lossy();
    if text == "." || text.ends_with("/.") {
        return Ok(".".into());
    }
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| CliError::usage(format!("{}: name a file or folder", p.display())))
}

/// Writes the sources as a tar into `tx` (symlinks kept as links).
fn pack(
    sources: &[(PathBuf, String)],
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> std::io::Result<()> {
    struct ChunkWriter(tokio::sync::mpsc::Sender<Vec<u8>>, Vec<u8>);
    impl std::io::Write for ChunkWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            if self.1.len() >= 256 * 1024 {
                self.flush()?;
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            if !self.1.is_empty() {
                let chunk = std::mem::take(&mut self.1);
                self.0
                    .blocking_send(chunk)
                    .map_err(|_| std::io::Error::other("the copy was stopped"))?;
            }
            Ok(())
        }
    }
    let mut tar = tar::Builder::new(ChunkWriter(tx, Vec::new()));
    tar.follow_symlinks(false);
    for (path, name) in sources {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.is_dir() {
            tar.append_dir_all(if name == "." { "." } else { name }, path)?;
        } else {
            tar.append_path_with_name(path, name)?;
        }
    }
    let mut w = tar.into_inner()?;
    std::io::Write::flush(&mut w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_line_names_one_or_two_and_counts_more() {
        assert_eq!(copied_what(&["a.txt"]), "a.txt");
        assert_eq!(copied_what(&["a", "dir"]), "a and dir");
        assert_eq!(copied_what(&["."]), "a folder's contents");
        assert_eq!(copied_what(&["a", "b", "c"]), "3 files and folders");
    }

    #[test]
    fn sides_are_told_apart_as_docker_cp_does() {
        assert_eq!(
            Side::parse(":target/a.xml"),
            Side::Remote {
                lease: String::new(),
                path: "target/a.xml".into()
            }
        );
        assert_eq!(
            Side::parse("swift-crab:/tmp/x"),
            Side::Remote {
                lease: "swift-crab".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(Side::parse("./a:b"), Side::Local("./a:b".into()));
        assert_eq!(Side::parse("out/report"), Side::Local("out/report".into()));
    }

    #[test]
    fn a_copy_across_file_systems_keeps_modes_times_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let from = d.path().join("from");
        std::fs::create_dir_all(from.join("sub")).expect("mkdir");
        std::fs::write(from.join("sub/f"), "data").expect("w");
        std::fs::set_permissions(from.join("sub/f"), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(981_173_106);
        std::fs::File::options()
            .write(true)
            .open(from.join("sub/f"))
            .and_then(|f| f.set_modified(old))
            .expect("mtime");
        std::os::unix::fs::symlink("sub/f", from.join("ln")).expect("symlink");
        let to = d.path().join("to");
        copy_across(&from, &to).expect("copy");
        assert_eq!(
            std::fs::read_to_string(to.join("sub/f")).expect("r"),
            "data"
        );
        let m = std::fs::metadata(to.join("sub/f")).expect("m");
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        assert_eq!(m.modified().expect("mtime"), old);
        assert_eq!(
            std::fs::read_link(to.join("ln")).expect("link"),
            Path::new("sub/f")
        );
        let stray: Vec<_> = std::fs::read_dir(to.join("sub"))
            .expect("ls")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".crabbox-cp"))
            .collect();
        assert!(stray.is_empty());
    }

    #[test]
    fn a_folder_merges_into_a_folder_and_a_file_replaces_a_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let from = d.path().join("from");
        let to = d.path().join("to");
        std::fs::create_dir_all(from.join("sub")).expect("mkdir");
        std::fs::create_dir_all(to.join("sub")).expect("mkdir");
        std::fs::write(from.join("sub/new"), "new").expect("w");
        std::fs::write(from.join("f"), "fresh").expect("w");
        std::fs::write(to.join("f"), "stale").expect("w");
        std::fs::write(to.join("sub/kept"), "kept").expect("w");
        merge(&from, &to).expect("merge");
        assert_eq!(std::fs::read_to_string(to.join("f")).expect("r"), "fresh");
        assert_eq!(
            std::fs::read_to_string(to.join("sub/new")).expect("r"),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(to.join("sub/kept")).expect("r"),
            "kept"
        );
        // A file never silently replaces a folder.
        std::fs::create_dir_all(d.path().join("x/f")).expect("mkdir");
        let f = d.path().join("f2");
        std::fs::write(&f, "x").expect("w");
        assert!(merge(&f, &d.path().join("x/f")).is_err());
    }
}
