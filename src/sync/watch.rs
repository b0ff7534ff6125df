//! Watching a checkout so that an unchanged tree costs no scan: the kernel (inotify) says
//! which paths changed since the last collect, and only those are looked at
//! ([`super::manifest::collect_changes`]).
//!
//! It never answers stale: whenever it cannot be sure it saw everything it says "unknown"
//! and the caller scans. That is: before the first collect; after an overflow, an error or
//! too many changes; when an ignore file (`.gitignore`, `.crabboxignore`,
//! `.git/info/exclude`) or git's index (a checkout, an add, a commit) changed; and for good
//! once a folder could not be watched. Before answering it reads, itself, every event the
//! kernel has queued: inotify queues a change's event in the call that makes it, so a file
//! saved just before `crabbox run` is never missed, and no thread has to be woken and
//! waited for (a task reads the queue in between, so that a build's churn between two runs
//! does not overflow it).
//!
//! Our own recursive watch over the `inotify` crate, not the `notify` crate's: `notify`
//! reads the queue on a thread of its own, so an answer had to wait for a marker event to
//! come round through that thread (a file written in `.git`, two thread wake-ups: 0.11 ms
//! of every warm run).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::manifest::MAX_CHANGES;

/// What the watcher knows.
#[derive(Default)]
struct State {
    /// Root-relative paths (files or folders) changed since the last [`TreeWatch::take`].
    changed: BTreeSet<String>,
    /// Something was missed or invalidates the listing: the next answer is "unknown".
    unknown: bool,
    /// A folder could not be watched (the kernel's watch limit), or the checkout itself
    /// went: every answer is "unknown" from here on.
    broken: bool,
    /// Folders git ignores whole (root-relative, each ending in `/`, sorted, none inside
    /// another), as of the last scan: what happens in them (a build's churn in `target/`)
    /// changes nothing that syncs, so it is not noted.
    ignored: Vec<String>,
}

/// A watch on one checkout (a git work tree).
pub struct TreeWatch {
    root: PathBuf,
    inner: Arc<Mutex<Inner>>,
    /// Reads the queue between takes; ends with the watch.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for TreeWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The inotify instance, its watches and what its events said. Events are read and
/// applied under one lock, so whoever takes sees everything read so far.
struct Inner {
    inotify: inotify::Inotify,
    root: PathBuf,
    /// Each watched folder, root-relative (the root itself is "").
    dirs: HashMap<inotify::WatchDescriptor, String>,
    state: State,
    buffer: Vec<u8>,
}

/// What a folder's watch reports: every change to what is in it (a read is none).
fn mask() -> inotify::WatchMask {
    use inotify::WatchMask as M;
    M::MODIFY
        | M::ATTRIB
        | M::CREATE
        | M::DELETE
        | M::MOVED_FROM
        | M::MOVED_TO
        | M::DELETE_SELF
        | M::MOVE_SELF
        | M::DONT_FOLLOW
        | M::ONLYDIR
        | M::EXCL_UNLINK
}

/// Is the folder at `rel` one to watch? All of the work tree, but of git's own folders
/// only `.git` (its index) and `.git/info` (its exclude file); a nested repository's
/// `.git` not at all.
fn watched(rel: &str) -> bool {
    let mut parts = rel.split('/');
    match parts.next() {
        Some(".git") => matches!(parts.next(), None | Some("info")) && parts.next().is_none(),
        _ => !rel.split('/').skip(1).any(|p| p == ".git"),
    }
}

impl Inner {
    /// Watches the folder at `rel` and every folder below it (symlinks not followed).
    /// Fails when the kernel refuses one (its watch limit).
    fn watch_tree(&mut self, rel: &str) -> std::io::Result<()> {
        let mut todo = vec![rel.to_string()];
        while let Some(rel) = todo.pop() {
            let full = if rel.is_empty() {
                self.root.clone()
            } else {
                self.root.join(&rel)
            };
            let wd = match self.inotify.watches().add(&full, mask()) {
                Ok(wd) => wd,
                // Gone, or not a folder any more, by now: its parent's events say so.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ENOENT | nix::libc::ENOTDIR)
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            // (A folder moved within the tree keeps its watch: its new path replaces the old.)
            self.dirs.insert(wd, rel.clone());
            let Ok(entries) = std::fs::read_dir(&full) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    // A name that is not UTF-8: the scan warns about it, and nothing
                    // below it is noted.
                    self.state.unknown = true;
                    continue;
                };
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if watched(&child) {
                    todo.push(child);
                }
            }
        }
        Ok(())
    }

