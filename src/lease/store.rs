//! The embedded transactional store (redb): leases, their sync manifests, run history and
//! the daemon's identity. Every write is one committed transaction, so a crash leaves either
//! the old or the new record, never half of one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::record::LeaseRecord;
use crate::error::Error;
use crate::sync::Manifest;

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// One finished run, kept for history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub lease_id: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    /// The command as a person would read it (env values are never stored).
    pub command: String,
    pub exit_code: i32,
    pub files_uploaded: u64,
    /// What `--download`/`--artifact-glob` brought back (names as fetched).
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// What they asked for and found nothing.
    #[serde(default)]
    pub missing_artifacts: Vec<String>,
}

/// The store. Cheap to share behind an `Arc`; redb serializes writers itself.
pub struct Store {
    db: Database,
    /// Lazy writes not yet in the database (see [`Durability::Lazy`]).
    pending: Mutex<Pending>,
    /// Held by the durable commit being made off the async worker ([`Store::durably`]).
    committing: Mutex<()>,
}

/// What lazy writes left for the next commit: the newest record of each lease (with the
/// number of the write that put it), and runs. An entry stays until a commit holds it, so
/// that a read during that commit still finds it.
#[derive(Default, Clone)]
struct Pending {
    writes: u64,
    leases: HashMap<String, (u64, LeaseRecord)>,
    /// By their key in [`RUNS`].
    runs: BTreeMap<String, RunRecord>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.runs.is_empty()
    }

    /// Forgets what `committed` (a copy of this, taken before a commit that succeeded)
    /// held, but not what was written since.
    fn committed(&mut self, committed: &Pending) {
        for (id, (write, _)) in &committed.leases {
            if self.leases.get(id).is_some_and(|(now, _)| now == write) {
                self.leases.remove(id);
            }
        }
        for key in committed.runs.keys() {
            self.runs.remove(key);
        }
    }
}

fn run_key(run: &RunRecord) -> String {
    format!("{}/{:016}", run.lease_id, run.started_ms)
}

/// How a write reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk when the write returns: what a lost daemon must find (a lease, its
    /// sandbox, its release).
    Now,
    /// Kept in memory (every read of the store sees it at once) and committed with the
    /// next durable write or [`Store::flush`] (the daemon's flusher, within
    /// [`LAZY_FLUSH_EVERY`]), off the path of the run that made it: bookkeeping (a lease's
    /// phase and last use, run history) that a crash of the daemon may lose, which then
    /// brings the store back to its last durable write.
    Lazy,
}

/// How soon the daemon makes lazy writes durable.
pub const LAZY_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// redb's page cache.
const STORE_CACHE: usize = 4 * 1024 * 1024;

