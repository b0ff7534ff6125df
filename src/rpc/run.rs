//! The Run use case: resolve (or create) the lease, sync the checkout, run the command,
//! stream its output, release a fresh lease at the end unless kept.
//!
//! It runs as its own task, not in the gRPC handler (dropped when the client leaves) and not
//! in the lease actor (whose mailbox must stay free): the lease is asked for each move
//! (prepare, begin, finish) and its step function decides; this task does the slow work
//! with what the lease lends it. Leaving the stream cancels the command.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use super::wire::{acquire_spec, lease_pb, sync_pb};
use super::{Api, validate_repo_root};
use crate::clock::now_ms;
use crate::config::DELETE_GUARD_DEFAULT;
use crate::error::{Error, echo};
use crate::lease::ops::exec::Execution;
use crate::lease::ops::sync::{SyncJob, SyncProgress, SyncReport};
use crate::lease::record::FreshRun;
use crate::lease::state::{Readiness, readiness};
use crate::lease::store::RunRecord;
use crate::lease::{LeaseHandle, LeaseMsg, LeaseRecord, LeaseState, Phase};
use crate::pb;
use crate::pb::run_event::Event as RunEv;
use crate::provider::{ExecExit, ExecOutput, ExecSpec, Input, PtySize};
use crate::registry::index::Resolved;
use crate::sync::SyncRules;
use crate::sync::watch::Collect;

/// Where a run's events go (the gRPC response stream).
pub type EventTx = mpsc::Sender<Result<pb::RunEvent, Status>>;

/// How often a running command touches its lease.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);

/// How long the end of a fresh run waits for its lease's release.
const RELEASE_WAIT: Duration = Duration::from_secs(60);

/// The client left the stream.
struct Gone;

/// Runs `req` and streams its events to `tx`, feeding the command's stdin from `stdin` when
/// given; never panics on bad input.
/// The span a run works in; it names its lease once the run has one (for `crabbox -v`).
pub fn span() -> tracing::Span {
    tracing::debug_span!("run", lease = tracing::field::Empty)
}

pub async fn run(
    api: Arc<Api>,
    req: pb::RunRequest,
    tx: EventTx,
    stdin: Option<mpsc::Receiver<Input>>,
) {
    let direct = api
        .handed
        .take_within(&req.direct_output, crate::direct::RECEIVE_WITHIN)
        .await
        .unwrap_or_default();
    let mut run = Run {
        api,
        tx: tx.clone(),
        req,
        direct,
        lease: None,
        fresh: false,
        stdin,
        timings: Vec::new(),
        held: Default::default(),
    };
    let outcome = tokio::select! {
        r = run.go() => Some(r),
        // The client left: dropping `go` cancels the command (the execution's drop guard)
        // and hands the lease back to ready (the phase guard).
        () = tx.closed() => None,
    };
    let ended = match &outcome {
        Some(Ok(x)) if x.stalled => "stalled",
        Some(Ok(x)) if x.timed_out => "timeout",
        Some(Ok(x)) if !x.signal.is_empty() => "signal",
        Some(Ok(_)) => "exit",
        Some(Err(_)) => "error",
        None => "cancelled",
    };
    crate::metrics::run(
        ended,
        Duration::from_millis(match &outcome {
            Some(Ok(x)) => x.elapsed_ms,
            _ => 0,
        }),
    );
    let failed = !matches!(outcome, Some(Ok(ref exit)) if exit.code == 0);
    let keep = run.req.keep || (failed && run.req.keep_on_failure);
    match outcome {
        Some(Ok(mut exit)) => {
            // A fresh lease is gone before the exit is told: the command's end is the
            // lease's end, as a person reading the exit expects.
            let released = std::time::Instant::now();
            run.end_fresh(keep, true).await;
            exit.timings = std::mem::take(&mut run.timings);
            if run.fresh && !keep {
                exit.timings.push(pb::PhaseTiming {
                    phase: "release".into(),
                    ms: released.elapsed().as_millis() as u64,
                });
            }
            let _ = run.emit(RunEv::Exit(exit)).await;
        }
        Some(Err(e)) => {
            // An error is told at once (after the lines held for it); a fresh lease's
            // release goes on in the daemon (a lease that failed may take its provider a
            // while to delete).
            let _ = run.flush_held().await;
            let _ = tx.send(Err(Status::from(e))).await;
            run.end_fresh(keep, false).await;
        }
        None => {
            if let Some(h) = &run.lease {
                tracing::info!(lease = %h.record().id, "client left the run; command cancelled");
            }
            run.end_fresh(keep, false).await;
        }
    }
}

