//! Watching a checkout so that an unchanged tree costs no scan: the kernel (inotify, via
//! `notify`) says which paths changed since the last collect, and only those are looked at
//! ([`super::manifest::collect_changes`]).
//!
//! It never answers stale: whenever it cannot be sure it saw everything it says "unknown"
//! and the caller scans. That is: before the first collect; after an overflow, an error or
//! too many changes; when an ignore file (`.gitignore`, `.crabboxignore`,
//! `.git/info/exclude`) or git's index (a checkout, an add, a commit) changed. And before
//! answering it waits until it has read every event the kernel queued before the call (it
//! writes a sentinel file in `.git` and waits for its event: inotify keeps one ordered
//! queue), so a file saved just before `crabbox run` is never missed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use super::manifest::MAX_CHANGES;

/// What the watcher knows.
#[derive(Default)]
struct State {
    /// Root-relative paths (files or folders) changed since the last [`TreeWatch::take`].
    changed: BTreeSet<String>,
    /// Something was missed or invalidates the listing: the next answer is "unknown".
    unknown: bool,
    /// The highest sentinel seen (see [`TreeWatch::take`]).
    sentinel: u64,
    /// The last sentinel written.
    written: u64,
    /// Folders git ignores whole (root-relative, each ending in `/`, sorted, none inside
    /// another), as of the last scan: what happens in them (a build's churn in `target/`)
    /// changes nothing that syncs, so it is not noted.
    ignored: Vec<String>,
}

/// A watch on one checkout (a git work tree).
pub struct TreeWatch {
    _watcher: notify::RecommendedWatcher,
    state: Arc<Mutex<State>>,
    /// Told whenever a sentinel's event has been read.
    arrived: Arc<tokio::sync::Notify>,
    /// The folder sentinels are written in (`.git`).
    git: PathBuf,
}

/// Sentinel files: `.git/crabbox-watch-<n>`, each new, so that the event that says "read
/// up to here" is that file's and no earlier one's.
const SENTINEL_PREFIX: &str = "crabbox-watch-";

/// How long [`TreeWatch::take`] waits for its sentinel before answering "unknown".
const SENTINEL_WAIT: Duration = Duration::from_secs(2);

impl TreeWatch {
    /// Starts watching `root` (recursively). Fails outside a git work tree (the incremental
    /// listing needs git) or when the kernel refuses (e.g. its inotify watch limit).
    pub fn start(root: &Path) -> Result<TreeWatch, String> {
        let git = root.join(".git");
        if !git.is_dir() {
            return Err(format!("{} is not a git work tree's root", root.display()));
        }
        let state: Arc<Mutex<State>> = Arc::default();
        let arrived: Arc<tokio::sync::Notify> = Arc::default();
        let root_buf = root.to_path_buf();
        let handler_state = state.clone();
        let handler_arrived = arrived.clone();
        let git_dir = git.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(mut st) = handler_state.lock() else {
                return;
            };
            match res {
                Ok(event) => {
                    if event.need_rescan() {
                        st.unknown = true;
                    }
                    // Reads (opens, accesses, closes without writing: our own hashing, git
                    // reading its index) change nothing.
                    use notify::event::{AccessKind, AccessMode, EventKind};
                    if matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
                    {
                        return;
                    }
                    for p in &event.paths {
                        if p.parent() == Some(git_dir.as_path())
                            && let Some(n) = p
                                .file_name()
                                .and_then(|n| n.to_str())
                                .and_then(|n| n.strip_prefix(SENTINEL_PREFIX))
                                .and_then(|n| n.parse::<u64>().ok())
                        {
                            st.sentinel = st.sentinel.max(n);
                            handler_arrived.notify_waiters();
                            continue;
                        }
                        note(&mut st, &root_buf, p);
                    }
                }
                Err(_) => st.unknown = true,
            }
        })
        .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
        // Nothing is known until a first scan: the caller scans, then takes from here on.
        if let Ok(mut st) = state.lock() {
            st.unknown = true;
        }
        Ok(TreeWatch {
            _watcher: watcher,
            state,
            arrived,
            git,
        })
    }

    /// What changed since the last call; `None` when unknown (the caller must scan).
    /// Waits until every event queued before the call has been read (without a thread of
    /// its own: the sentinel's file is a few microseconds of the caller's).
    pub async fn take(&self) -> Option<BTreeSet<String>> {
        let n = {
            let mut st = self.state.lock().ok()?;
            st.written += 1;
            st.written
        };
        let path = self.git.join(format!("{SENTINEL_PREFIX}{n}"));
        if std::fs::write(&path, b"").is_err() {
            self.forget();
            return None;
        }
        // Removed at once: its creation is queued already, and either of its two events
        // says "read up to here". Both are then most often read in one wake-up of the
        // watcher's thread, and nothing of ours stays in the user's `.git`, whatever
        // happens next.
        let _ = std::fs::remove_file(&path);
        let arrived = async {
            loop {
                // Listening before looking, so that a sentinel read in between is not
                // missed.
                let told = self.arrived.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if self.state.lock().map_or(true, |s| s.sentinel >= n) {
                    return;
                }
                told.await;
            }
        };
        let timed_out = tokio::time::timeout(SENTINEL_WAIT, arrived).await.is_err();
        let mut st = self.state.lock().ok()?;
        let unknown = timed_out || st.unknown;
        st.unknown = false;
        let changed = std::mem::take(&mut st.changed);
        (!unknown).then_some(changed)
    }

    /// Learns from git which folders it ignores whole (after a scan: the ignore rules are
    /// what they were when it began, or an ignore file's change has made the next answer
    /// "unknown" again). Blocking (one `git ls-files`); when git cannot say, nothing is
    /// taken as ignored.
    pub fn learn_ignored(&self) {
        let Some(root) = self.git.parent() else {
            return;
        };
        let dirs = std::process::Command::new("git")
            .arg("-C")
            .arg(root)
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
        if let Ok(mut st) = self.state.lock() {
            st.ignored = dirs;
        }
    }

    /// Whatever was noted is dropped and the next answer is "unknown" (a collect failed
    /// after a take: what it took must not be lost).
    pub fn forget(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.changed.clear();
            st.unknown = true;
        }
    }
}