    /// Stops watching the folder at `rel` and everything below it.
    fn unwatch_tree(&mut self, rel: &str) {
        let below = format!("{rel}/");
        let gone: Vec<inotify::WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.as_str() == rel || d.starts_with(&below))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.watches().remove(wd);
        }
    }

    /// Reads and applies every event queued so far.
    fn drain(&mut self) {
        use inotify::EventMask as E;
        loop {
            let mut buffer = std::mem::take(&mut self.buffer);
            let events = match self.inotify.read_events(&mut buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.buffer = buffer;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    self.buffer = buffer;
                    continue;
                }
                Err(_) => {
                    self.buffer = buffer;
                    self.state.unknown = true;
                    return;
                }
            };
            for event in events {
                if event.mask.contains(E::Q_OVERFLOW) {
                    self.state.unknown = true;
                    continue;
                }
                if event.mask.contains(E::IGNORED) {
                    self.dirs.remove(&event.wd);
                    continue;
                }
                let Some(dir) = self.dirs.get(&event.wd) else {
                    continue;
                };
                let Some(name) = event.name else {
                    // The folder itself: the checkout deleted or moved away, for good;
                    // another folder's end is told by its parent's event.
                    if dir.is_empty() && event.mask.intersects(E::DELETE_SELF | E::MOVE_SELF) {
                        self.state.broken = true;
                    }
                    continue;
                };
                let Some(name) = name.to_str() else {
                    self.state.unknown = true;
                    continue;
                };
                // (One string per event, the path itself: a build's burst of them is read here.)
                let rel = if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                };
                if event.mask.contains(E::ISDIR) {
                    if event.mask.contains(E::MOVED_FROM) {
                        self.unwatch_tree(&rel);
                    } else if event.mask.intersects(E::CREATE | E::MOVED_TO)
                        && watched(&rel)
                        && self.watch_tree(&rel).is_err()
                    {
                        self.state.broken = true;
                    }
                }
                note(&mut self.state, &rel);
            }
            self.buffer = buffer;
        }
    }
}

impl TreeWatch {
    /// Starts watching `root` (recursively). Fails outside a git work tree (the incremental
    /// listing needs git), off Linux, or when the kernel refuses (e.g. its inotify watch
    /// limit). Needs a tokio runtime (its reader task).
    pub fn start(root: &Path) -> Result<TreeWatch, String> {
        use std::os::fd::AsFd;
        if !root.join(".git").is_dir() {
            return Err(format!("{} is not a git work tree's root", root.display()));
        }
        let cannot = |e: std::io::Error| format!("cannot watch {}: {e}", root.display());
        let inotify = inotify::Inotify::init().map_err(cannot)?;
        // The reader task's own descriptor of the queue (a dup: the same queue, its
        // readiness registered with tokio for as long as the task holds it).
        let queue_fd = inotify.as_fd().try_clone_to_owned().map_err(cannot)?;
        let mut inner = Inner {
            inotify,
            root: root.to_path_buf(),
            dirs: HashMap::new(),
            state: State::default(),
            buffer: vec![0; 64 * 1024],
        };
        inner.watch_tree("").map_err(cannot)?;
        // Nothing is known until a first scan: the caller scans, then takes from here on.
        inner.state.unknown = true;
        // SAFETY: the AsyncFd owns `queue_fd`, which stays open (and the same) until it is
        // dropped.
        let queue = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                queue_fd,
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| cannot(e.into()))?;
        let inner = Arc::new(Mutex::new(inner));
        let reader = {
            let inner = inner.clone();
            tokio::spawn(async move {
                while let Ok(mut ready) = queue.readable().await {
                    match inner.lock() {
                        Ok(mut inner) => inner.drain(),
                        Err(_) => return,
                    }
                    ready.clear_ready();
                }
            })
        };
        Ok(TreeWatch {
            root: root.to_path_buf(),
            inner,
            reader,
        })
    }

    /// What changed since the last call; `None` when unknown (the caller must scan). Reads
    /// every event the kernel queued before the call first.
    pub fn take(&self) -> Option<BTreeSet<String>> {
        let mut inner = self.inner.lock().ok()?;
        inner.drain();
        let st = &mut inner.state;
        let unknown = st.unknown || st.broken;
        st.unknown = false;
        let changed = std::mem::take(&mut st.changed);
        (!unknown).then_some(changed)
    }

    /// Learns from git which folders it ignores whole (after a scan: the ignore rules are
    /// what they were when it began, or an ignore file's change has made the next answer
    /// "unknown" again). Blocking (one `git ls-files`); when git cannot say, nothing is
    /// taken as ignored.
    pub fn learn_ignored(&self) {
        let dirs = std::process::Command::new("git")
            .arg("-C")
            .arg(&self.root)
            .args([
                "ls-files",
                "-z",
                "--others",
                "--ignored",
                "--exclude-standard",
                "--directory",
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                let mut dirs: Vec<String> = o
                    .stdout
                    .split(|b| *b == 0)
                    .filter(|p| p.ends_with(b"/"))
                    .filter_map(|p| std::str::from_utf8(p).ok().map(str::to_string))
                    .collect();
                dirs.sort();
                dirs
            })
            .unwrap_or_default();
        if let Ok(mut inner) = self.inner.lock() {
            inner.state.ignored = dirs;
        }
    }

    /// Whatever was noted is dropped and the next answer is "unknown" (a collect failed
    /// after a take: what it took must not be lost).
    pub fn forget(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.state.changed.clear();
            inner.state.unknown = true;
        }
    }
}