struct Run {
    api: Arc<Api>,
    tx: EventTx,
    req: pb::RunRequest,
    /// The client's own stdout/stderr, when it handed them over: given to the command,
    /// or dropped with the run (a pipe's reader then sees its end).
    direct: crate::direct::DirectOutput,
    lease: Option<LeaseHandle>,
    /// The lease was created for this run.
    fresh: bool,
    /// The command's stdin (and terminal sizes), from the client (RunWithInput).
    stdin: Option<mpsc::Receiver<Input>>,
    /// Where the time went, phase by phase.
    timings: Vec<pb::PhaseTiming>,
    /// Events the client needs no sooner than the next one (a ready lease's line, a
    /// sync's result): held and sent with it ([`Run::hold`]).
    held: std::sync::Mutex<Vec<RunEv>>,
}

/// Sends `Finish` to the lease when a phase ends, however it ends (error, client gone).
struct PhaseGuard(LeaseHandle);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        self.0.tell(LeaseMsg::Finish);
    }
}

impl Run {
    /// Sends `event`, after any held ones.
    async fn emit(&self, event: RunEv) -> Result<(), Gone> {
        self.flush_held().await?;
        self.send(event).await
    }

    async fn send(&self, event: RunEv) -> Result<(), Gone> {
        self.tx
            .send(Ok(pb::RunEvent { event: Some(event) }))
            .await
            .map_err(|_| Gone)
    }