/// Runs `blocking` (work that waits on the disk) so that it does not hold up an async
/// worker of a multi-threaded runtime; elsewhere (a current-thread runtime, a blocking
/// thread, no runtime) it simply runs.
fn off_worker<T>(blocking: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(blocking)
        }
        _ => blocking(),
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl Store {
    /// Opens (creating) the database file and its tables.
    pub fn open(path: &Path) -> Result<Store, Error> {
        // A bounded page cache: the daemon reads its leases once at start and keeps them
        // in memory itself (redb's default would let the cache grow with the file).
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE)
            .create(path)
            .map_err(|e| Error::Store(format!("opening {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(LEASES).map_err(err)?;
        tx.open_table(MANIFESTS).map_err(err)?;
        tx.open_table(RUNS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Store {
            db,
            pending: Mutex::default(),
            committing: Mutex::default(),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic under this lock leaves whole entries (each is one insert).
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One durable transaction: the lazy writes so far, then what `write` adds (so a
    /// record written durably is never overwritten by an older lazy one). When it fails,
    /// the lazy writes stay for the next one.
    ///
    /// A durable commit waits on the disk (an fsync: ~1 ms here, far more on a slow or busy
    /// disk). On the daemon's runtime the first one in runs in place of its async worker
    /// ([`tokio::task::block_in_place`]: the worker's other tasks go on on another thread
    /// meanwhile). One that comes while another is being made waits where it is: redb
    /// makes them one at a time anyway, and a thread handed the worker for each waiting
    /// one would grow the daemon by a thread (its stack, its allocator cache) per commit in
    /// flight (16 creates at once: 19 threads and +5..15 MiB at 10,000 leases).
    fn durably<T>(
        &self,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let commit = || {
            let tx = self.db.begin_write().map_err(err)?;
            let taken = self.pending().clone();
            let out = Self::put_pending(&tx, &taken)
                .and_then(|()| write(&tx))
                .and_then(|out| tx.commit().map_err(err).map(|()| out))?;
            self.pending().committed(&taken);
            Ok(out)
        };
        let alone = match self.committing.try_lock() {
            Ok(guard) => guard,
            // (A panic during an earlier commit poisoned the lock; it guards no data.)
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return commit(),
        };
        let out = off_worker(commit);
        drop(alone);
        out
    }

    fn put_pending(tx: &redb::WriteTransaction, pending: &Pending) -> Result<(), Error> {
        if !pending.leases.is_empty() {
            let mut t = tx.open_table(LEASES).map_err(err)?;
            for (id, (_, lease)) in &pending.leases {
                let bytes = serde_json::to_vec(lease).map_err(err)?;
                t.insert(id.as_str(), bytes.as_slice()).map_err(err)?;
            }
        }
        if !pending.runs.is_empty() {
            let mut t = tx.open_table(RUNS).map_err(err)?;
            for (key, run) in &pending.runs {
                let bytes = serde_json::to_vec(run).map_err(err)?;
                t.insert(key.as_str(), bytes.as_slice()).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Is a lazy write not yet durable?
    pub fn unflushed(&self) -> bool {
        !self.pending().is_empty()
    }

    /// Makes every lazy write so far durable (one durable commit); nothing to do when there
    /// is none. Answers whether there was.
    pub fn flush(&self) -> Result<bool, Error> {
        if !self.unflushed() {
            return Ok(false);
        }
        self.durably(|_| Ok(())).map(|()| true)
    }

    /// Opens the store at `path`; a store that cannot be used (an empty file, a file redb
    /// refuses or panics on, a table that cannot be read whole) is never silently replaced:
    /// it is kept aside as `crabbox.redb.damaged-<unix ms>` and a new store is made. The
    /// second value says what happened, for the log; leases the old store held come back
    /// from their sandboxes' labels (the registry's orphan scan adopts them).
    pub fn open_or_set_aside(path: &Path) -> Result<(Store, Option<String>), Error> {
        let problem = match std::fs::metadata(path) {
            Err(_) => None, // no store yet: a first start (or a lost file: adopted later)
            Ok(m) if m.len() == 0 => Some("the file is empty".to_string()),
            Ok(_) => match Self::open_checked(path) {
                Ok(store) => return Ok((store, None)),
                Err(why) => Some(why),
            },
        };
        let Some(why) = problem else {
            return Ok((Store::open(path)?, None));
        };
        let aside = path.with_file_name(format!(
            "{}.damaged-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "crabbox.redb".into()),
            crate::clock::now_ms()
        ));
        std::fs::rename(path, &aside).map_err(|e| {
            Error::Store(format!(
                "the store {} cannot be used ({why}) and could not be moved aside to {}: {e}; \
                 move it away yourself and start crabboxd again",
                path.display(),
                aside.display()
            ))
        })?;
        let store = Store::open(path)?;
        Ok((
            store,
            Some(format!(
                "the store {} could not be used ({why}); it was kept aside as {} and a new one \
                 made: leases come back from their sandboxes' labels",
                path.display(),
                aside.display()
            )),
        ))
    }

    /// Opens and reads every table whole, catching redb's panics on damaged pages.
    fn open_checked(path: &Path) -> Result<Store, String> {
        let path = path.to_path_buf();
        let opened = std::panic::catch_unwind(move || -> Result<Store, Error> {
            let store = Store::open(&path)?;
            store.check()?;
            Ok(store)
        });
        match opened {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(format!(
                "the database engine failed reading it: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic")
            )),
        }
    }

    /// Reads every table whole (values are not parsed: a record that does not parse is
    /// skipped with a warning where it is used).
    fn check(&self) -> Result<(), Error> {
        let tx = self.db.begin_read().map_err(err)?;
        for table in [LEASES, MANIFESTS, RUNS] {
            let t = tx.open_table(table).map_err(err)?;
            for row in t.iter().map_err(err)? {
                row.map_err(err)?;
            }
        }
        let t = tx.open_table(META).map_err(err)?;
        for row in t.iter().map_err(err)? {
            row.map_err(err)?;
        }
        Ok(())
    }

    /// This daemon's id, made on first use and kept for good (sandbox `owner` label). It
    /// lives in `id_file` (beside the store) and in the store: either one brings it back.
    pub fn daemon_id_kept_in(&self, id_file: &Path) -> Result<String, Error> {
        let from_file = std::fs::read_to_string(id_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| s.starts_with("cbxd_"));
        let id = match from_file {
            Some(id) => {
                self.set_daemon_id(&id)?;
                id
            }
            None => self.daemon_id()?,
        };
        if std::fs::read_to_string(id_file)
            .map(|s| s.trim() != id)
            .unwrap_or(true)
        {
            crate::files::write_private(id_file, format!("{id}\n").as_bytes())
                .map_err(|e| Error::Store(format!("writing {}: {e}", id_file.display())))?;
        }
        Ok(id)
    }

    fn set_daemon_id(&self, id: &str) -> Result<(), Error> {
        self.durably(|tx| {
            let mut t = tx.open_table(META).map_err(err)?;
            let current = t
                .get("daemon_id")
                .map_err(err)?
                .map(|v| v.value().to_string());
            if current.as_deref() != Some(id) {
                if let Some(other) = current {
                    tracing::warn!(store = %other, file = %id, "the store and the daemon-id file disagree; the file wins");
                }
                t.insert("daemon_id", id).map_err(err)?;
            }
            Ok(())
        })
    }

    /// This daemon's id, made on first use and kept for good (sandbox `owner` label).
    pub fn daemon_id(&self) -> Result<String, Error> {
        self.durably(|tx| {
            let mut t = tx.open_table(META).map_err(err)?;
            let existing = t
                .get("daemon_id")
                .map_err(err)?
                .map(|v| v.value().to_string());
            Ok(match existing {
                Some(id) => id,
                None => {
                    let id = crate::ids::new_daemon_id();
                    t.insert("daemon_id", id.as_str()).map_err(err)?;
                    id
                }
            })
        })
    }

    pub fn put_lease(&self, lease: &LeaseRecord) -> Result<(), Error> {
        self.put_lease_with(lease, Durability::Now)
    }

    pub fn put_lease_with(&self, lease: &LeaseRecord, durability: Durability) -> Result<(), Error> {
        if durability == Durability::Lazy {
            let mut pending = self.pending();
            pending.writes += 1;
            let write = pending.writes;
            pending
                .leases
                .insert(lease.id.clone(), (write, lease.clone()));
            return Ok(());
        }
        let started = std::time::Instant::now();
        let bytes = serde_json::to_vec(lease).map_err(err)?;
        let done = self.durably(|tx| {
            tx.open_table(LEASES)
                .map_err(err)?
                .insert(lease.id.as_str(), bytes.as_slice())
                .map_err(err)
                .map(drop)
        });
        crate::metrics::store_write(started.elapsed());
        done
    }

    pub fn get_lease(&self, id: &str) -> Result<Option<LeaseRecord>, Error> {
        if let Some((_, lease)) = self.pending().leases.get(id) {
            return Ok(Some(lease.clone()));
        }
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(LEASES).map_err(err)?;
        match t.get(id).map_err(err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(err)?)),
            None => Ok(None),
        }
    }

    /// Every lease the store holds, oldest first. A record that cannot be parsed is
    /// skipped with a warning rather than failing the daemon's start.
    pub fn all_leases(&self) -> Result<Vec<LeaseRecord>, Error> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(LEASES).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match serde_json::from_slice::<LeaseRecord>(v.value()) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(lease = k.value(), error = %e, "skipping unreadable lease record")
                }
            }
        }
        // Each lazy write replaces its stored record (one look-up each: 10,000 leases).
        let pending = self.pending();
        let mut newer: HashMap<&str, &LeaseRecord> = pending
            .leases
            .iter()
            .map(|(id, (_, lease))| (id.as_str(), lease))
            .collect();
        for r in &mut out {
            if let Some(lease) = newer.remove(r.id.as_str()) {
                *r = lease.clone();
            }
        }
        out.extend(newer.into_values().cloned());
        drop(pending);
        out.sort_by_key(|r| r.created_at_ms);
        Ok(out)
    }

    pub fn put_manifest(&self, lease_id: &str, m: &Manifest) -> Result<(), Error> {
        let bytes = serde_json::to_vec(m).map_err(err)?;
        self.durably(|tx| {
            tx.open_table(MANIFESTS)
                .map_err(err)?
                .insert(lease_id, bytes.as_slice())
                .map_err(err)
                .map(drop)
        })
    }

    pub fn get_manifest(&self, lease_id: &str) -> Result<Option<Manifest>, Error> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(MANIFESTS).map_err(err)?;
        match t.get(lease_id).map_err(err)? {
            Some(v) => Ok(serde_json::from_slice(v.value()).ok()),
            None => Ok(None),
        }
    }

    pub fn delete_manifest(&self, lease_id: &str) -> Result<(), Error> {
        self.durably(|tx| {
            tx.open_table(MANIFESTS)
                .map_err(err)?
                .remove(lease_id)
                .map_err(err)
                .map(drop)
        })
    }

    /// Keeps a finished run (lazily: history, see [`Durability::Lazy`]).
    pub fn add_run(&self, run: &RunRecord) -> Result<(), Error> {
        self.pending().runs.insert(run_key(run), run.clone());
        Ok(())
    }

    /// The newest `limit` runs of every lease, newest first.
    pub fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>, Error> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(RUNS).map_err(err)?;
        let mut out: Vec<RunRecord> = Vec::new();
        for row in t.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            if let Ok(r) = serde_json::from_slice(v.value()) {
                out.push(r);
            }
        }
        // (A run both committed and still pending, during a commit, is counted once.)
        let pending = self.pending();
        out.retain(|r| !pending.runs.contains_key(&run_key(r)));
        out.extend(pending.runs.values().cloned());
        drop(pending);
        out.sort_by_key(|r| std::cmp::Reverse(r.started_ms));
        out.truncate(limit);
        Ok(out)
    }

    /// The runs of one lease, oldest first.
    pub fn runs(&self, lease_id: &str) -> Result<Vec<RunRecord>, Error> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(RUNS).map_err(err)?;
        let start = format!("{lease_id}/");
        let end = format!("{lease_id}0");
        let mut out = BTreeMap::new();
        for row in t.range(start.as_str()..end.as_str()).map_err(err)? {
            let (k, v) = row.map_err(err)?;
            if let Ok(r) = serde_json::from_slice(v.value()) {
                out.insert(k.value().to_string(), r);
            }
        }
        let pending = self.pending();
        for (k, r) in pending.runs.range(start..end) {
            out.insert(k.clone(), r.clone());
        }
        Ok(out.into_values().collect())
    }
}