/// Notes one changed path.
fn note(st: &mut State, root: &Path, path: &Path) {
    let Ok(rel) = path.strip_prefix(root) else {
        st.unknown = true;
        return;
    };
    let Some(rel) = rel.to_str() else {
        // A name that is not UTF-8: the scan warns about it.
        st.unknown = true;
        return;
    };
    if rel.is_empty() {
        st.unknown = true;
        return;
    }
    if let Some(inside) = rel.strip_prefix(".git/") {
        // (Sentinels are taken out before this.)
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

    fn git(r: &Path, args: &[&str]) {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(r)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "git {args:?}");
    }

    /// A new git work tree holding `a.txt`.
    fn work_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        git(dir.path(), &["init", "-q"]);
        std::fs::write(dir.path().join("a.txt"), "a").expect("write");
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn it_says_what_changed_and_unknown_when_it_cannot_know() {
        let dir = work_tree();
        let r = dir.path();
        let w = TreeWatch::start(r).expect("watch");
        assert_eq!(w.take().await, None, "nothing is known before a first scan");
        assert_eq!(
            w.take().await,
            Some(BTreeSet::new()),
            "nothing changed since"
        );
        // A file saved just before the take is never missed.
        std::fs::write(r.join("a.txt"), "b").expect("write");
        std::fs::create_dir(r.join("d")).expect("mkdir");
        std::fs::write(r.join("d/x"), "x").expect("write");
        let got = w.take().await.expect("known");
        assert!(got.contains("a.txt") && got.contains("d"), "{got:?}");
        // An ignore file or git's index: unknown.
        std::fs::write(r.join(".gitignore"), "*.log\n").expect("write");
        assert_eq!(w.take().await, None);
        git(r, &["add", "a.txt"]);
        assert_eq!(w.take().await, None, "the index changed");
        assert_eq!(w.take().await, Some(BTreeSet::new()));
        // A take given up half-way (its caller dropped at its first wait, nearly always
        // before its event is read) leaves nothing in `.git`, and the next take still
        // waits for its own sentinel.
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::ZERO, w.take()).await;
        }
        let left: Vec<_> = std::fs::read_dir(r.join(".git"))
            .expect("read .git")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(SENTINEL_PREFIX))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::write(r.join("a.txt"), "after").expect("write");
        let got = w.take().await.expect("known");
        assert!(got.contains("a.txt"), "{got:?}");
        // A forgotten take: unknown next.
        std::fs::write(r.join("a.txt"), "c").expect("write");
        w.forget();
        assert_eq!(w.take().await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_in_an_ignored_folder_changes_nothing() {
        let dir = work_tree();
        let r = dir.path();
        std::fs::write(r.join(".gitignore"), "target/\n").expect("write");
        std::fs::create_dir(r.join("target")).expect("mkdir");
        let w = TreeWatch::start(r).expect("watch");
        assert_eq!(w.take().await, None, "nothing is known before a first scan");
        w.learn_ignored();
        // More files than are ever listed one by one, a `.gitignore` of the build's own,
        // and one real change beside them.
        for i in 0..(MAX_CHANGES + 500) {
            std::fs::write(r.join(format!("target/o{i}")), "o").expect("write");
        }
        std::fs::write(r.join("target/.gitignore"), "*\n").expect("write");
        std::fs::write(r.join("a.txt"), "b").expect("write");
        let got = w
            .take()
            .await
            .expect("known: the build's churn is not counted");
        assert_eq!(got, BTreeSet::from(["a.txt".to_string()]));
        // Not ignored any more: unknown, and what git then says is learnt again.
        std::fs::write(r.join(".gitignore"), "").expect("write");
        std::fs::remove_file(r.join("target/.gitignore")).expect("rm");
        assert_eq!(w.take().await, None);
        w.learn_ignored();
        std::fs::write(r.join("target/o1"), "p").expect("write");
        let got = w.take().await.expect("known");
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
            Some(w) => w.take().await,
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
