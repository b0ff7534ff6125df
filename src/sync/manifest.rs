//! Which files a sync sends, and what changed since the last one.
//!
//! The list is `git ls-files --cached --others --exclude-standard` (tracked, plus untracked
//! files git does not ignore); outside git, a walk that honours `.gitignore`. Then, in
//! order: built-in excludes (never dropping a tracked file), config `sync.exclude`, the
//! repo's `.crabboxignore` (gitignore syntax; `!` re-includes), config `sync.include`
//! (which can bring back even ignored files).
//!
//! Hashing reuses the previous manifest's hash when a file's size, mtime, inode and mode
//! are unchanged, as git's index does, so an unchanged tree reads no file contents.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::{Deserialize, Serialize};

use super::SyncError;
use crate::sandbox::archive::plain_relative;

/// Folder or file names never synced unless git tracks them: caches, dependencies, build
/// output and VCS metadata that the sandbox rebuilds itself, and the artifacts runs
/// brought back (`crabbox-artifacts`).
pub const BUILTIN_EXCLUDES: [&str; 12] = [
    ".git",
    "node_modules",
    "target",
    ".venv",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".tox",
    ".direnv",
    ".DS_Store",
    ".crabbox-manifest.json",
    "crabbox-artifacts",
];

/// Size thresholds (SPEC: warn at 50,000 files or 5 GiB, refuse at 150,000 or 20 GiB).
#[derive(Debug, Clone, Copy)]
pub struct SyncLimits {
    pub warn_files: u64,
    pub warn_bytes: u64,
    pub max_files: u64,
    pub max_bytes: u64,
}

impl Default for SyncLimits {
    fn default() -> Self {
        const GIB: u64 = 1 << 30;
        SyncLimits {
            warn_files: 50_000,
            warn_bytes: 5 * GIB,
            max_files: 150_000,
            max_bytes: 20 * GIB,
        }
    }
}

/// What the user configured about syncing.
#[derive(Debug, Clone, Default)]
pub struct SyncRules {
    /// Gitignore-style patterns to leave out (config `sync.exclude`).
    pub exclude: Vec<String>,
    /// Gitignore-style patterns to bring in, even if ignored (config `sync.include`).
    pub include: Vec<String>,
    /// Go past the hard size limit.
    pub force_large: bool,
    pub limits: SyncLimits,
    /// Absolute folders never synced, whatever the rules say: the daemon's own state dir
    /// and socket folder, when a sync root contains them.
    pub never: Vec<std::path::PathBuf>,
    /// Sync the repository's `.git` too (config `sync.git`), for builds that run git.
    pub git: bool,
}

/// One synced file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// blake3 of the content (of the link target for a symlink), hex.
    pub hash: String,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// The link target, for a symlink (kept as a link, never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Stat cache: when these match, the hash is reused without reading the file.
    pub mtime_ns: i64,
    pub ino: u64,
    /// A large file's content-defined chunks (empty for small files and links), so that a
    /// change sends only the chunks it touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<super::delta::Chunk>,
}

/// What a lease holds (or will hold): relative path -> entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, FileEntry>,
}

/// A collected manifest with what was noticed on the way.
#[derive(Debug)]
pub struct Collected {
    pub manifest: Manifest,
    pub total_bytes: u64,
    /// Size-guard warnings and skipped paths, for people.
    pub warnings: Vec<String>,
}

/// The difference between what a lease holds and what it should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// New or changed paths: these go into the archive.
    pub changed: Vec<String>,
    /// Paths to delete: removed ones, and changed ones the lease already had (so that a
    /// stale symlink is replaced, never written through).
    pub remove: Vec<String>,
    /// Paths removed from the checkout (a subset of `remove`), for the stats.
    pub deleted: u64,
}

