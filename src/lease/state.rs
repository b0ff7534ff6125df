//! The lease lifecycle: every decision about a lease is [`step`], one pure function.
//!
//! `step(record, event, now)` answers the next record and the [`Effect`]s to carry out, or
//! refuses the event with the error a caller sees. The actor only carries out effects
//! (store writes, events, provider work in spawned tasks); recovery after a restart,
//! reconcile with the provider, a run's begin and finish, release and cleanup all go through
//! here. No `match` in this file has a catch-all arm: a new state or event makes the
//! compiler ask what every pair means.
//!
//! Provider work in flight is part of the record ([`Task`], never persisted): a new actor,
//! after a restart or a crash, has no tasks, and [`Event::Recover`] starts what its state
//! needs. So "a cleanup is running" or "a release waits for the create to settle" are not
//! hidden flags of the actor but facts the step function reads.

use std::time::Duration;

use super::record::{LeaseRecord, LeaseState, Task};
use crate::error::{Error, ProviderError, ProviderErrorKind};

/// Which part of a run begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sync,
    Exec,
}

/// What the provider says of a lease's sandbox, when reconciling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// No such sandbox.
    Gone,
    /// Being deleted or deleted, outside crabbox.
    Destroyed,
    Creating,
    Started,
    Stopped,
    /// In error for good, with the provider's reason.
    Error(String),
    /// The provider could not be asked; the next sweep asks again.
    Unreachable,
}

/// What happened to a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The actor of a new lease starts: provision it.
    Start,
    /// The actor of a stored lease starts (a daemon restart, a restart after a crash): pick
    /// up from the state the store had.
    Recover,
    /// The registry's sweep: start provider work the state needs but that is not in flight
    /// (after a task died, or a store write failed).
    Retry,
    /// A run wants the lease usable: a stopped sandbox is started.
    Prepare,
    /// The provisioning task's outcome: the sandbox is ready.
    Provisioned { sandbox_id: String },
    /// The provisioning task's outcome: it failed (`auth`: the provider refused the
    /// credentials).
    ProvisionFailed { error: String, auth: bool },
    /// The Touch RPC.
    Touch,
    /// A running command (every few seconds) or an ssh session: the lease is in use.
    KeepAlive,
    /// A run's sync or command begins.
    Begin(Phase),
    /// A run's phase ended, however it ended.
    Finish,
    /// The registry sets (or clears) the repo claim.
    Claim { repo_root: Option<String> },
    /// Release the lease: the Stop RPC, expiry, the end of a fresh run.
    Release { reason: String },
    /// The run that created the lease ended and keeps it (`--keep-on-failure` after a
    /// failure): it becomes an ordinary lease.
    Kept,
    /// A warmup or run reusing the lease asks for settings of its own: labels are added
    /// (never removed), a non-zero ttl or idle timeout replaces the lease's, keep is set when
    /// asked (never unset).
    Amend(Amendment),
    /// A pooled lease's sandbox was given `repo_root`'s checkout in advance (its manifest is
    /// in the store); ignored once the lease left the pool.
    Seeded { repo_root: String },
    /// `crabbox pause`: stop the sandbox, keep its disk; the next use starts it again.
    Pause,
    /// The pause task's outcome (`Err`: the provider's error).
    Paused(Result<(), String>),
    /// Team mode: another daemon took this pooled sandbox from the team's pool and made it
    /// its own lease (relabelled): this lease ends without deleting it.
    HandedOver { to: String },
    /// A fresh lease takes this pooled one: it leaves its pool and becomes that lease
    /// (claim, timeouts, labels, run), as if created now.
    Take(Box<Taking>),
    /// The delete task's outcome: the sandbox is gone.
    Deleted,
    /// The delete task's outcome: it failed, and is retried with backoff.
    DeleteFailed { error: String },
    /// The registry's sweep, now and then: compare with the provider.
    Reconcile,
    /// The observing task's outcome.
    Observed(Observation),
    /// The registry: the lease's actor crashed. The lease fails and its sandbox is deleted
    /// by the actor started after it.
    Crashed { why: String },
}