impl Drop for Store {
    /// A store closed in order keeps its lazy writes (only a crash loses them).
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "could not write the store's last lazy writes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::record::LeaseState;

    #[test]
    fn leases_manifests_runs_survive_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("db.redb");
        let mut lease = LeaseRecord::sample(LeaseState::Ready);
        lease.keep = true;
        let daemon_id;
        {
            let s = Store::open(&path).expect("open");
            daemon_id = s.daemon_id().expect("id");
            s.put_lease(&lease).expect("put");
            s.put_manifest(&lease.id, &Manifest::default())
                .expect("manifest");
            s.add_run(&RunRecord {
                lease_id: lease.id.clone(),
                started_ms: 5,
                ended_ms: 6,
                command: "true".into(),
                exit_code: 0,
                files_uploaded: 1,
                artifacts: vec!["report.xml".into()],
                missing_artifacts: Vec::new(),
            })
            .expect("run");
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.daemon_id().expect("id"), daemon_id);
        assert_eq!(s.get_lease(&lease.id).expect("get"), Some(lease.clone()));
        assert_eq!(s.all_leases().expect("all").len(), 1);
        assert!(s.get_manifest(&lease.id).expect("m").is_some());
        assert_eq!(s.runs(&lease.id).expect("runs").len(), 1);
        assert!(s.runs("cbx_ffffffffffff").expect("runs").is_empty());
        s.delete_manifest(&lease.id).expect("delete");
        assert!(s.get_manifest(&lease.id).expect("m").is_none());
    }

    /// What a kill -9 of the store at `path` leaves is what its file holds: a copy of it
    /// (`name`, beside it), reopened.
    fn after_crash(path: &Path, name: &str) -> Store {
        let copy = path.with_file_name(name);
        std::fs::copy(path, &copy).expect("copy");
        Store::open(&copy).expect("reopen the copy")
    }

    /// A finished run of `lease` that started at `started_ms`.
    fn run_of(lease: &LeaseRecord, started_ms: u64) -> RunRecord {
        RunRecord {
            lease_id: lease.id.clone(),
            started_ms,
            ended_ms: started_ms + 1,
            command: format!("run {started_ms}"),
            exit_code: 0,
            files_uploaded: 0,
            artifacts: Vec::new(),
            missing_artifacts: Vec::new(),
        }
    }

    #[test]
    fn a_crash_loses_only_lazy_writes_and_a_flush_keeps_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("db.redb");
        let after_crash = |name: &str| after_crash(&path, name);
        let s = Store::open(&path).expect("open");
        let ready = LeaseRecord::sample(LeaseState::Ready);
        s.put_lease(&ready).expect("durable");
        let mut running = ready.clone();
        running.state = LeaseState::Running;
        s.put_lease_with(&running, Durability::Lazy).expect("lazy");
        s.add_run(&run_of(&ready, 5)).expect("run");
        // The live store sees its lazy writes at once.
        assert_eq!(s.get_lease(&ready.id).expect("get"), Some(running.clone()));
        let crashed = after_crash("crash1.redb");
        assert_eq!(
            crashed.get_lease(&ready.id).expect("get"),
            Some(ready.clone())
        );
        assert!(crashed.runs(&ready.id).expect("runs").is_empty());
        // Flushed: durable. A second flush has nothing to do.
        assert!(s.flush().expect("flush"));
        assert!(!s.flush().expect("flush again"));
        let flushed = after_crash("crash2.redb");
        assert_eq!(flushed.get_lease(&ready.id).expect("get"), Some(running));
        assert_eq!(flushed.runs(&ready.id).expect("runs").len(), 1);
    }

    #[test]
    fn a_durable_write_carries_the_lazy_ones_before_it_and_is_never_overwritten_by_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("db.redb");
        let after_crash = |name: &str| after_crash(&path, name);
        let s = Store::open(&path).expect("open");
        let a = LeaseRecord::sample(LeaseState::Ready);
        let mut b = LeaseRecord::sample(LeaseState::Ready);
        b.id = "cbx_bbbbbbbbbbbb".into();
        b.created_at_ms = a.created_at_ms + 1;
        s.put_lease(&a).expect("a");
        s.put_lease(&b).expect("b");
        s.add_run(&run_of(&a, 10)).expect("run");
        s.flush().expect("flush");
        // Lazily: a running, a second run of a; then b released durably.
        let mut running = a.clone();
        running.state = LeaseState::Running;
        s.put_lease_with(&running, Durability::Lazy).expect("lazy");
        s.add_run(&run_of(&a, 20)).expect("run");
        let starts = |runs: Vec<RunRecord>| runs.iter().map(|r| r.started_ms).collect::<Vec<_>>();
        assert_eq!(starts(s.runs(&a.id).expect("runs")), [10, 20]);
        assert_eq!(starts(s.recent_runs(5).expect("recent")), [20, 10]);
        let all = s.all_leases().expect("all");
        assert_eq!(
            all.iter().map(|l| l.state).collect::<Vec<_>>(),
            [LeaseState::Running, LeaseState::Ready]
        );
        let mut released = b.clone();
        released.state = LeaseState::Released;
        s.put_lease(&released).expect("durable");
        assert!(!s.unflushed(), "the durable write took the lazy ones");
        let crashed = after_crash("crash.redb");
        assert_eq!(crashed.get_lease(&a.id).expect("a"), Some(running.clone()));
        assert_eq!(crashed.get_lease(&b.id).expect("b"), Some(released.clone()));
        assert_eq!(starts(crashed.runs(&a.id).expect("runs")), [10, 20]);
        // A lazy write then a durable one of the same lease: the durable one stays, in the
        // store and after the next flush.
        let mut lazily = released.clone();
        lazily.user_labels.insert("older".into(), "yes".into());
        s.put_lease_with(&lazily, Durability::Lazy).expect("lazy");
        let mut durably = released.clone();
        durably.user_labels.insert("newer".into(), "yes".into());
        s.put_lease(&durably).expect("durable");
        assert_eq!(s.get_lease(&b.id).expect("b"), Some(durably.clone()));
        assert!(!s.flush().expect("nothing left"));
        assert_eq!(
            after_crash("crash2.redb").get_lease(&b.id).expect("b"),
            Some(durably)
        );
    }

    /// The daemon's runtime (one async worker): durable writes made at once all land, and
    /// only the first in hands the worker to another thread (one thread per write in
    /// flight would grow the daemon with every burst of creates).
    #[test]
    fn durable_writes_at_once_all_land_without_a_thread_each() {
        fn threads() -> usize {
            std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("db.redb");
        let s = std::sync::Arc::new(Store::open(&path).expect("open"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let before = threads();
        let most = rt.block_on(async {
            let tasks: Vec<_> = (0..32)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let mut lease = LeaseRecord::sample(LeaseState::Ready);
                        lease.id = format!("cbx_{i:012x}");
                        s.put_lease(&lease).expect("durable");
                        threads()
                    })
                })
                .collect();
            let mut most = 0;
            for t in tasks {
                most = most.max(t.await.expect("task"));
            }
            most
        });
        drop(rt);
        assert!(
            most <= before + 3,
            "{before} threads before, {most} during 32 durable writes"
        );
        let crashed = after_crash(&path, "copy.redb");
        assert_eq!(crashed.all_leases().expect("all").len(), 32);
    }

    #[test]
    fn an_empty_or_damaged_store_is_set_aside_and_the_daemon_id_survives() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("crabbox.redb");
        let id_file = tmp.path().join("daemon-id");
        let id = {
            let (s, note) = Store::open_or_set_aside(&path).expect("first");
            assert!(note.is_none(), "a first start is no damage");
            s.put_lease(&LeaseRecord::sample(LeaseState::Ready))
                .expect("put");
            s.daemon_id_kept_in(&id_file).expect("id")
        };
        // Emptied: kept aside, a new store, the same id (from the file).
        std::fs::write(&path, b"").expect("truncate");
        let (s, note) = Store::open_or_set_aside(&path).expect("reopen");
        assert!(note.expect("said").contains("empty"));
        assert_eq!(s.daemon_id_kept_in(&id_file).expect("id"), id);
        assert!(s.all_leases().expect("all").is_empty());
        drop(s);
        // Garbage: kept aside too.
        std::fs::write(&path, vec![0x5a; 70_000]).expect("garbage");
        let (s, note) = Store::open_or_set_aside(&path).expect("reopen");
        assert!(note.is_some());
        assert_eq!(s.daemon_id_kept_in(&id_file).expect("id"), id);
        let aside = std::fs::read_dir(tmp.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
            .count();
        assert!(aside >= 1, "the damaged files are kept");
        // The id file lost: the store still knows it.
        std::fs::remove_file(&id_file).expect("rm");
        assert_eq!(s.daemon_id_kept_in(&id_file).expect("id"), id);
        assert!(id_file.exists());
    }
}
