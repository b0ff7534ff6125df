//! A run: resolve (or create) the lease, sync the checkout, run the command, stream its
//! output, release a fresh lease at the end unless kept.
//!
//! It runs as its own task, not in the gRPC handler (dropped when the client leaves) and not
//! in the lease actor (whose mailbox must stay free): the actor is asked for each state move
//! and the task does the slow work. Leaving the stream cancels the command.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorRef;
use tokio::sync::mpsc;
use tonic::Status;

use super::actor::{LeaseMsg, RunPhase, RunTarget};
use super::{LeaseRecord, LeaseState, now_ms};
use crate::daemon::index::{LeaseHandle, Resolved};
use crate::daemon::registry::{AcquireSpec, RegistryMsg};
use crate::daemon::{ACTOR_CALL_TIMEOUT, Shared, call_result, rpc};
use crate::error::Error;
use crate::pb;
use crate::provider::{ExecOutput, ExecSpec, ProviderError, ProviderErrorKind, UploadSpec};
use crate::store::RunRecord;
use crate::sync::{self, Manifest, SyncRules};

/// Where a run's events go (the gRPC response stream).
pub type EventTx = mpsc::Sender<Result<pb::RunEvent, Status>>;

/// How often a running command touches its lease.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);

/// How long the end of a fresh run waits for its lease's release.
const RELEASE_WAIT: Duration = Duration::from_secs(60);

/// The client left the stream.
struct Gone;

/// Runs `req` and streams its events to `tx`; never panics on bad input.
pub async fn run_task(
    shared: Arc<Shared>,
    registry: ActorRef<RegistryMsg>,
    req: pb::RunRequest,
    tx: EventTx,
) {
    let mut run = Run {
        shared,
        registry,
        tx: tx.clone(),
        req,
        lease: None,
        fresh: false,
    };
    let outcome = tokio::select! {
        r = run.go() => Some(r),
        // The client left: dropping `go` cancels the command (its token's drop guard) and
        // hands the lease back to ready (the phase guard).
        () = tx.closed() => None,
    };
    let failed = !matches!(outcome, Some(Ok(ref exit)) if exit.code == 0);
    let keep = run.req.keep || (failed && run.req.keep_on_failure);
    if run.fresh && !keep {
        run.release_fresh(outcome.is_some()).await;
    }
    match outcome {
        Some(Ok(exit)) => {
            let _ = tx
                .send(Ok(pb::RunEvent {
                    event: Some(pb::run_event::Event::Exit(exit)),
                }))
                .await;
        }
        Some(Err(e)) => {
            let _ = tx.send(Err(Status::from(e))).await;
        }
        None => {
            if let Some(h) = &run.lease {
                tracing::info!(lease = %h.record().id, "client left the run; command cancelled");
            }
        }
    }
}

struct Run {
    shared: Arc<Shared>,
    registry: ActorRef<RegistryMsg>,
    tx: EventTx,
    req: pb::RunRequest,
    lease: Option<LeaseHandle>,
    /// The lease was created for this run.
    fresh: bool,
}

/// Sends `Finish` to the lease actor when a phase ends, however it ends (error, client gone).
struct PhaseGuard(ActorRef<LeaseMsg>);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        let _ = self.0.send_message(LeaseMsg::Finish);
    }
}

impl Run {
    async fn emit(&self, event: pb::run_event::Event) -> Result<(), Gone> {
        self.tx
            .send(Ok(pb::RunEvent { event: Some(event) }))
            .await
            .map_err(|_| Gone)
    }

    async fn phase(&self, text: impl Into<String>) {
        let _ = self.emit(pb::run_event::Event::Phase(text.into())).await;
    }