/// What the fresh lease that takes a pooled one asks of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taking {
    pub repo_root: Option<String>,
    pub ttl_secs: u64,
    pub idle_timeout_secs: u64,
    pub keep: bool,
    pub labels: std::collections::BTreeMap<String, String>,
    pub fresh_run: Option<super::record::FreshRun>,
}

/// Settings a request asks of a lease that already exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amendment {
    pub labels: std::collections::BTreeMap<String, String>,
    /// 0: unchanged.
    pub ttl_secs: u64,
    /// 0: unchanged.
    pub idle_timeout_secs: u64,
    pub keep: bool,
}

/// What the actor does after a step, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write the record to the store. It comes before the provider work it is the intent
    /// of: when the write fails, nothing after it is done and the event fails.
    Persist,
    /// Write the record to the store without waiting for the disk (the store's lazy
    /// durability): a run's phase and the lease's last use, which a crash of the daemon may
    /// lose (the lease then comes back as it last was durably, still held and released as
    /// ever). A failed write fails the event as [`Effect::Persist`] does.
    PersistLazily,
    /// Tell watchers what happened (the event feed behind `Watch`).
    Announce(&'static str),
    /// Start the provisioning task.
    Provision,
    /// Start the delete task after a pause (backoff); a provisioning task is cancelled and
    /// awaited first.
    Delete { after: Duration },
    /// Start the observing task.
    Observe,
    /// Start the task that stops the sandbox for a pause.
    Pause,
    /// Push the record's labels to the sandbox (in the background).
    PushLabels,
    /// Stop the lease's running command.
    CancelRuns,
    /// Forget what the sandbox holds (its sync manifest).
    ForgetManifest,
    /// The lease is released: the actor stops.
    Stop,
}

/// A step's outcome: the next record and what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub record: LeaseRecord,
    pub effects: Vec<Effect>,
}

/// Can a run use the lease now?
#[derive(Debug)]
pub enum Readiness {
    /// Ready, or in another run's hands (the run lock orders them).
    Usable,
    /// Being created or started: wait for the next change.
    Wait,
    /// Stopped: ask the lease to start ([`Event::Prepare`]), then wait.
    Start,
    /// It will never be usable: the error says why and what to do.
    Unusable(Error),
}

/// Can a run use this lease, and if not, why. The one place that decides it, for the
/// actor ([`Event::Prepare`]) and for a run waiting on the lease's changes.
pub fn readiness(r: &LeaseRecord) -> Readiness {
    match r.state {
        LeaseState::Ready | LeaseState::Syncing | LeaseState::Running => Readiness::Usable,
        LeaseState::Pending | LeaseState::Creating => Readiness::Wait,
        // A pause still stopping it: start it once it is stopped.
        LeaseState::Stopped if r.task == Task::Pausing => Readiness::Wait,
        LeaseState::Stopped => Readiness::Start,
        LeaseState::Failed => Readiness::Unusable(Error::Provider(ProviderError::new(
            if r.failed_on_auth {
                ProviderErrorKind::Auth
            } else {
                ProviderErrorKind::Provisioning
            },
            format!(
                "lease {} failed: {}",
                r.slug,
                r.reason.as_deref().unwrap_or("no reason recorded")
            ),
        ))),
        LeaseState::Releasing | LeaseState::Released => {
            Readiness::Unusable(r.not_usable("run again to get a new one"))
        }
        LeaseState::Pooled => Readiness::Unusable(r.not_usable(
            "it waits in a warm pool; a fresh `crabbox warmup` or `run` takes it \
             (`crabbox pool status` lists the pools)",
        )),
    }
}

/// How long the `attempts`-th retry of a failed delete waits: 2, 4, 8... seconds, at most
/// a minute.
pub fn backoff(attempts: u32) -> Duration {
    if attempts == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs(1u64 << attempts.min(6)).min(Duration::from_secs(60))
}