impl Manifest {
    /// A digest of the whole record (hex BLAKE3 of its JSON), as a synced workdir keeps
    /// it to say what it holds.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex().to_string()
    }

    /// What to send and delete to turn `previous` into `self`.
    pub fn diff(&self, previous: &Manifest) -> Diff {
        let mut d = Diff::default();
        for (path, entry) in &self.files {
            match previous.files.get(path) {
                Some(old) if same_content(old, entry) => {}
                Some(_) => {
                    d.changed.push(path.clone());
                    d.remove.push(path.clone());
                }
                None => d.changed.push(path.clone()),
            }
        }
        for path in previous.files.keys() {
            if !self.files.contains_key(path) {
                d.remove.push(path.clone());
                d.deleted += 1;
            }
        }
        d
    }
}

fn same_content(a: &FileEntry, b: &FileEntry) -> bool {
    a.hash == b.hash && a.mode == b.mode && a.link == b.link
}

/// A listed path with whether git tracks it.
struct Candidate {
    path: String,
    tracked: bool,
}

/// Lists, filters, size-checks and hashes the checkout at `root`.
pub fn collect(
    root: &Path,
    rules: &SyncRules,
    previous: Option<&Manifest>,
) -> Result<Collected, SyncError> {
    let unreadable = |reason: String| SyncError::Unreadable {
        path: root.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(root).map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_dir() {
        return Err(unreadable("not a folder".into()));
    }
    std::fs::read_dir(root).map_err(|e| unreadable(e.to_string()))?;

    let mut warnings = Vec::new();
    let candidates = match git_list(root, false, &mut warnings)? {
        Some(list) => list,
        None => walk_list(root, true, &mut warnings)?,
    };
    let exclude = matcher(root, &rules.exclude)?;
    let include = matcher(root, &rules.include)?;
    let crabboxignore = crabboxignore(root)?;
    let never = never_prefixes(root, rules);
    let inside_never = |path: &str| never.iter().any(|n| path.starts_with(n.as_str()));
    let mut chosen: Vec<String> = Vec::with_capacity(candidates.len());
    let mut seen = HashSet::new();
    for c in candidates {
        if !inside_never(&c.path)
            && keep(&c, &exclude, &crabboxignore, &include)
            && seen.insert(c.path.clone())
        {
            chosen.push(c.path);
        }
    }
    if !rules.include.is_empty() {
        // Includes may bring back files git (or a walk) ignores: list those too.
        let ignored = match git_list(root, true, &mut warnings)? {
            Some(list) => list,
            None => walk_list(root, false, &mut warnings)?,
        };
        for c in ignored {
            if include
                .matched_path_or_any_parents(&c.path, false)
                .is_ignore()
                && seen.insert(c.path.clone())
                && !inside_never(&c.path)
            {
                chosen.push(c.path);
            }
        }
    }

    if rules.git {
        // git's own files, but not its locks (held only while a git command runs).
        for path in git_dir_files(root)? {
            if seen.insert(path.clone()) && !inside_never(&path) {
                chosen.push(path);
            }
        }
    }

    // Stat everything first: the size guard must run before any content is read (and
    // before the caller creates anything that costs money).
    let mut stats = Vec::with_capacity(chosen.len());
    let mut total_bytes = 0u64;
    for path in chosen {
        let full = root.join(&path);
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_file() || m.file_type().is_symlink() => {
                total_bytes += if m.is_file() { m.len() } else { 0 };
                stats.push((path, m));
            }
            // Folders (submodules), sockets, files deleted since git listed them: skipped.
            Ok(_) => warnings.push(format!("skipped {path}: not a file or symlink")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SyncError::Io(format!("reading {}: {e}", full.display()))),
        }
    }
    warnings.extend(size_guard(stats.len() as u64, total_bytes, rules)?);

    let mut files = BTreeMap::new();
    let mut vanished = 0;
    for (path, m) in stats {
        match hash_entry(root, &path, &m, previous.and_then(|p| p.files.get(&path))) {
            Ok(entry) => {
                files.insert(path, entry);
            }
            // Deleted (or replaced) between the listing and the read: the tree is changing
            // under the sync; what is gone is not sent.
            Err(HashError::Vanished) => vanished += 1,
            Err(HashError::Sync(e)) => return Err(e),
        }
    }
    if vanished > 0 {
        warnings.push(format!(
            "skipped {vanished} file(s) that vanished while the checkout was read"
        ));
    }
    Ok(Collected {
        manifest: Manifest { files },
        total_bytes,
        warnings,
    })
}