    async fn go(&mut self) -> Result<pb::Exit, Error> {
        let started = now_ms();
        if self.req.argv.is_empty() && !self.req.sync_only {
            return Err(Error::InvalidArgument(
                "no command to run: put it after `--`, for example `crabbox run -- cargo test`"
                    .into(),
            ));
        }
        for name in self.req.env.keys() {
            validate_env_name(name)?;
        }
        let repo_root = self.req.repo_root.clone();
        if !repo_root.is_empty() && !Path::new(&repo_root).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "repo root {repo_root:?} must be an absolute path"
            )));
        }
        let sync_opts = self.req.sync.clone().unwrap_or_default();
        let rules = SyncRules {
            exclude: sync_opts.exclude.clone(),
            include: sync_opts.include.clone(),
            force_large: sync_opts.force_large,
            limits: Default::default(),
        };

        // 1. The lease this run would use, without creating anything yet.
        let existing = if !self.req.lease.is_empty() {
            match self
                .shared
                .leases
                .resolve(&self.req.lease, &self.shared.store)?
            {
                Resolved::Live(h) => Some(h),
                Resolved::Stored(r) => {
                    return Err(Error::WrongState(format!(
                        "lease {} is {}{}; run without --id to get a new one",
                        r.slug,
                        r.state,
                        r.reason.map(|x| format!(" ({x})")).unwrap_or_default()
                    )));
                }
            }
        } else if !repo_root.is_empty() {
            self.shared.leases.claimed_by(&repo_root)
        } else {
            None
        };

        // 2. Collect the checkout first: the size guard must refuse before anything that
        // costs money is created.
        let mut collected = None;
        if !sync_opts.skip {
            if repo_root.is_empty() {
                return Err(Error::InvalidArgument(
                    "nothing to sync: no repo root was sent (use --no-sync to run without one)"
                        .into(),
                ));
            }
            let previous = match &existing {
                Some(h) => self.shared.store.get_manifest(&h.record().id)?,
                None => None,
            };
            let root = repo_root.clone();
            let r = rules.clone();
            let c = tokio::task::spawn_blocking(move || {
                sync::manifest::collect(Path::new(&root), &r, previous.as_ref())
            })
            .await
            .map_err(|e| Error::Internal(format!("sync task: {e}")))??;
            for w in &c.warnings {
                self.phase(format!("warning: {w}")).await;
            }
            collected = Some(c);
        }

        // 3. The lease: claim it, or create one.
        let handle = match existing {
            Some(h) => {
                if !self.req.lease.is_empty() && !repo_root.is_empty() {
                    self.claim(&h, &repo_root).await?;
                }
                h
            }
            None => {
                let acquired = self.acquire(&repo_root).await?;
                self.fresh = acquired.fresh;
                self.shared.leases.get(&acquired.record.id).ok_or_else(|| {
                    Error::Internal(format!(
                        "lease {} vanished right after creation",
                        acquired.record.id
                    ))
                })?
            }
        };
        self.lease = Some(handle.clone());
        let _ = self
            .emit(pb::run_event::Event::Lease(rpc::lease_pb(&handle.record())))
            .await;

        // 4. Ready, and ours alone.
        self.wait_ready(&handle).await?;
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
        let record = self.wait_ready(&handle).await?;
        let repo_name = Path::new(&repo_root)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("workdir")
            .to_string();

        // 5. Sync.
        let mut files_uploaded = 0;
        // Ends the phase (back to ready) however this function ends.
        let mut phase_guard = None;
        if let Some(collected) = collected {
            let t = begin(&handle, RunPhase::Sync).await?;
            phase_guard = Some(PhaseGuard(handle.actor.clone()));
            self.phase("syncing").await;
            let stats = self
                .sync(
                    &record,
                    &t,
                    &repo_root,
                    &repo_name,
                    collected.manifest,
                    collected.warnings,
                )
                .await?;
            files_uploaded = stats.files_uploaded;
            let _ = self.emit(pb::run_event::Event::Sync(stats)).await;
        }
        if self.req.sync_only {
            return Ok(pb::Exit::default());
        }

        // 6. Exec (syncing -> running directly, without a trip through ready).
        let target = begin(&handle, RunPhase::Exec).await?;
        let _phase_guard = phase_guard.unwrap_or_else(|| PhaseGuard(handle.actor.clone()));
        let workdir = format!("{}/{}", target.lease_dir, repo_name);
        let command = if self.req.shell {
            self.req.argv.join(" ")
        } else {
            shlex::try_join(self.req.argv.iter().map(String::as_str)).map_err(|e| {
                Error::InvalidArgument(format!("cannot quote the command for the shell: {e}"))
            })?
        };
        let mut env: BTreeMap<String, String> = self.req.env.clone().into_iter().collect();
        env.insert("CRABBOX".into(), "1".into());
        env.insert("CRABBOX_LEASE_ID".into(), record.id.clone());
        let spec = ExecSpec {
            command,
            cwd: workdir,
            env,
            timeout: (self.req.timeout_secs > 0)
                .then(|| Duration::from_secs(self.req.timeout_secs)),
        };
        let exit = self.exec(&handle, &target, spec).await?;
        if exit.cancelled && !handle.record().state.is_live() {
            let r = handle.record();
            return Err(Error::WrongState(format!(
                "lease {} was released while the command ran{}",
                r.slug,
                r.reason.map(|x| format!(" ({x})")).unwrap_or_default()
            )));
        }
        let _ = self.shared.store.add_run(&RunRecord {
            lease_id: record.id.clone(),
            started_ms: started,
            ended_ms: now_ms(),
            command: self.req.argv.join(" "),
            exit_code: exit.code,
            files_uploaded,
        });
        Ok(pb::Exit {
            code: exit.code,
            signal: exit.signal.unwrap_or_default(),
            timed_out: exit.timed_out,
        })
    }

    async fn acquire(&self, repo_root: &str) -> Result<crate::daemon::registry::Acquired, Error> {
        let fresh = self.req.fresh.clone().unwrap_or_default();
        let spec = AcquireSpec {
            provider: fresh.provider,
            slug: (!fresh.slug.is_empty()).then_some(fresh.slug),
            ttl_secs: fresh.ttl_secs,
            idle_timeout_secs: fresh.idle_timeout_secs,
            keep: self.req.keep,
            labels: fresh.labels.into_iter().collect(),
            repo_root: (!repo_root.is_empty()).then(|| repo_root.to_string()),
            reuse_claimed: true,
            provider_options: fresh.provider_options.into_iter().collect(),
        };
        self.registry
            .call(
                |reply| RegistryMsg::Acquire { spec, reply },
                Some(ACTOR_CALL_TIMEOUT),
            )
            .await
            .map_err(|e| Error::Internal(format!("registry unreachable: {e}")))
            .and_then(call_result)?
    }

    async fn claim(&self, h: &LeaseHandle, repo_root: &str) -> Result<LeaseRecord, Error> {
        let lease_id = h.record().id;
        let repo_root = repo_root.to_string();
        let reclaim = self.req.reclaim;
        self.registry
            .call(
                |reply| RegistryMsg::Claim {
                    lease_id,
                    repo_root,
                    reclaim,
                    reply,
                },
                Some(ACTOR_CALL_TIMEOUT),
            )
            .await
            .map_err(|e| Error::Internal(format!("registry unreachable: {e}")))
            .and_then(call_result)?
    }

    /// Waits until the lease can take a run (starting it when stopped).
    async fn wait_ready(&self, h: &LeaseHandle) -> Result<LeaseRecord, Error> {
        let mut rx = h.state.clone();
        let mut said = None;
        loop {
            let r = rx.borrow_and_update().clone();
            match r.state {
                LeaseState::Ready => return Ok(r),
                // Another run holds it: the run lock will make us wait our turn.
                LeaseState::Syncing | LeaseState::Running => return Ok(r),
                LeaseState::Stopped => {
                    self.phase(format!("starting stopped sandbox {}", r.sandbox_name))
                        .await;
                    let _ = h.actor.send_message(LeaseMsg::Provision);
                }
                LeaseState::Pending | LeaseState::Creating => {
                    if said != Some(r.state) {
                        self.phase(format!(
                            "waiting for sandbox {} ({})",
                            r.sandbox_name, r.state
                        ))
                        .await;
                        said = Some(r.state);
                    }
                }
                LeaseState::Failed => {
                    return Err(Error::Provider(ProviderError::new(
                        ProviderErrorKind::Provisioning,
                        format!(
                            "lease {} failed: {}",
                            r.slug,
                            r.reason.unwrap_or_else(|| "no reason recorded".into())
                        ),
                    )));
                }
                LeaseState::Releasing | LeaseState::Released => {
                    return Err(Error::WrongState(format!(
                        "lease {} is {}{}; run again to get a new one",
                        r.slug,
                        r.state,
                        r.reason.map(|x| format!(" ({x})")).unwrap_or_default()
                    )));
                }
            }
            if rx.changed().await.is_err() {
                let r = h.record();
                return Err(Error::WrongState(format!(
                    "lease {} is {}",
                    r.slug, r.state
                )));
            }
        }
    }

    async fn sync(
        &self,
        record: &LeaseRecord,
        target: &RunTarget,
        repo_root: &str,
        repo_name: &str,
        manifest: Manifest,
        warnings: Vec<String>,
    ) -> Result<pb::SyncStats, Error> {
        let started = Instant::now();
        let full = self.req.sync.as_ref().is_some_and(|s| s.full_resync);
        let previous = if full {
            None
        } else {
            self.shared.store.get_manifest(&record.id)?
        };
        // Without a trusted record of what the sandbox holds, its folder is cleaned and
        // everything is sent.
        let clean = previous.is_none();
        let diff = manifest.diff(previous.as_ref().unwrap_or(&Manifest::default()));
        let workdir = format!("{}/{}", target.lease_dir, repo_name);
        let mut stats = pb::SyncStats {
            files_total: manifest.files.len() as u64,
            files_uploaded: diff.changed.len() as u64,
            files_deleted: diff.deleted,
            warnings,
            ..Default::default()
        };
        if diff.changed.is_empty() && diff.remove.is_empty() && !clean {
            stats.millis = started.elapsed().as_millis() as u64;
            return Ok(stats);
        }
        let tmp_dir = self.shared.state_dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir)
            .map_err(|e| Error::Sync(format!("creating {}: {e}", tmp_dir.display())))?;
        let archive = if diff.changed.is_empty() {
            None
        } else {
            let file = tempfile::Builder::new()
                .prefix("sync-")
                .suffix(".tgz")
                .tempfile_in(&tmp_dir)
                .map_err(|e| Error::Sync(format!("creating a temp archive: {e}")))?;
            let root = repo_root.to_string();
            let paths = diff.changed.clone();
            let m = manifest.clone();
            let path = file.path().to_path_buf();
            let size = tokio::task::spawn_blocking(move || {
                sync::archive::build(Path::new(&root), &paths, &m, &path)
            })
            .await
            .map_err(|e| Error::Internal(format!("archive task: {e}")))??;
            stats.bytes_uploaded = size;
            Some(file)
        };
        let upload = UploadSpec {
            workdir,
            archive: archive.as_ref().map(|f| f.path().to_path_buf()),
            remove: diff.remove.clone(),
            clean,
            manifest: serde_json::to_vec(&manifest).ok(),
        };
        if let Err(e) = target.provider.upload(&target.sandbox, &upload).await {
            // What the sandbox holds is unknown now: the next sync sends everything.
            let _ = self.shared.store.delete_manifest(&record.id);
            return Err(e.into());
        }
        self.shared.store.put_manifest(&record.id, &manifest)?;
        stats.millis = started.elapsed().as_millis() as u64;
        Ok(stats)
    }

    async fn exec(
        &self,
        h: &LeaseHandle,
        target: &RunTarget,
        spec: ExecSpec,
    ) -> Result<crate::provider::ExecExit, Error> {
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let cancel = target.cancel.child_token();
        // Dropping this future (client gone) cancels the command.
        let _cancel_on_drop = cancel.clone().drop_guard();
        let provider = target.provider.clone();
        let sandbox = target.sandbox.clone();
        let task_cancel = cancel.clone();
        let mut task =
            tokio::spawn(async move { provider.exec(&sandbox, &spec, out_tx, task_cancel).await });
        let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
        let mut client_gone = false;
        loop {
            tokio::select! {
                out = out_rx.recv() => match out {
                    Some(ExecOutput::Stdout(b)) => {
                        if self.emit(pb::run_event::Event::Stdout(b)).await.is_err() && !client_gone {
                            client_gone = true;
                            cancel.cancel();
                        }
                    }
                    Some(ExecOutput::Stderr(b)) => {
                        if self.emit(pb::run_event::Event::Stderr(b)).await.is_err() && !client_gone {
                            client_gone = true;
                            cancel.cancel();
                        }
                    }
                    None => break,
                },
                _ = keepalive.tick() => {
                    let _ = h.actor.send_message(LeaseMsg::KeepAlive);
                }
            }
        }
        let exit = (&mut task)
            .await
            .map_err(|e| Error::Internal(format!("exec task: {e}")))??;
        Ok(exit)
    }

    /// Releases the lease this run created, and waits (bounded) until it is gone.
    async fn release_fresh(&self, wait: bool) {
        let Some(h) = &self.lease else { return };
        let reason = "the run that created it ended".to_string();
        let _ = h.actor.send_message(LeaseMsg::Release {
            reason,
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

async fn begin(h: &LeaseHandle, phase: RunPhase) -> Result<RunTarget, Error> {
    h.actor
        .call(
            |reply| LeaseMsg::Begin { phase, reply },
            Some(ACTOR_CALL_TIMEOUT),
        )
        .await
        .map_err(|e| Error::Internal(format!("lease actor unreachable: {e}")))
        .and_then(call_result)?
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
            "invalid environment variable name {name:?}: use letters, digits and '_', not \
             starting with a digit"
        )));
    }
    Ok(())
}