/// The one transition function. `now_ms` is the wall clock, in Unix milliseconds.
pub fn step(record: &LeaseRecord, event: Event, now_ms: u64) -> Result<Step, Error> {
    use Effect as F;
    use LeaseState as S;
    let mut r = record.clone();
    let mut fx = Vec::new();
    match event {
        Event::Start => match r.state {
            S::Pending => provision(&mut r, &mut fx, "provisioning the sandbox"),
            S::Creating
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Releasing
            | S::Released
            | S::Failed
            | S::Pooled => {
                return Err(Error::Internal(format!(
                    "lease {} cannot start: it is {} already",
                    r.id, r.state
                )));
            }
        },
        Event::Recover => {
            // A new actor has no tasks, whatever the last one had.
            r.task = Task::Idle;
            r.attempts = 0;
            // The run that created the lease was lost with the daemon: its lease goes, unless
            // kept on failure (a lost run counts as failed), when it is an ordinary lease now.
            if let Some(run) = r.fresh_run.take()
                && r.state.is_live()
                && !run.keep_on_failure
            {
                r.state = S::Releasing;
                r.reason =
                    Some("the run that created it was lost when the daemon restarted".into());
                fx.extend([F::Persist, F::Announce("releasing"), F::CancelRuns]);
                delete(&mut r, &mut fx, Duration::ZERO);
                return Ok(Step {
                    record: r,
                    effects: fx,
                });
            }
            match r.state {
                S::Pending => provision(&mut r, &mut fx, "provisioning the sandbox"),
                S::Creating => {
                    r.task = Task::Provisioning;
                    fx.push(F::Provision);
                }
                S::Syncing | S::Running => {
                    r.state = S::Ready;
                    r.reason =
                        Some("the daemon restarted during a run; that command was lost".into());
                    fx.extend([F::Persist, F::Announce("recovered after a restart")]);
                    observe(&mut r, &mut fx);
                }
                S::Ready | S::Stopped | S::Pooled => observe(&mut r, &mut fx),
                S::Releasing => delete(&mut r, &mut fx, Duration::ZERO),
                S::Failed => {
                    if !r.sandbox_cleaned {
                        delete(&mut r, &mut fx, Duration::ZERO);
                    }
                }
                S::Released => fx.push(F::Stop),
            }
            if r.fresh_run != record.fresh_run && !fx.contains(&F::Persist) {
                fx.insert(0, F::Persist);
            }
        }
        Event::Retry => {
            if r.task == Task::Idle {
                match r.state {
                    S::Creating => {
                        r.task = Task::Provisioning;
                        fx.push(F::Provision);
                    }
                    S::Releasing => delete(&mut r, &mut fx, Duration::ZERO),
                    S::Failed => {
                        if !r.sandbox_cleaned {
                            delete(&mut r, &mut fx, Duration::ZERO);
                        }
                    }
                    S::Pending
                    | S::Ready
                    | S::Syncing
                    | S::Running
                    | S::Stopped
                    | S::Released
                    | S::Pooled => {}
                }
            }
        }
        Event::Prepare => match readiness(&r) {
            Readiness::Usable | Readiness::Wait => {}
            Readiness::Start => provision(&mut r, &mut fx, "starting the stopped sandbox"),
            Readiness::Unusable(e) => return Err(e),
        },
        Event::Provisioned { sandbox_id } => match r.state {
            S::Creating => {
                r.sandbox_id = Some(sandbox_id);
                r.reason = None;
                r.last_touched_ms = now_ms;
                r.task = Task::Idle;
                if r.pool.is_some() {
                    r.state = S::Pooled;
                    fx.extend([F::Persist, F::Announce("pooled"), F::PushLabels]);
                } else {
                    r.state = S::Ready;
                    fx.extend([F::Persist, F::Announce("ready"), F::PushLabels]);
                }
            }
            // Released or failed while the create was in flight: the delete owns the
            // sandbox now.
            S::Pending
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Releasing
            | S::Released
            | S::Failed
            | S::Pooled => {}
        },
        Event::ProvisionFailed { error, auth } => match r.state {
            S::Creating => {
                r.state = S::Failed;
                r.reason = Some(format!("provisioning failed: {error}"));
                r.failed_on_auth = auth;
                r.sandbox_cleaned = false;
                fx.extend([
                    F::Persist,
                    F::Announce("provisioning failed"),
                    F::CancelRuns,
                ]);
                delete(&mut r, &mut fx, Duration::ZERO);
            }
            S::Pending
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Releasing
            | S::Released
            | S::Failed
            | S::Pooled => {}
        },
        Event::Touch => {
            if !r.state.is_live() || r.state == S::Pooled {
                return Err(r.not_usable("nothing to touch"));
            }
            r.last_touched_ms = now_ms;
            fx.extend([F::Persist, F::Announce("touched"), F::PushLabels]);
        }
        Event::KeepAlive => {
            // Every few seconds while a command runs: keep the store current, spare the
            // event feed.
            if r.state.is_live() && r.state != S::Pooled {
                r.last_touched_ms = now_ms;
                fx.push(F::PersistLazily);
            }
        }
        Event::Begin(phase) => {
            let next = match (phase, r.state) {
                (Phase::Sync, S::Ready) => S::Syncing,
                (Phase::Exec, S::Ready | S::Syncing) => S::Running,
                (
                    Phase::Sync,
                    S::Pending
                    | S::Creating
                    | S::Syncing
                    | S::Running
                    | S::Stopped
                    | S::Releasing
                    | S::Released
                    | S::Failed
                    | S::Pooled,
                )
                | (
                    Phase::Exec,
                    S::Pending
                    | S::Creating
                    | S::Running
                    | S::Stopped
                    | S::Releasing
                    | S::Released
                    | S::Failed
                    | S::Pooled,
                ) => return Err(r.not_usable("it is not ready; wait for it or run again")),
            };
            if r.sandbox_id.is_none() {
                return Err(Error::Internal(format!("lease {} has no sandbox id", r.id)));
            }
            r.state = next;
            r.last_touched_ms = now_ms;
            let said = match phase {
                Phase::Sync => "syncing",
                Phase::Exec => "running",
            };
            fx.extend([F::PersistLazily, F::Announce(said)]);
        }
        Event::Finish => match r.state {
            S::Syncing | S::Running => {
                r.state = S::Ready;
                r.last_touched_ms = now_ms;
                fx.extend([F::PersistLazily, F::Announce("run finished")]);
            }
            // The phase guard fires however a run ends, also after a release.
            S::Pending
            | S::Creating
            | S::Ready
            | S::Stopped
            | S::Releasing
            | S::Released
            | S::Failed
            | S::Pooled => {}
        },
        Event::Claim { repo_root } => {
            if repo_root.is_some() && (!r.state.is_live() || r.state == S::Pooled) {
                return Err(r.not_usable("it cannot be claimed"));
            }
            r.repo_root = repo_root;
            fx.extend([F::Persist, F::Announce("claim changed")]);
        }
        Event::Release { reason } => match r.state {
            S::Released => {}
            S::Releasing => {
                fx.push(F::CancelRuns);
                if r.task != Task::Deleting {
                    delete(&mut r, &mut fx, Duration::ZERO);
                }
            }
            S::Failed => {
                // Keep the failure's reason: it is what a person needs to read.
                r.state = S::Releasing;
                fx.extend([F::Persist, F::Announce("releasing"), F::CancelRuns]);
                if r.sandbox_cleaned {
                    released(&mut r, &mut fx);
                } else if r.task != Task::Deleting {
                    // A cleanup already in flight finishes the release when it is done.
                    delete(&mut r, &mut fx, Duration::ZERO);
                }
            }
            S::Pending
            | S::Creating
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Pooled => {
                r.state = S::Releasing;
                r.reason = Some(reason);
                fx.extend([F::Persist, F::Announce("releasing"), F::CancelRuns]);
                delete(&mut r, &mut fx, Duration::ZERO);
            }
        },
        Event::Amend(a) => {
            if !r.state.is_live() || r.state == S::Pooled {
                return Err(r.not_usable("its settings cannot change"));
            }
            for (k, v) in a.labels {
                r.user_labels.insert(k, v);
            }
            if a.ttl_secs > 0 {
                r.ttl_secs = a.ttl_secs;
            }
            if a.idle_timeout_secs > 0 {
                r.idle_timeout_secs = a.idle_timeout_secs;
            }
            r.keep |= a.keep;
            if r != *record {
                fx.extend([F::Persist, F::Announce("settings changed"), F::PushLabels]);
            }
        }
        Event::Pause => match r.state {
            S::Stopped => {}
            S::Ready if matches!(r.task, Task::Idle | Task::Observing) => {
                r.state = S::Stopped;
                r.task = Task::Pausing;
                r.reason = Some("paused: its sandbox is stopped, its disk kept".into());
                fx.extend([F::Persist, F::Announce("pausing"), F::Pause]);
            }
            S::Ready => {
                return Err(
                    r.not_usable("the provider is busy with it; pause it again in a moment")
                );
            }
            S::Syncing | S::Running => {
                return Err(r.not_usable("a run is using it; pause it when the run has ended"));
            }
            S::Pending | S::Creating => {
                return Err(r.not_usable("its sandbox is not ready yet; pause it once it is"));
            }
            S::Pooled => {
                return Err(r.not_usable("it waits in a pool; `crabbox pool drain` releases it"));
            }
            S::Releasing | S::Released | S::Failed => {
                return Err(r.not_usable("there is nothing to pause"));
            }
        },
        Event::Paused(outcome) => {
            if r.task == Task::Pausing {
                r.task = Task::Idle;
                match outcome {
                    _ if r.state != S::Stopped => {}
                    Ok(()) => fx.push(F::Announce("paused")),
                    Err(error) => {
                        r.state = S::Ready;
                        r.reason = Some(format!("pause failed: {error}"));
                        fx.extend([F::Persist, F::Announce("pause failed")]);
                    }
                }
            }
        }
        Event::Seeded { repo_root } => {
            if r.state == S::Pooled && r.seeded_for.as_deref() != Some(repo_root.as_str()) {
                r.seeded_for = Some(repo_root);
                fx.push(F::Persist);
            }
        }
        Event::HandedOver { to } => {
            if r.state == S::Pooled {
                r.state = S::Released;
                r.task = Task::Idle;
                r.reason = Some(format!("taken from the team's pool by {to}"));
                r.sandbox_cleaned = true;
                fx.extend([
                    F::Persist,
                    F::Announce("handed over"),
                    F::ForgetManifest,
                    F::Stop,
                ]);
            }
        }
        Event::Take(t) => {
            if r.state != S::Pooled {
                return Err(r.not_usable("it is no longer in the pool"));
            }
            let Taking {
                repo_root,
                ttl_secs,
                idle_timeout_secs,
                keep,
                labels,
                fresh_run,
            } = *t;
            // A checkout given in advance is another repo's: what the sandbox holds for
            // this one is unknown.
            if r.seeded_for.is_some() && r.seeded_for != repo_root {
                r.seeded_for = None;
                fx.push(F::ForgetManifest);
            }
            r.state = S::Ready;
            r.pool = None;
            r.repo_root = repo_root;
            r.created_at_ms = now_ms;
            r.last_touched_ms = now_ms;
            r.ttl_secs = ttl_secs;
            r.idle_timeout_secs = idle_timeout_secs;
            r.keep = keep;
            r.user_labels = labels;
            r.fresh_run = fresh_run;
            r.reason = None;
            fx.splice(
                0..0,
                [
                    F::Persist,
                    F::Announce("taken from the pool"),
                    F::PushLabels,
                ],
            );
        }
        Event::Kept => {
            if r.fresh_run.take().is_some() {
                fx.push(F::Persist);
            }
        }
        Event::Deleted => match r.state {
            S::Releasing => released(&mut r, &mut fx),
            S::Failed => {
                r.task = Task::Idle;
                r.attempts = 0;
                r.sandbox_cleaned = true;
                fx.extend([
                    F::Persist,
                    F::Announce("sandbox of the failed lease deleted"),
                ]);
            }
            S::Pending
            | S::Creating
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Released
            | S::Pooled => {}
        },
        Event::DeleteFailed { error } => match r.state {
            S::Releasing => {
                r.attempts = r.attempts.saturating_add(1);
                r.reason = Some(format!("release failed, retrying: {error}"));
                fx.extend([F::Persist, F::Announce("release failed; retrying")]);
                let after = backoff(r.attempts);
                delete(&mut r, &mut fx, after);
            }
            S::Failed => {
                r.attempts = r.attempts.saturating_add(1);
                let after = backoff(r.attempts);
                delete(&mut r, &mut fx, after);
            }
            S::Pending
            | S::Creating
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Released
            | S::Pooled => {}
        },
        Event::Reconcile => match r.state {
            S::Ready | S::Stopped | S::Pooled => {
                if r.task == Task::Idle {
                    observe(&mut r, &mut fx);
                }
            }
            S::Pending
            | S::Creating
            | S::Syncing
            | S::Running
            | S::Releasing
            | S::Released
            | S::Failed => {}
        },
        Event::Observed(seen) => {
            if r.task != Task::Observing {
                // Another task took over (a start, a release): this answer is stale.
                return Ok(Step {
                    record: r,
                    effects: fx,
                });
            }
            r.task = Task::Idle;
            match r.state {
                S::Ready | S::Stopped | S::Pooled => observed(&mut r, &mut fx, seen),
                S::Pending
                | S::Creating
                | S::Syncing
                | S::Running
                | S::Releasing
                | S::Released
                | S::Failed => {}
            }
        }
        Event::Crashed { why } => match r.state {
            S::Released => {}
            S::Pending
            | S::Creating
            | S::Ready
            | S::Syncing
            | S::Running
            | S::Stopped
            | S::Releasing
            | S::Failed
            | S::Pooled => {
                r.state = S::Failed;
                r.task = Task::Idle;
                r.sandbox_cleaned = false;
                r.reason = Some(format!(
                    "internal error: {why}; its sandbox is deleted. Please report this with \
                     the daemon log"
                ));
                fx.extend([F::Persist, F::Announce("failed: lease actor crashed")]);
            }
        },
    }
    Ok(Step {
        record: r,
        effects: fx,
    })
}