/// Every file under `root/.git` (root-relative), lock files aside; none outside a work
/// tree whose `.git` is a folder.
fn git_dir_files(root: &Path) -> Result<Vec<String>, SyncError> {
    let git = root.join(".git");
    if !git.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut stack = vec![git];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| SyncError::Io(format!("reading {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "lock") {
                continue;
            }
            if let Some(rel) = path.strip_prefix(root).ok().and_then(|p| p.to_str())
                && plain_relative(rel)
            {
                out.push(rel.to_string());
            }
        }
    }
    Ok(out)
}

/// The daemon's own folders under `root` (`rules.never`), as root-relative prefixes.
fn never_prefixes(root: &Path, rules: &SyncRules) -> Vec<String> {
    rules
        .never
        .iter()
        .filter_map(|p| p.strip_prefix(root).ok())
        .filter_map(|p| p.to_str())
        .filter(|p| !p.is_empty())
        .map(|p| format!("{p}/"))
        .collect()
}

/// At most this many changed paths are listed one by one; more, and a scan is cheaper.
pub const MAX_CHANGES: usize = 2_000;

/// [`collect`] for a checkout known to differ from `base` (an earlier collect under the
/// same rules) only at `changed` paths (files or folders, root-relative, as a watcher
/// reports them): only those are listed (by git), stat-ed and hashed. `None` when it cannot
/// tell that way (outside git, `include` rules, too many changes): the caller scans.
pub fn collect_changes(
    root: &Path,
    rules: &SyncRules,
    base: &Manifest,
    changed: &BTreeSet<String>,
) -> Result<Option<Collected>, SyncError> {
    // With `.git` synced, git's own changes matter, and the watch leaves them out.
    if !rules.include.is_empty() || rules.git || changed.len() > MAX_CHANGES {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    // The topmost changed paths: a folder covers what is below it.
    let mut tops: Vec<&str> = Vec::new();
    for p in changed {
        if !tops
            .last()
            .is_some_and(|t| p.starts_with(&format!("{t}/")) || p == t)
        {
            tops.push(p);
        }
    }
    let mut files = base.files.clone();
    if !tops.is_empty() {
        let Some(candidates) = git_list_in(root, false, &tops, &mut warnings)? else {
            return Ok(None);
        };
        for top in &tops {
            let below = format!("{top}/");
            let gone: Vec<String> = files
                .range(top.to_string()..)
                .map(|(k, _)| k)
                .take_while(|k| k.as_str() == *top || k.starts_with(&below))
                .cloned()
                .collect();
            for k in gone {
                files.remove(&k);
            }
        }
        let exclude = matcher(root, &rules.exclude)?;
        let include = matcher(root, &rules.include)?;
        let crabboxignore = crabboxignore(root)?;
        let never = never_prefixes(root, rules);
        // Stat first: the size guard must refuse before any content is read.
        let mut stats = Vec::new();
        for c in candidates {
            if never.iter().any(|n| c.path.starts_with(n.as_str()))
                || !keep(&c, &exclude, &crabboxignore, &include)
            {
                continue;
            }
            let full = root.join(&c.path);
            match std::fs::symlink_metadata(&full) {
                Ok(m) if m.is_file() || m.file_type().is_symlink() => stats.push((c.path, m)),
                Ok(_) => warnings.push(format!("skipped {}: not a file or symlink", c.path)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SyncError::Io(format!("reading {}: {e}", full.display()))),
            }
        }
        let kept: u64 = files.values().map(|f| f.size).sum();
        let added: u64 = stats
            .iter()
            .filter(|(_, m)| m.is_file())
            .map(|(_, m)| m.len())
            .sum();
        size_guard((files.len() + stats.len()) as u64, kept + added, rules)?;
        let mut vanished = 0;
        for (path, m) in stats {
            match hash_entry(root, &path, &m, base.files.get(&path)) {
                Ok(entry) => {
                    files.insert(path, entry);
                }
                Err(HashError::Vanished) => vanished += 1,
                Err(HashError::Sync(e)) => return Err(e),
            }
        }
        if vanished > 0 {
            warnings.push(format!(
                "skipped {vanished} file(s) that vanished while the checkout was read"
            ));
        }
    }
    let total_bytes = files.values().map(|f| f.size).sum();
    warnings.extend(size_guard(files.len() as u64, total_bytes, rules)?);
    Ok(Some(Collected {
        manifest: Manifest { files },
        total_bytes,
        warnings,
    }))
}

/// SPEC's size guard: warnings past the soft limits, an error past the hard ones unless
/// forced.
pub fn size_guard(files: u64, bytes: u64, rules: &SyncRules) -> Result<Vec<String>, SyncError> {
    let l = rules.limits;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let what = format!("{files} files, {:.2} GiB", gib(bytes));
    if (files >= l.max_files || bytes >= l.max_bytes) && !rules.force_large {
        return Err(SyncError::TooLarge(format!(
            "refusing to sync {what}: the limit is {} files or {:.0} GiB. Exclude what the \
             sandbox does not need (sync.exclude in crabbox.yaml, or .crabboxignore), or pass \
             --force-sync-large",
            l.max_files,
            gib(l.max_bytes)
        )));
    }
    if files >= l.warn_files || bytes >= l.warn_bytes {
        return Ok(vec![format!(
            "large sync: {what}; consider excluding what the sandbox does not need \
             (.crabboxignore)"
        )]);
    }
    Ok(Vec::new())
}

fn keep(
    c: &Candidate,
    exclude: &Gitignore,
    crabboxignore: &Gitignore,
    include: &Gitignore,
) -> bool {
    let mut keep = c.tracked || !builtin_excluded(&c.path);
    if exclude
        .matched_path_or_any_parents(&c.path, false)
        .is_ignore()
    {
        keep = false;
    }
    let m = crabboxignore.matched_path_or_any_parents(&c.path, false);
    if m.is_ignore() {
        keep = false;
    } else if m.is_whitelist() {
        keep = true;
    }
    if include
        .matched_path_or_any_parents(&c.path, false)
        .is_ignore()
    {
        keep = true;
    }
    keep
}

fn builtin_excluded(path: &str) -> bool {
    path.split('/').any(|part| BUILTIN_EXCLUDES.contains(&part))
}

/// A gitignore matcher over config patterns (a "match" means "listed").
fn matcher(root: &Path, patterns: &[String]) -> Result<Gitignore, SyncError> {
    let mut b = GitignoreBuilder::new(root);
    for p in patterns {
        b.add_line(None, p).map_err(|e| SyncError::BadPattern {
            pattern: p.clone(),
            reason: e.to_string(),
        })?;
    }
    b.build().map_err(|e| SyncError::BadPattern {
        pattern: patterns.join(", "),
        reason: e.to_string(),
    })
}

fn crabboxignore(root: &Path) -> Result<Gitignore, SyncError> {
    let path = root.join(".crabboxignore");
    let mut b = GitignoreBuilder::new(root);
    if path.exists()
        && let Some(e) = b.add(&path)
    {
        return Err(SyncError::BadPattern {
            pattern: path.display().to_string(),
            reason: e.to_string(),
        });
    }
    b.build().map_err(|e| SyncError::BadPattern {
        pattern: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// `git ls-files` at `root`; `None` when `root` is not in a git work tree (or git is
/// missing). With `ignored`, lists the ignored untracked files instead.
fn git_list(
    root: &Path,
    ignored: bool,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<Candidate>>, SyncError> {
    git_list_in(root, ignored, &[], warnings)
}

/// `git ls-files` of the checkout, or only of `under` (root-relative files or folders)
/// when given; `None` outside git.
fn git_list_in(
    root: &Path,
    ignored: bool,
    under: &[&str],
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<Candidate>>, SyncError> {
    let inside = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--is-inside-work-tree"])
        .output();
    match inside {
        Ok(o) if o.status.success() && o.stdout.starts_with(b"true") => {}
        _ => return Ok(None),
    }
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(root).args(["ls-files", "-z", "-t"]);
    if ignored {
        cmd.args(["--others", "--ignored", "--exclude-standard"]);
    } else {
        cmd.args(["--cached", "--others", "--exclude-standard"]);
    }
    if !under.is_empty() {
        cmd.arg("--");
        cmd.args(under.iter().map(|p| format!(":(literal){p}")));
    }
    let out = cmd
        .output()
        .map_err(|e| SyncError::Io(format!("running git ls-files in {}: {e}", root.display())))?;
    if !out.status.success() {
        return Err(SyncError::Io(format!(
            "git ls-files failed in {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut list = Vec::new();
    for raw in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        // `-t` puts a status tag and a space before each path: `H ` cached, `? ` other.
        let (tag, path) = match raw {
            [t, b' ', rest @ ..] => (*t, rest),
            _ => continue,
        };
        let Ok(path) = std::str::from_utf8(path) else {
            warnings.push(not_utf8(Path::new(std::ffi::OsStr::from_bytes(path))));
            continue;
        };
        if plain_relative(path) {
            list.push(Candidate {
                path: path.to_string(),
                tracked: tag != b'?',
            });
        }
    }
    Ok(Some(list))
}

/// A walk of `root`. With `filtered`, honours `.gitignore` (even outside git) and skips
/// `.git`; without, lists everything.
fn walk_list(
    root: &Path,
    filtered: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<Candidate>, SyncError> {
    let mut b = ignore::WalkBuilder::new(root);
    b.standard_filters(filtered)
        .hidden(false)
        .require_git(false)
        .follow_links(false);
    if filtered {
        b.filter_entry(|e| e.file_name() != ".git");
    }
    let mut list = Vec::new();
    for entry in b.build() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                warnings.push(format!("skipped: {e}"));
                continue;
            }
        };
        if entry.file_type().is_some_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        match rel.to_str() {
            Some(p) if plain_relative(p) => list.push(Candidate {
                path: p.to_string(),
                tracked: false,
            }),
            Some(_) => {}
            None => warnings.push(not_utf8(rel)),
        }
    }
    Ok(list)
}

/// Why a file could not be hashed.
enum HashError {
    /// It is no longer there.
    Vanished,
    Sync(SyncError),
}

/// The one warning for a path crabbox cannot sync: paths travel as text.
fn not_utf8(rel: &Path) -> String {
    format!(
        "skipped {:?}: its name is not UTF-8, and synced paths must be (rename it to sync it)",
        rel.as_os_str()
    )
}

fn hash_entry(
    root: &Path,
    path: &str,
    m: &std::fs::Metadata,
    previous: Option<&FileEntry>,
) -> Result<FileEntry, HashError> {
    let full = root.join(path);
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            HashError::Vanished
        } else {
            HashError::Sync(SyncError::Io(format!("reading {}: {e}", full.display())))
        }
    };
    let mtime_ns = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    let mode = m.mode() & 0o7777;
    if m.file_type().is_symlink() {
        let target = std::fs::read_link(&full).map_err(io)?;
        let target = target.to_string_lossy().into_owned();
        return Ok(FileEntry {
            hash: blake3::hash(target.as_bytes()).to_hex().to_string(),
            size: 0,
            mode,
            link: Some(target),
            mtime_ns,
            ino: m.ino(),
            chunks: Vec::new(),
        });
    }
    if let Some(prev) = previous
        && prev.link.is_none()
        && prev.size == m.len()
        && prev.mtime_ns == mtime_ns
        && prev.ino == m.ino()
        && prev.mode == mode
    {
        return Ok(prev.clone());
    }
    let file = std::fs::File::open(&full).map_err(io)?;
    let (hash, chunks) = if m.len() >= super::delta::CHUNKED_MIN {
        let (hash, chunks, _) =
            super::delta::hash_chunked(std::io::BufReader::with_capacity(1 << 20, file))
                .map_err(io)?;
        (hash, chunks)
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file).map_err(io)?;
        (hasher.finalize().to_hex().to_string(), Vec::new())
    };
    Ok(FileEntry {
        hash,
        size: m.len(),
        mode,
        link: None,
        mtime_ns,
        ino: m.ino(),
        chunks,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::fs;

    /// `git -C root args...`, which must succeed (the sync module's tests share it).
    pub(in crate::sync) fn git(root: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .expect("git")
            .status
            .success();
        assert!(ok, "git {args:?}");
    }

    fn paths(c: &Collected) -> Vec<&str> {
        c.manifest.files.keys().map(String::as_str).collect()
    }

    #[test]
    fn git_aware_listing_with_every_rule() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = tmp.path();
        fs::create_dir_all(r.join("src")).expect("mkdir");
        fs::create_dir_all(r.join("target/debug")).expect("mkdir");
        fs::create_dir_all(r.join("node_modules/x")).expect("mkdir");
        fs::create_dir_all(r.join("vendor/target")).expect("mkdir");
        fs::write(r.join("src/main.rs"), "fn main(){}").expect("w");
        fs::write(r.join(".gitignore"), "*.log\n").expect("w");
        fs::write(r.join("build.log"), "ignored").expect("w");
        fs::write(r.join("target/debug/out"), "bin").expect("w");
        fs::write(r.join("node_modules/x/i.js"), "js").expect("w");
        fs::write(r.join("vendor/target/tracked.txt"), "keep me").expect("w");
        fs::write(r.join("notes.tmp"), "tmp").expect("w");
        fs::write(r.join("secret.env"), "S=1").expect("w");
        fs::write(r.join("keep.tmp"), "re-included").expect("w");
        fs::write(r.join(".crabboxignore"), "*.tmp\n!keep.tmp\n").expect("w");
        std::os::unix::fs::symlink("/etc/passwd", r.join("outside-link")).expect("ln");
        git(r, &["init", "-q"]);
        git(r, &["add", "src/main.rs", ".gitignore"]);
        git(r, &["add", "-f", "vendor/target/tracked.txt"]);

        let rules = SyncRules {
            exclude: vec!["secret.env".into()],
            include: vec!["build.log".into()],
            ..SyncRules::default()
        };
        let c = collect(r, &rules, None).expect("collect");
        assert_eq!(
            paths(&c),
            vec![
                ".crabboxignore",
                ".gitignore",
                "build.log",
                "keep.tmp",
                "outside-link",
                "src/main.rs",
                "vendor/target/tracked.txt",
            ]
        );
        let link = &c.manifest.files["outside-link"];
        assert_eq!(link.link.as_deref(), Some("/etc/passwd"), "kept as a link");
    }

    #[test]
    fn outside_git_a_walk_honours_gitignore() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = tmp.path();
        fs::write(r.join(".gitignore"), "out/\n").expect("w");
        fs::create_dir_all(r.join("out")).expect("mkdir");
        fs::create_dir_all(r.join("target")).expect("mkdir");
        fs::write(r.join("out/x"), "x").expect("w");
        fs::write(r.join("target/y"), "y").expect("w");
        fs::write(r.join("a.txt"), "a").expect("w");
        let c = collect(r, &SyncRules::default(), None).expect("collect");
        assert_eq!(paths(&c), vec![".gitignore", "a.txt"]);
    }

    #[test]
    fn diff_and_stat_cache() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = tmp.path();
        fs::write(r.join("a"), "1").expect("w");
        fs::write(r.join("b"), "2").expect("w");
        let first = collect(r, &SyncRules::default(), None)
            .expect("collect")
            .manifest;
        let d = first.diff(&Manifest::default());
        assert_eq!(d.changed, vec!["a", "b"]);
        assert!(d.remove.is_empty());

        let again = collect(r, &SyncRules::default(), Some(&first))
            .expect("collect")
            .manifest;
        assert_eq!(
            again.diff(&first),
            Diff::default(),
            "unchanged tree, nothing to send"
        );

        fs::write(r.join("a"), "changed").expect("w");
        fs::remove_file(r.join("b")).expect("rm");
        fs::write(r.join("c"), "3").expect("w");
        let third = collect(r, &SyncRules::default(), Some(&again))
            .expect("collect")
            .manifest;
        let d = third.diff(&again);
        assert_eq!(d.changed, vec!["a", "c"]);
        assert_eq!(d.remove, vec!["a", "b"]);
        assert_eq!(d.deleted, 1);
    }

    #[test]
    fn size_guard_warns_then_refuses_unless_forced() {
        let mut rules = SyncRules::default();
        assert!(size_guard(10, 10, &rules).expect("ok").is_empty());
        assert_eq!(size_guard(50_000, 0, &rules).expect("warn").len(), 1);
        assert_eq!(size_guard(1, 5 << 30, &rules).expect("warn").len(), 1);
        let err = size_guard(150_000, 0, &rules).expect_err("refused");
        assert!(err.to_string().contains("--force-sync-large"), "{err}");
        assert!(size_guard(1, 20 << 30, &rules).is_err());
        rules.force_large = true;
        assert_eq!(size_guard(150_000, 0, &rules).expect("forced").len(), 1);
    }

    #[test]
    fn unreadable_root_is_a_clear_error() {
        let err = collect(Path::new("/nonexistent/repo"), &SyncRules::default(), None)
            .expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/repo") && msg.contains("check"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_that_vanishes_is_skipped_and_the_daemons_folders_never_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::write(root.join("gone"), "x").expect("write");
        let m = fs::symlink_metadata(root.join("gone")).expect("meta");
        fs::remove_file(root.join("gone")).expect("rm");
        assert!(matches!(
            hash_entry(root, "gone", &m, None),
            Err(HashError::Vanished)
        ));
        fs::create_dir_all(root.join("state/sandboxes")).expect("mkdir");
        fs::write(root.join("state/crabbox.redb"), "db").expect("write");
        fs::write(root.join("state/sandboxes/x"), "x").expect("write");
        fs::write(root.join("keep.txt"), "k").expect("write");
        let rules = SyncRules {
            never: vec![root.join("state")],
            ..Default::default()
        };
        let c = collect(root, &rules, None).expect("collect");
        let paths: Vec<&String> = c.manifest.files.keys().collect();
        assert_eq!(paths, vec!["keep.txt"]);
    }

    #[test]
    fn a_name_that_is_not_utf8_is_named_in_a_warning_in_both_walks() {
        use std::os::unix::ffi::OsStrExt;
        for in_git in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path();
            fs::write(root.join("ok.txt"), "ok").expect("write");
            let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
            fs::write(root.join(odd), "odd").expect("write");
            if in_git {
                git(root, &["init", "-q"]);
                git(root, &["add", "."]);
            }
            let c = collect(root, &SyncRules::default(), None).expect("collect");
            assert_eq!(c.manifest.files.keys().collect::<Vec<_>>(), vec!["ok.txt"]);
            assert!(
                c.warnings
                    .iter()
                    .any(|w| w.contains("caf\\xE9.txt") && w.contains("not UTF-8")),
                "in git: {in_git}: {:?}",
                c.warnings
            );
        }
    }

    #[test]
    fn plain_relative_paths_only() {
        assert!(plain_relative("a/b"));
        for bad in ["", "/a", "../a", "a/../b", "./a"] {
            assert!(!plain_relative(bad), "{bad}");
        }
    }
}