/// Notes one changed path (root-relative).
fn note(st: &mut State, rel: &str) {
    if rel.is_empty() {
        st.unknown = true;
        return;
    }
    if let Some(inside) = rel.strip_prefix(".git/") {
        // git's own files do not sync; its index and ignore list decide what does.
        if inside == "index" || inside == "info/exclude" {
            st.unknown = true;
        }
        return;
    }
    if rel == ".git" {
        st.unknown = true;
        return;
    }
    if in_ignored(&st.ignored, rel) {
        // (A `.gitignore` in there too: git reads none below a folder it ignores.)
        return;
    }
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name == ".gitignore" || name == ".crabboxignore" {
        st.unknown = true;
        return;
    }
    if st.changed.len() >= MAX_CHANGES {
        // A build or a checkout touching thousands of files: a scan is cheaper.
        st.unknown = true;
        st.changed.clear();
        return;
    }
    if !st.unknown {
        st.changed.insert(rel.to_string());
    }
}

/// Is `rel` inside one of `ignored` (sorted folders ending in `/`, none inside another)?
/// The only candidate is the greatest one not after it.
fn in_ignored(ignored: &[String], rel: &str) -> bool {
    let at = ignored.partition_point(|d| d.as_str() <= rel);
    at > 0 && rel.starts_with(ignored[at - 1].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::tests::git;

    #[test]
    fn paths_inside_ignored_folders_are_found() {
        let ignored: Vec<String> = ["a/b/", "node_modules/", "target/"]
            .map(String::from)
            .to_vec();
        for (rel, inside) in [
            ("target/debug/x", true),
            ("target", false),
            ("targets/x", false),
            ("a/b/c", true),
            ("a/bz", false),
            ("a/b", false),
            ("a/c/b/x", false),
            ("node_modules/.bin/y", true),
            ("src/lib.rs", false),
            ("", false),
        ] {
            assert_eq!(in_ignored(&ignored, rel), inside, "{rel}");
        }
        assert!(!in_ignored(&[], "target/x"));
    }

    /// A new git work tree holding `a.txt`.
    fn work_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        git(dir.path(), &["init", "-q"]);
        std::fs::write(dir.path().join("a.txt"), "a").expect("write");
        dir
    }

    fn set(paths: &[&str]) -> BTreeSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn it_says_what_changed_and_unknown_when_it_cannot_know() {
        let dir = work_tree();
        let r = dir.path();
        let w = TreeWatch::start(r).expect("watch");
        assert_eq!(w.take(), None, "nothing is known before a first scan");
        assert_eq!(w.take(), Some(BTreeSet::new()), "nothing changed since");
        // A file saved just before the take is never missed.
        std::fs::write(r.join("a.txt"), "b").expect("write");
        std::fs::create_dir(r.join("d")).expect("mkdir");
        std::fs::write(r.join("d/x"), "x").expect("write");
        let got = w.take().expect("known");
        assert!(got.contains("a.txt") && got.contains("d"), "{got:?}");
        // The new folder is watched from then on.
        std::fs::write(r.join("d/y"), "y").expect("write");
        assert_eq!(w.take(), Some(set(&["d/y"])));
        // A folder moved within the tree: both paths, and what then happens in it under
        // its new one.
        std::fs::rename(r.join("d"), r.join("e")).expect("mv");
        assert_eq!(w.take(), Some(set(&["d", "e"])));
        std::fs::write(r.join("e/x"), "x2").expect("write");
        assert_eq!(w.take(), Some(set(&["e/x"])));
        // Moved out of the tree: gone, and nothing of it is noted any more.
        let outside = tempfile::tempdir().expect("outside");
        std::fs::rename(r.join("e"), outside.path().join("e")).expect("mv out");
        assert_eq!(w.take(), Some(set(&["e"])));
        std::fs::write(outside.path().join("e/x"), "x3").expect("write");
        assert_eq!(w.take(), Some(BTreeSet::new()));
        // What git does in its own folder is not the tree's (a commit's objects)...
        std::fs::write(r.join(".git/ORIG_HEAD"), "x").expect("write");
        assert_eq!(w.take(), Some(BTreeSet::new()));
        // ... but an ignore file or git's index makes it unknown.
        std::fs::write(r.join(".gitignore"), "*.log\n").expect("write");
        assert_eq!(w.take(), None);
        git(r, &["add", "a.txt"]);
        assert_eq!(w.take(), None, "the index changed");
        std::fs::write(r.join(".git/info/exclude"), "*.tmp\n").expect("write");
        assert_eq!(w.take(), None, "git's exclude file changed");
        assert_eq!(w.take(), Some(BTreeSet::new()));
        // A forgotten take: unknown next.
        std::fs::write(r.join("a.txt"), "c").expect("write");
        w.forget();
        assert_eq!(w.take(), None);
        assert_eq!(w.take(), Some(BTreeSet::new()));
        // Between two takes the queue is read by the watch's own task: many more changes
        // than it holds (16,384 by default) do not overflow it when they come over time.
        for i in 0..40 {
            for j in 0..500 {
                std::fs::write(r.join(format!("f{j}")), format!("{i}")).expect("write");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let got = w.take().expect("known: nothing overflowed");
        assert_eq!(got.len(), 500);
        // The checkout moved away: unknown for good.
        let moved = outside.path().join("moved");
        std::fs::rename(r, &moved).expect("mv the checkout");
        assert_eq!(w.take(), None);
        assert_eq!(w.take(), None);
        std::fs::rename(&moved, r).expect("mv it back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_in_an_ignored_folder_changes_nothing() {
        let dir = work_tree();
        let r = dir.path();
        std::fs::write(r.join(".gitignore"), "target/\n").expect("write");
        std::fs::create_dir(r.join("target")).expect("mkdir");
        let w = TreeWatch::start(r).expect("watch");
        assert_eq!(w.take(), None, "nothing is known before a first scan");
        w.learn_ignored();
        // More files than are ever listed one by one, a `.gitignore` of the build's own,
        // and one real change beside them.
        for i in 0..(MAX_CHANGES + 500) {
            std::fs::write(r.join(format!("target/o{i}")), "o").expect("write");
        }
        std::fs::write(r.join("target/.gitignore"), "*\n").expect("write");
        std::fs::write(r.join("a.txt"), "b").expect("write");
        let got = w.take().expect("known: the build's churn is not counted");
        assert_eq!(got, BTreeSet::from(["a.txt".to_string()]));
        // Not ignored any more: unknown, and what git then says is learnt again.
        std::fs::write(r.join(".gitignore"), "").expect("write");
        std::fs::remove_file(r.join("target/.gitignore")).expect("rm");
        assert_eq!(w.take(), None);
        w.learn_ignored();
        std::fs::write(r.join("target/o1"), "p").expect("write");
        let got = w.take().expect("known");
        assert!(got.contains("target/o1"), "{got:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkout_left_idle_is_no_longer_watched_unless_in_use() {
        let dir = work_tree();
        let r = dir.path();
        let rules = crate::sync::SyncRules::default();
        let c = Checkouts::default();
        let first = c.collect(r, rules.clone(), || None).await.expect("collect");
        assert_eq!(c.count(), 1);
        let now = Instant::now();
        assert_eq!(c.prune(now, IDLE_WATCH, |_| false), 0, "just used");
        let later = now + IDLE_WATCH;
        assert_eq!(c.prune(later, IDLE_WATCH, |p| p == r), 0, "claimed");
        assert_eq!(c.prune(later, IDLE_WATCH, |_| false), 1, "idle");
        assert_eq!(c.count(), 0);
        // Used again: watched again, and what it finds is right (a scan, a new record).
        std::fs::write(r.join("b.txt"), "b").expect("write");
        let again = c.collect(r, rules.clone(), || None).await.expect("collect");
        assert_eq!(c.count(), 1);
        assert_eq!(first.manifest.files.len() + 1, again.manifest.files.len());
        let unchanged = c.collect(r, rules, || None).await.expect("collect");
        assert_eq!(unchanged.generation, again.generation);
    }
}

/// The checkouts this daemon syncs, each watched (when it can be) with what its last
/// collect found: an unchanged checkout is collected without a scan, and a lease known to
/// hold exactly that needs no sync at all.
#[derive(Default)]
pub struct Checkouts {
    map: dashmap::DashMap<PathBuf, Arc<Checkout>>,
}

/// What the last collect of a checkout found, and under which rules.
struct Last {
    rules: String,
    manifest: Arc<super::Manifest>,
    total_bytes: u64,
    /// Changes whenever what the checkout holds changes.
    generation: u64,
}

struct Checkout {
    watch: Option<TreeWatch>,
    last: Arc<tokio::sync::Mutex<Option<Last>>>,
    /// The generation each lease was last synced with, by this daemon.
    synced: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// When a collect last used it ([`Checkouts::prune`]).
    used: std::sync::Mutex<Instant>,
}

/// How long a checkout that no live lease claims stays watched after its last collect: a
/// fresh run soon after another still finds it watched; one left for longer holds no
/// inotify watches and reads none of its events (a local build's churn in it).
pub const IDLE_WATCH: Duration = Duration::from_secs(15 * 60);

/// A collect ([`super::Collected`], its manifest shared with the checkout's record), and
/// the generation of what it found ([`Checkouts::in_sync`]).
pub struct Collect {
    pub manifest: Arc<super::Manifest>,
    pub total_bytes: u64,
    pub warnings: Vec<String>,
    pub generation: u64,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

impl Checkouts {
    /// The checkout's record, made (and its watch started, off the async threads: a big
    /// tree takes a while to watch) on first use.
    async fn checkout(&self, root: &Path) -> Arc<Checkout> {
        if let Some(c) = self.map.get(root) {
            return c.clone();
        }
        let dir = root.to_path_buf();
        let watch = tokio::task::spawn_blocking(move || {
            TreeWatch::start(&dir)
                .inspect_err(|why| tracing::debug!(%why, "not watching; every sync scans"))
                .ok()
        })
        .await
        .ok()
        .flatten();
        // Two first collects at once: the first record in wins, the other watch is dropped.
        self.map
            .entry(root.to_path_buf())
            .or_insert_with(|| {
                Arc::new(Checkout {
                    watch,
                    last: Arc::default(),
                    synced: Default::default(),
                    used: std::sync::Mutex::new(Instant::now()),
                })
            })
            .clone()
    }

    /// Collects the checkout at `root` ([`super::manifest::collect`]): from what changed
    /// since its last collect when its watch can say, else by a scan (with what `cache`
    /// loads, what the lease holds, as the stat cache). Collects of one checkout go one at
    /// a time.
    pub async fn collect(
        &self,
        root: &Path,
        rules: super::SyncRules,
        cache: impl FnOnce() -> Option<super::Manifest> + Send + 'static,
    ) -> Result<Collect, crate::error::Error> {
        let checkout = self.checkout(root).await;
        if let Ok(mut used) = checkout.used.lock() {
            *used = Instant::now();
        }
        let mut last = checkout.last.clone().lock_owned().await;
        let root = root.to_path_buf();
        let key = format!(
            "{:?}|{:?}|{:?}|{}|{}",
            rules.exclude, rules.include, rules.never, rules.force_large, rules.git
        );
        let changed = match &checkout.watch {
            Some(w) => w.take(),
            None => None,
        };
        // Nothing changed: what the checkout's record says, shared (no thread, no disk).
        if let (Some(changed), Some(l)) = (&changed, last.as_ref().filter(|l| l.rules == key))
            && changed.is_empty()
        {
            let warnings =
                super::manifest::size_guard(l.manifest.files.len() as u64, l.total_bytes, &rules)
                    .map_err(crate::error::Error::from)?;
            return Ok(Collect {
                manifest: l.manifest.clone(),
                total_bytes: l.total_bytes,
                warnings,
                generation: l.generation,
            });
        }
        tokio::task::spawn_blocking(move || {
            let same_rules = last.as_ref().filter(|l| l.rules == key);
            let result = (|| {
                if let (Some(changed), Some(l)) = (&changed, same_rules)
                    && let Some(c) =
                        super::manifest::collect_changes(&root, &rules, &l.manifest, changed)?
                {
                    return Ok(c);
                }
                let cache = cache().or_else(|| last.as_ref().map(|l| (*l.manifest).clone()));
                let scanned = super::manifest::collect(&root, &rules, cache.as_ref());
                if let (Ok(_), Some(w)) = (&scanned, &checkout.watch) {
                    w.learn_ignored();
                }
                scanned
            })();
            match result {
                Ok(collected) => {
                    // The same as before (a scan of an unchanged tree): the same generation.
                    let generation = match last.as_ref() {
                        Some(l) if l.rules == key && *l.manifest == collected.manifest => {
                            l.generation
                        }
                        _ => next_generation(),
                    };
                    let manifest = Arc::new(collected.manifest);
                    *last = Some(Last {
                        rules: key,
                        manifest: manifest.clone(),
                        total_bytes: collected.total_bytes,
                        generation,
                    });
                    Ok(Collect {
                        manifest,
                        total_bytes: collected.total_bytes,
                        warnings: collected.warnings,
                        generation,
                    })
                }
                Err(e) => {
                    // What was taken must not be lost: the next collect scans.
                    *last = None;
                    if let Some(w) = &checkout.watch {
                        w.forget();
                    }
                    Err(crate::error::Error::from(e))
                }
            }
        })
        .await
        .map_err(|e| crate::error::Error::Internal(format!("sync task: {e}")))?
    }

    /// Stops watching, and forgets, the checkouts no collect used for `idle` before `now`,
    /// unless `in_use` keeps them (a live lease claims them, a pool seeds them); answers how
    /// many. The next collect of one watches it again, after a scan. Blocking: a watch
    /// ends its thread as it goes.
    pub fn prune(&self, now: Instant, idle: Duration, in_use: impl Fn(&Path) -> bool) -> usize {
        let stale = |root: &Path, c: &Checkout| {
            !in_use(root)
                && c.used
                    .lock()
                    .is_ok_and(|u| now.saturating_duration_since(*u) >= idle)
        };
        let roots: Vec<PathBuf> = self
            .map
            .iter()
            .filter(|e| stale(e.key(), e.value()))
            .map(|e| e.key().clone())
            .collect();
        // Removed one at a time and dropped outside the map's lock (a collect that holds
        // the checkout keeps it until it is done).
        roots
            .into_iter()
            .filter_map(|root| self.map.remove_if(&root, |root, c| stale(root, c)))
            .count()
    }

    /// How many checkouts are watched (or known, when they cannot be).
    #[cfg(test)]
    fn count(&self) -> usize {
        self.map.len()
    }

    /// Does `lease` hold exactly the checkout's `generation` (it was synced with it by this
    /// daemon, and nothing changed since)?
    pub fn in_sync(&self, root: &Path, lease: &str, generation: u64) -> bool {
        self.map.get(root).is_some_and(|c| {
            c.synced
                .lock()
                .is_ok_and(|s| s.get(lease) == Some(&generation))
        })
    }

    /// Records that `lease` now holds the checkout's `generation` (`None`: unknown), and
    /// nothing of any other checkout (a lease is synced from one repo at a time).
    pub fn mark_synced(&self, root: &Path, lease: &str, generation: Option<u64>) {
        for c in self.map.iter() {
            if let Ok(mut s) = c.synced.lock() {
                match generation {
                    Some(g) if c.key() == root => s.insert(lease.to_string(), g),
                    _ => s.remove(lease),
                };
            }
        }
    }
}