/// Pending or stopped -> creating: the intent is persisted, then the task starts.
fn provision(r: &mut LeaseRecord, fx: &mut Vec<Effect>, said: &'static str) {
    r.state = LeaseState::Creating;
    r.task = Task::Provisioning;
    fx.extend([Effect::Persist, Effect::Announce(said), Effect::Provision]);
}

fn delete(r: &mut LeaseRecord, fx: &mut Vec<Effect>, after: Duration) {
    r.task = Task::Deleting;
    fx.push(Effect::Delete { after });
}

fn observe(r: &mut LeaseRecord, fx: &mut Vec<Effect>) {
    r.task = Task::Observing;
    fx.push(Effect::Observe);
}

fn released(r: &mut LeaseRecord, fx: &mut Vec<Effect>) {
    r.state = LeaseState::Released;
    r.task = Task::Idle;
    r.attempts = 0;
    fx.extend([
        Effect::Persist,
        Effect::Announce("released"),
        Effect::ForgetManifest,
        Effect::Stop,
    ]);
}

/// A ready or stopped lease meets what the provider says of its sandbox.
fn observed(r: &mut LeaseRecord, fx: &mut Vec<Effect>, seen: Observation) {
    use Effect as F;
    let mut fail = |r: &mut LeaseRecord, why: String, gone: bool, said: &'static str| {
        r.state = LeaseState::Failed;
        r.reason = Some(why);
        r.sandbox_cleaned = gone;
        fx.extend([F::Persist, F::Announce(said)]);
        if !gone {
            delete(r, fx, Duration::ZERO);
        }
    };
    match seen {
        Observation::Gone => fail(
            r,
            "the sandbox disappeared from the provider".into(),
            true,
            "sandbox gone",
        ),
        Observation::Destroyed => fail(
            r,
            "the sandbox was deleted outside crabbox".into(),
            true,
            "sandbox gone",
        ),
        Observation::Error(reason) => fail(
            r,
            format!("the sandbox is in error: {reason}"),
            false,
            "sandbox in error",
        ),
        Observation::Stopped => match r.state {
            LeaseState::Ready => {
                r.state = LeaseState::Stopped;
                fx.extend([F::Persist, F::Announce("stopped by the provider")]);
            }
            // A pooled sandbox is only worth keeping started: the pool makes another.
            LeaseState::Pooled => {
                r.state = LeaseState::Releasing;
                r.reason = Some("stopped by the provider while it waited in the pool".into());
                fx.extend([F::Persist, F::Announce("releasing")]);
                delete(r, fx, Duration::ZERO);
            }
            LeaseState::Pending
            | LeaseState::Creating
            | LeaseState::Syncing
            | LeaseState::Running
            | LeaseState::Stopped
            | LeaseState::Releasing
            | LeaseState::Released
            | LeaseState::Failed => {}
        },
        Observation::Creating | Observation::Started | Observation::Unreachable => {}
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