    /// Keeps `event` for the next one sent, so that they reach the client together: on a
    /// warm run the lease, sync and start lines are then one message of the daemon and
    /// one wake-up of the CLI, not three. Only for events whose next one comes soon (a
    /// step that may take long says so with a phase or progress, which sends them).
    fn hold(&self, event: RunEv) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }

    /// Sends the held events.
    async fn flush_held(&self) -> Result<(), Gone> {
        let held = std::mem::take(
            &mut *self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for event in held {
            self.send(event).await?;
        }
        Ok(())
    }

    /// Records that `phase` took since `since`.
    fn took(&mut self, phase: &str, since: std::time::Instant) {
        self.timings.push(pb::PhaseTiming {
            phase: phase.into(),
            ms: since.elapsed().as_millis() as u64,
        });
    }

    /// Runs a sync, telling the client how its upload goes: when it begins, every 250 ms
    /// while its figures change (at least every second while it lasts, also when they do
    /// not: all sent and waiting for the sandbox to unpack), and when it is done.
    async fn with_upload_progress<T>(
        &self,
        job: impl std::future::Future<Output = T>,
        progress: &SyncProgress,
    ) -> T {
        let mut job = std::pin::pin!(job);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut told: Option<(u64, u64, u64, u64)> = None;
        let mut told_at = std::time::Instant::now();
        let began = std::time::Instant::now();
        let elapsed_ms = || began.elapsed().as_millis() as u64;
        loop {
            tokio::select! {
                out = &mut job => {
                    // Its end, if it got as far as sending (all of it: the sync succeeded).
                    if let Some((files, deleted, total, _)) = progress.now() {
                        let _ = self.emit(RunEv::SyncProgress(pb::SyncProgress {
                            files, deleted, bytes_total: total, bytes_sent: total, done: true,
                            elapsed_ms: elapsed_ms(),
                        })).await;
                    }
                    return out;
                }
                _ = tick.tick() => {
                    let now = progress.now();
                    if let Some((files, deleted, total, sent)) = now
                        && (now != told || told_at.elapsed() >= Duration::from_secs(1))
                    {
                        told = now;
                        told_at = std::time::Instant::now();
                        let _ = self.emit(RunEv::SyncProgress(pb::SyncProgress {
                            files, deleted, bytes_total: total, bytes_sent: sent, done: false,
                            elapsed_ms: elapsed_ms(),
                        })).await;
                    }
                }
            }
        }
    }

    async fn phase(&self, text: impl Into<String>) {
        let _ = self.emit(RunEv::Phase(text.into())).await;
    }

    async fn go(&mut self) -> Result<pb::Exit, Error> {
        let started = now_ms();
        if let Some(s) = &self.req.script {
            if self.req.shell {
                return Err(Error::InvalidArgument(
                    "--script runs a script file: --shell does not go with it".into(),
                ));
            }
            if s.body.is_empty() {
                return Err(Error::InvalidArgument("the script is empty".into()));
            }
            if s.body.len() > 16 * 1024 * 1024 {
                return Err(Error::InvalidArgument(
                    "the script is over 16 MiB: copy large files with `crabbox cp`, and run a small script"
                        .into(),
                ));
            }
        }
        if self.req.argv.is_empty() && !self.req.sync_only && self.req.script.is_none() {
            return Err(Error::InvalidArgument(
                "no command to run: put it after `--`, for example `crabbox run -- cargo test`"
                    .into(),
            ));
        }
        for name in self.req.env.keys() {
            validate_env_name(name)?;
        }
        let term = match self.req.term.as_str() {
            "" => "xterm-256color",
            t if t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()) => t,
            t => {
                return Err(Error::InvalidArgument(format!(
                    "term {} is not a terminal type: use a name such as xterm-256color",
                    echo(t)
                )));
            }
        }
        .to_string();
        let repo_root = self.req.repo_root.clone();
        validate_repo_root(&repo_root)?;
        // `.` and `./x` mean the checkout and x below it.
        let workdir = if self.req.workdir.starts_with('/') {
            self.req.workdir.clone()
        } else {
            self.req
                .workdir
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect::<Vec<_>>()
                .join("/")
        };
        if !workdir.is_empty()
            && !workdir.starts_with('/')
            && !crate::sandbox::archive::plain_relative(&workdir)
        {
            return Err(Error::InvalidArgument(format!(
                "workdir {} must be a path below the checkout (no `..`) or an absolute path in \
                 the sandbox",
                echo(&workdir)
            )));
        }
        let sync_opts = self.req.sync.clone().unwrap_or_default();

        // 1. The lease this run would use, without creating anything yet.
        let existing = if !self.req.lease.is_empty() {
            match self.api.resolve(&self.req.lease)? {
                Resolved::Live(h) => Some(h),
                Resolved::Stored(r) => {
                    return Err(r.not_usable("run without --id to get a new one"));
                }
            }
        } else if !repo_root.is_empty() {
            self.api.registry.index.claimed_by(&repo_root)
        } else {
            None
        };

        // 2. Collect the checkout first: the size guard must refuse before anything that
        // costs money is created. What the lease holds is read from the store only when it
        // is needed: as the stat cache of a scan, and as the base of the diff later.
        let mut collected = None;
        let manifest_started = std::time::Instant::now();
        if !sync_opts.skip {
            if repo_root.is_empty() {
                return Err(Error::InvalidArgument(
                    "nothing to sync: no repo root was sent (use --no-sync to run without one)"
                        .into(),
                ));
            }
            let rules = sync_rules(&self.api, &sync_opts);
            let store = self.api.store.clone();
            let lease_id = existing.as_ref().map(|h| h.record().id);
            let cache = move || {
                let id = lease_id?;
                store.get_manifest(&id).ok().flatten()
            };
            let c = self
                .api
                .checkouts
                .collect(Path::new(&repo_root), rules, cache)
                .await?;
            for w in &c.warnings {
                self.phase(format!("warning: {w}")).await;
            }
            collected = Some(c);
        }

        if !sync_opts.skip {
            self.took("manifest", manifest_started);
        }
        // 3. The lease: claim it, or create one.
        let resolve_started = std::time::Instant::now();
        let fresh = self.req.fresh.clone().unwrap_or_default();
        let asked = acquire_spec(fresh, self.req.keep, &repo_root);
        let handle = match existing {
            Some(h) => {
                if !self.req.lease.is_empty() && !repo_root.is_empty() {
                    self.api
                        .registry
                        .claim(h.record().id, repo_root.clone(), self.req.reclaim)
                        .await?;
                }
                h
            }
            None => {
                let mut spec = asked.clone();
                // Unless kept, the new lease is this run's, and the store says so: a daemon
                // that dies under the run releases it when it comes back.
                spec.fresh_run = (!self.req.keep).then_some(FreshRun {
                    keep_on_failure: self.req.keep_on_failure,
                });
                let wait = Duration::from_secs(
                    self.req.fresh.as_ref().map_or(0, |f| f.wait_for_slot_secs),
                );
                let acquired =
                    super::acquire_waiting(&self.api, spec, wait, |text| self.phase(text)).await?;
                self.fresh = acquired.fresh;
                acquired.lease
            }
        };
        if !self.fresh {
            // A lease the run reuses gets what the run asks of it, and says so.
            let (_, said) = super::amend(&handle, &asked).await?;
            for line in said {
                self.phase(line).await;
            }
        }
        self.lease = Some(handle.clone());
        tracing::Span::current().record("lease", handle.record().id.as_str());
        let record = handle.record();
        if record.state == LeaseState::Ready {
            // What comes next is quick (the sync's answer, or its progress).
            self.hold(RunEv::Lease(lease_pb(&record)));
        } else {
            let _ = self.emit(RunEv::Lease(lease_pb(&record))).await;
        }
        if let Some(caveat) = self
            .api
            .providers
            .get(&handle.record().provider)
            .and_then(|p| p.caveat())
        {
            self.phase(format!("warning: {caveat}")).await;
        }

        // 4. Usable, and ours alone.
        self.wait_usable(&handle).await?;
        let _lock = match handle.run_lock.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                self.phase(format!(
                    "waiting: another run is using lease {}",
                    handle.record().slug
                ))
                .await;
                handle.run_lock.clone().lock_owned().await
            }
        };
        let record = self.wait_usable(&handle).await?;
        self.took("resolve", resolve_started);
        let repo_name = Path::new(&repo_root)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("workdir")
            .to_string();

        // 5. Sync.
        let mut files_uploaded = 0;
        // Ends the phase (back to ready) however this function ends.
        let mut phase_guard = None;
        if let Some(Collect {
            manifest,
            warnings,
            generation,
            ..
        }) = collected
        {
            let root = Path::new(&repo_root);
            let trusted = handle.remote_verified.load(Ordering::SeqCst)
                && !handle.manifest_untrusted.load(Ordering::SeqCst);
            if trusted
                && !sync_opts.full_resync
                && self.api.checkouts.in_sync(root, &record.id, generation)
            {
                // The lease holds exactly this checkout (this daemon synced it, and nothing
                // changed since): nothing to read, compare or send.
                let report = SyncReport {
                    files_total: manifest.files.len() as u64,
                    ..Default::default()
                };
                self.hold(RunEv::Sync(sync_pb(&report, warnings)));
            } else {
                let target = handle
                    .ask(|reply| LeaseMsg::Begin {
                        phase: Phase::Sync,
                        reply,
                    })
                    .await?;
                phase_guard = Some(PhaseGuard(handle.clone()));
                self.phase("syncing").await;
                let previous = self.api.store.get_manifest(&record.id)?;
                let progress = SyncProgress::default();
                let job = SyncJob {
                    lease: &handle,
                    target: &target,
                    store: &self.api.store,
                    tmp_dir: self.api.state_dir.join("tmp"),
                    repo_root: root,
                    workdir: format!("{}/{}", target.lease_dir, repo_name),
                    manifest: Arc::unwrap_or_clone(manifest),
                    previous,
                    full: sync_opts.full_resync,
                    delete_guard: delete_guard(&sync_opts),
                    progress: progress.clone(),
                }
                .run();
                let synced = self.with_upload_progress(job, &progress).await;
                self.api.checkouts.mark_synced(
                    root,
                    &record.id,
                    synced.as_ref().ok().map(|_| generation),
                );
                let report = synced?;
                for (phase, ms) in [("archive", report.archive_ms), ("upload", report.upload_ms)] {
                    self.timings.push(pb::PhaseTiming {
                        phase: phase.into(),
                        ms,
                    });
                }
                files_uploaded = report.files_uploaded;
                self.hold(RunEv::Sync(sync_pb(&report, warnings)));
            }
        }
        if self.req.sync_only {
            return Ok(pb::Exit::default());
        }

        // 6. Exec (syncing -> running directly, without a trip through ready).
        let target = handle
            .ask(|reply| LeaseMsg::Begin {
                phase: Phase::Exec,
                reply,
            })
            .await?;
        let phase_guard = phase_guard.unwrap_or_else(|| PhaseGuard(handle.clone()));
        let command = if let Some(script) = &self.req.script {
            self.put_script(&target, script).await?
        } else if self.req.shell {
            self.req.argv.join(" ")
        } else {
            let words = shlex::try_join(self.req.argv.iter().map(String::as_str)).map_err(|e| {
                Error::InvalidArgument(format!("cannot quote the command for the shell: {e}"))
            })?;
            // On a terminal the command replaces the shell that starts it, so that it alone
            // gets the terminal's signals (Ctrl-C), as when typed at a prompt: a shell that
            // waits for it would die of the SIGINT the command itself handled.
            if self.req.tty.is_some() && execs(&self.req.argv[0]) {
                format!("exec {words}")
            } else {
                words
            }
        };
        let mut env: BTreeMap<String, String> = self.req.env.clone();
        env.insert("CRABBOX".into(), "1".into());
        env.insert("CRABBOX_LEASE_ID".into(), record.id.clone());
        let tty = self.req.tty.as_ref().map(clamp_size);
        if tty.is_some() {
            env.insert("TERM".into(), term);
        }
        let spec = ExecSpec {
            command,
            cwd: match workdir.as_str() {
                "" => format!("{}/{}", target.lease_dir, repo_name),
                abs if abs.starts_with('/') => abs.to_string(),
                rel => format!("{}/{}/{rel}", target.lease_dir, repo_name),
            },
            env,
            timeout: (self.req.timeout_secs > 0)
                .then(|| Duration::from_secs(self.req.timeout_secs)),
            tty,
            // The client's own descriptors, unless the daemon must see the output (the
            // stall watchdog) or a terminal carries it.
            direct: match (self.req.stall_timeout_secs, tty) {
                (0, None) => std::mem::take(&mut self.direct),
                _ => Default::default(),
            },
        };
        let _ = self
            .emit(RunEv::Started(pb::Started {
                workdir: spec.cwd.clone(),
            }))
            .await;
        let exec_started = std::time::Instant::now();
        // The client's input goes through the watchdog below on its way to the command.
        let stdin = self.stdin.take();
        let (input_tx, input_rx) = match stdin.is_some() {
            true => {
                let (tx, rx) = mpsc::channel(4);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let (exit, stalled) = self
            .exec(
                &handle,
                Execution::start(&target, spec, input_rx),
                stdin.zip(input_tx),
            )
            .await?;
        let elapsed_ms = exec_started.elapsed().as_millis() as u64;
        self.took("exec", exec_started);
        if exit.cancelled && self.api.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown(
                "crabboxd was stopped while the command ran, and stopped the command (its \
                 whole process group): the signal was not the command's doing. Run it again \
                 once the daemon is back (`crabbox daemon start`, or any crabbox command)"
                    .into(),
            ));
        }
        if exit.cancelled && !handle.record().state.is_live() {
            return Err(handle
                .record()
                .not_usable("it was released while the command ran"));
        }
        // The lease is back to ready before the exit is told: a `status` right after the
        // run must not see it running (any answer of the actor comes after the Finish).
        drop(phase_guard);
        let _ = handle.ask(LeaseMsg::Prepare).await;
        let ended = now_ms();
        let (artifacts, missing_artifacts) = if self.req.artifacts.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let base = format!("{}/{}", target.lease_dir, repo_name);
            self.send_artifacts(&target, &base).await
        };
        let command = match &self.req.script {
            Some(s) => format!(
                "--script {} {}",
                if s.name.is_empty() { "script" } else { &s.name },
                self.req.argv.join(" ")
            )
            .trim_end()
            .to_string(),
            None => self.req.argv.join(" "),
        };
        let _ = self.api.store.add_run(&RunRecord {
            lease_id: record.id.clone(),
            started_ms: started,
            ended_ms: ended,
            command,
            exit_code: exit.code,
            files_uploaded,
            artifacts,
            missing_artifacts,
        });
        Ok(pb::Exit {
            code: exit.code,
            signal: exit.signal.unwrap_or_default(),
            timed_out: exit.timed_out,
            stalled,
            elapsed_ms,
            timings: Vec::new(),
        })
    }

    /// Puts the run's script in the lease's folder and answers the command that runs it
    /// with the run's arguments (by its `#!` line, else with `sh`) and then removes it,
    /// keeping its exit code.
    async fn put_script(
        &self,
        target: &crate::lease::RunTarget,
        script: &pb::Script,
    ) -> Result<String, Error> {
        let name = std::path::Path::new(&script.name)
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("script");
        let remote = format!(
            "{}/.crabbox-scripts/{:08x}-{name}",
            target.lease_dir,
            rand::random::<u32>()
        );
        let tmp_dir = self.api.state_dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir)
            .map_err(|e| Error::Internal(format!("creating {}: {e}", tmp_dir.display())))?;
        let local = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| Error::Internal(format!("a temp file for the script: {e}")))?;
        std::fs::write(local.path(), &script.body)
            .map_err(|e| Error::Internal(format!("writing the script: {e}")))?;
        target
            .provider
            .write_file(&target.sandbox, &remote, local.path())
            .await
            .map_err(Error::from)?;
        let q = |s: &str| shlex::try_quote(s).map(|q| q.into_owned());
        let quote_err =
            |e| Error::InvalidArgument(format!("cannot quote the script's arguments: {e}"));
        let path = q(&remote).map_err(quote_err)?;
        let args = shlex::try_join(self.req.argv.iter().map(String::as_str)).map_err(quote_err)?;
        let run = if script.body.starts_with(b"#!") {
            format!("chmod 700 {path} && {path} {args}")
        } else {
            format!("sh {path} {args}")
        };
        Ok(format!("{run}; rc=$?; rm -f {path}; exit $rc"))
    }

    /// Fetches the run's artifacts as one archive and sends them (a header, then the
    /// bytes). A failure to fetch is said as a warning, with every source missing: the
    /// command's exit is still told.
    async fn send_artifacts(
        &self,
        target: &crate::lease::RunTarget,
        base: &str,
    ) -> (Vec<String>, Vec<String>) {
        use crate::lease::ops::transfer::{self, Source};
        let started = std::time::Instant::now();
        // `lease_dir` is `<work root>/<lease id>`.
        let work_root = target
            .lease_dir
            .rsplit_once('/')
            .map_or(target.lease_dir.clone(), |(root, _)| root.to_string());
        let mut sources = Vec::new();
        for s in &self.req.artifacts {
            match transfer::resolve(s, base, &work_root, false) {
                Ok(abs) => sources.push(Source::parse(if s.starts_with('/') { &abs } else { s })),
                Err(why) => {
                    self.phase(format!("warning: artifact {why}")).await;
                    // Keeps the numbering: this one matches nothing.
                    sources.push(Source::Path(format!(
                        "{base}/.crabbox-refused/{}",
                        sources.len()
                    )));
                }
            }
        }
        let header = |entries: Vec<(u32, String)>, missing: Vec<String>| {
            RunEv::Artifacts(super::transfer::header(None, entries, missing, base))
        };
        let sandbox = target.sandbox.clone();
        let packed = transfer::pack(
            target.provider.as_ref(),
            &sandbox,
            &work_root,
            base,
            &sources,
        )
        .await;
        let (fetched, archive) = match packed {
            Ok(p) => p,
            Err(e) => {
                self.phase(format!("warning: the artifacts could not be fetched: {e}"))
                    .await;
                let _ = self
                    .emit(header(Vec::new(), self.req.artifacts.clone()))
                    .await;
                return (Vec::new(), self.req.artifacts.clone());
            }
        };
        // A refused source is reported by what the user wrote.
        let missing: Vec<String> = fetched
            .missing
            .iter()
            .map(|m| {
                sources
                    .iter()
                    .position(|s| s.text() == m)
                    .and_then(|i| self.req.artifacts.get(i))
                    .cloned()
                    .unwrap_or_else(|| m.clone())
            })
            .collect();
        let names: Vec<String> = fetched.entries.iter().map(|(_, n)| n.clone()).collect();
        let told = (names, missing.clone());
        if self.emit(header(fetched.entries, missing)).await.is_err() {
            return told;
        }
        let Some(archive) = archive else { return told };
        let sent = super::transfer::send_chunks(
            target.provider.as_ref(),
            &sandbox,
            &work_root,
            &archive,
            |c| async { self.emit(RunEv::Artifacts(c)).await.is_ok() },
        )
        .await;
        if let Err(e) = sent {
            self.phase(format!("warning: the artifacts broke off: {e}"))
                .await;
        }
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "artifacts sent");
        told
    }

    /// Waits until the lease can take a run: the lease's [`readiness`] decides, and a
    /// stopped lease is asked to start.
    async fn wait_usable(&self, h: &LeaseHandle) -> Result<LeaseRecord, Error> {
        let mut rx = h.state.clone();
        let mut said = None;
        loop {
            let r = rx.borrow_and_update().clone();
            match readiness(&r) {
                Readiness::Usable => return Ok(r),
                Readiness::Unusable(e) => return Err(e),
                Readiness::Start => {
                    self.phase(format!("starting stopped sandbox {}", r.sandbox_name))
                        .await;
                    h.ask(LeaseMsg::Prepare).await?;
                }
                Readiness::Wait => {
                    if said != Some(r.state) {
                        self.phase(format!(
                            "waiting for sandbox {} ({})",
                            r.sandbox_name, r.state
                        ))
                        .await;
                        said = Some(r.state);
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(h.record().not_usable("run again to get a new one"));
            }
        }
    }

    /// Streams the command's output to the client and keeps the lease touched until the
    /// command ends; a client that leaves cancels it.
    /// The client's input (when it sends some) is passed on to the command as the command
    /// takes it. With a stall timeout, a command that prints nothing and is sent nothing for
    /// that long is stopped (its whole process group); the answer says it stalled.
    async fn exec(
        &self,
        h: &LeaseHandle,
        mut execution: Execution,
        input: Option<(mpsc::Receiver<Input>, mpsc::Sender<Input>)>,
    ) -> Result<(ExecExit, bool), Error> {
        let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
        let stall = (self.req.stall_timeout_secs > 0)
            .then(|| Duration::from_secs(self.req.stall_timeout_secs));
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let watchdog = tokio::time::sleep(stall.unwrap_or(far));
        tokio::pin!(watchdog);
        let (mut client_gone, mut stalled) = (false, false);
        let (mut from_client, mut to_command) = match input {
            Some((rx, tx)) => (Some(rx), Some(tx)),
            None => (None, None),
        };
        // One message at a time: while the command has not taken it, the client is not read
        // (backpressure all the way back to the client's stdin).
        let mut pending: Option<Input> = None;
        loop {
            tokio::select! {
                msg = async { from_client.as_mut()?.recv().await },
                    if from_client.is_some() && pending.is_none() => {
                    match msg {
                        Some(m) => {
                            if let Some(d) = stall {
                                watchdog.as_mut().reset(tokio::time::Instant::now() + d);
                            }
                            pending = Some(m);
                        }
                        // EOF from the client: the command's stdin closes.
                        None => {
                            from_client = None;
                            to_command = None;
                        }
                    }
                }
                permit = async { to_command.clone()?.reserve_owned().await.ok() },
                    if pending.is_some() && to_command.is_some() => {
                    match (permit, pending.take()) {
                        (Some(permit), Some(m)) => {
                            permit.send(m);
                        }
                        // The command no longer reads its input: stop taking the client's.
                        _ => {
                            from_client = None;
                            to_command = None;
                        }
                    }
                }
                out = execution.output.recv() => {
                    let Some(first) = out else { break };
                    // Output resets the watchdog.
                    if let Some(d) = stall {
                        watchdog.as_mut().reset(tokio::time::Instant::now() + d);
                    }
                    // What is already queued behind it goes in the same messages (nothing
                    // waits for more: a slow command's output is sent as it comes).
                    for event in coalesce(first, &mut execution.output) {
                        if self.emit(event).await.is_err() && !client_gone {
                            client_gone = true;
                            execution.cancel();
                        }
                    }
                }
                _ = keepalive.tick() => h.tell(LeaseMsg::KeepAlive),
                () = &mut watchdog, if !stalled => {
                    stalled = true;
                    tracing::info!(lease = %h.record().id, "stall timeout: stopping the command");
                    execution.cancel();
                }
            }
        }
        let mut exit = execution.wait().await?;
        if stalled {
            exit.code = crate::sandbox::process::TIMEOUT_EXIT_CODE;
            exit.timed_out = true;
            exit.cancelled = false;
            exit.signal = None;
        }
        Ok((exit, stalled))
    }

    /// Ends the lease this run created, if it did: kept, or released (waiting, when
    /// `wait`, until it is gone, at most [`RELEASE_WAIT`]).
    async fn end_fresh(&self, keep: bool, wait: bool) {
        let (true, Some(h)) = (self.fresh, &self.lease) else {
            return;
        };
        if keep {
            h.tell(LeaseMsg::Kept);
            return;
        }
        h.tell(LeaseMsg::Release {
            reason: "the run that created it ended".into(),
            reply: None,
        });
        if !wait {
            return;
        }
        let mut rx = h.state.clone();
        let _ = tokio::time::timeout(RELEASE_WAIT, async {
            loop {
                if rx.borrow_and_update().state == LeaseState::Released {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

/// The rules a sync of `opts` follows; the daemon's own state and socket folders are never
/// part of a checkout, even when a sync root contains them.
pub fn sync_rules(api: &Api, opts: &pb::SyncOptions) -> SyncRules {
    SyncRules {
        exclude: opts.exclude.clone(),
        include: opts.include.clone(),
        force_large: opts.force_large,
        git: opts.git,
        limits: Default::default(),
        never: api.never_sync.clone(),
    }
}

/// The deletion guard of `opts`: the largest share of a lease's files one sync may delete
/// (`None`: no limit).
pub fn delete_guard(opts: &pb::SyncOptions) -> Option<f64> {
    match (opts.force_delete, opts.delete_guard_percent) {
        (true, _) | (false, 100..) => None,
        (false, 0) => Some(f64::from(DELETE_GUARD_DEFAULT) / 100.0),
        (false, p) => Some(f64::from(p) / 100.0),
    }
}

/// The most output one message carries when it is merged from queued pieces.
const MERGE_LIMIT: usize = 1024 * 1024;

/// `first` and whatever output is already queued behind it (up to [`MERGE_LIMIT`]), as
/// events with neighbouring pieces of the same stream merged, in order.
fn coalesce(first: ExecOutput, queue: &mut mpsc::Receiver<ExecOutput>) -> Vec<RunEv> {
    let mut events: Vec<RunEv> = Vec::new();
    let mut size = 0;
    let mut next = Some(first);
    while let Some(piece) = next.take() {
        let (bytes, stdout) = match piece {
            ExecOutput::Stdout(b) => (b, true),
            ExecOutput::Stderr(b) => (b, false),
        };
        size += bytes.len();
        match (events.last_mut(), stdout) {
            (Some(RunEv::Stdout(prev)), true) | (Some(RunEv::Stderr(prev)), false) => {
                prev.extend_from_slice(&bytes)
            }
            (_, true) => events.push(RunEv::Stdout(bytes)),
            (_, false) => events.push(RunEv::Stderr(bytes)),
        }
        if size < MERGE_LIMIT {
            next = queue.try_recv().ok();
        }
    }
    events
}

/// Can a command whose first word is `word` replace its shell (`exec word ...`)? Not a
/// shell builtin that only means something inside the shell, nor an assignment.
fn execs(word: &str) -> bool {
    const IN_SHELL: [&str; 31] = [
        ".", ":", "alias", "bg", "break", "cd", "command", "continue", "eval", "exec", "exit",
        "export", "fg", "getopts", "hash", "jobs", "local", "read", "readonly", "return", "set",
        "shift", "source", "times", "trap", "type", "ulimit", "umask", "unalias", "unset", "wait",
    ];
    !word.is_empty() && !word.contains('=') && !IN_SHELL.contains(&word)
}

/// A client's terminal size as a command gets it: 0 (a terminal that does not say) is the
/// customary 80x24, and neither side goes past Daytona's 1000.
pub fn clamp_size(size: &pb::WindowSize) -> PtySize {
    let pick = |v: u32, default: u16| match v {
        0 => default,
        v => v.min(1000) as u16,
    };
    PtySize {
        rows: pick(size.rows, 24),
        cols: pick(size.cols, 80),
    }
}

/// Environment variable names: a letter or `_`, then letters, digits, `_`.
fn validate_env_name(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "invalid environment variable name {}: use letters, digits and '_', not \
             starting with a digit",
            echo(name)
        )));
    }
    Ok(())
}
