//! One actor per lease. It alone changes its lease: every move goes through the pure
//! transition function, is persisted, then published (index watch + event feed).
//!
//! Provider calls never run in the mailbox: the actor spawns them and gets their result
//! back as a message, so `Get`, `Touch` and `Stop` answer while a slow create is running.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{LeaseEvent, LeaseRecord, LeaseState, now_ms};
use crate::daemon::Shared;
use crate::daemon::index::LeaseHandle;
use crate::error::Error;
use crate::provider::{
    CreateSpec, Provider, ProviderError, ProviderErrorKind, SandboxInfo, SandboxState,
};

/// Which part of a run is starting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    Sync,
    Exec,
}

/// What a run needs to act on the sandbox, handed out by [`LeaseMsg::Begin`].
#[derive(Clone)]
pub struct RunTarget {
    pub sandbox: String,
    pub provider: Arc<dyn Provider>,
    /// `<work_root>/<lease id>`: the repo's folder goes below it.
    pub lease_dir: String,
    /// Fires when the lease is released (or the daemon shuts down): the run must stop.
    pub cancel: CancellationToken,
}

/// Messages to a lease actor.
pub enum LeaseMsg {
    /// Sent by the registry right after spawning the actor (and after a daemon restart):
    /// pick up the lease from whatever state the store had and drive it on.
    Recover,
    /// Create the sandbox, or start it again when stopped. Sent by the registry for a new
    /// lease and by a run that finds its lease stopped.
    Provision,
    /// The provisioning task's outcome.
    ProvisionDone(Result<SandboxInfo, ProviderError>),
    /// The lease as it is now.
    Get(RpcReplyPort<LeaseRecord>),
    /// Mark the lease used now (Touch RPC).
    Touch(RpcReplyPort<Result<LeaseRecord, Error>>),
    /// Same, without an answer: sent every few seconds by a running command.
    KeepAlive,
    /// A run starts its sync or its command; answers what it needs to act.
    Begin {
        phase: RunPhase,
        reply: RpcReplyPort<Result<RunTarget, Error>>,
    },
    /// The run's sync (without a command after it) or command ended.
    Finish,
    /// Set or clear the repo claim (the registry decides who may claim).
    SetRepo {
        repo_root: Option<String>,
        reply: RpcReplyPort<LeaseRecord>,
    },
    /// Release the lease: Stop RPC, expiry, the end of a fresh run. Answers at once with the
    /// lease in `releasing`; follow it with the watch channel.
    Release {
        reason: String,
        reply: Option<RpcReplyPort<Result<LeaseRecord, Error>>>,
    },
    /// The release task's outcome.
    ReleaseDone(Result<(), ProviderError>),
    /// Delete the sandbox of a failed lease (kept failed, for people to read why).
    Cleanup,
    /// The cleanup task's outcome.
    CleanupDone(Result<(), ProviderError>),
    /// Compare with the provider (at recovery, and now and then from the registry's sweep).
    Reconcile,
    /// The reconcile task's observation (`None`: the sandbox is gone).
    Observed(Result<Option<SandboxInfo>, ProviderError>),
}

/// The lease actor (stateless itself; its state is [`LeaseState`]).
pub struct LeaseActor;

/// What a lease actor starts from.
pub struct LeaseArgs {
    pub record: LeaseRecord,
    pub shared: Arc<Shared>,
}

/// A lease actor's state.
pub struct LeaseActorState {
    record: LeaseRecord,
    shared: Arc<Shared>,
    provider: Arc<dyn Provider>,
    tx: watch::Sender<LeaseRecord>,
    /// The running provisioning task and its cancel token.
    provisioning: Option<(JoinHandle<()>, CancellationToken)>,
    /// Cancelled on release: stops the lease's running command.
    runs: CancellationToken,
    /// A release or cleanup task is in flight.
    busy_releasing: bool,
    /// Backoff for repeated release failures.
    release_attempts: u32,
}

/// How long a provisioning task may take before the lease fails.
const RELEASE_BACKOFF_CAP: Duration = Duration::from_secs(60);

impl Actor for LeaseActor {
    type Msg = LeaseMsg;
    type State = LeaseActorState;
    type Arguments = LeaseArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LeaseMsg>,
        args: LeaseArgs,
    ) -> Result<LeaseActorState, ActorProcessingErr> {
        let provider = args
            .shared
            .providers
            .get(&args.record.provider)
            .cloned()
            .ok_or_else(|| format!("provider {} is not configured", args.record.provider))?;
        let (tx, rx) = watch::channel(args.record.clone());
        args.shared.leases.insert(
            args.record.id.clone(),
            LeaseHandle {
                actor: myself,
                state: rx,
                run_lock: Arc::new(Mutex::new(())),
            },
        );
        Ok(LeaseActorState {
            runs: args.shared.shutdown.child_token(),
            record: args.record,
            shared: args.shared,
            provider,
            tx,
            provisioning: None,
            busy_releasing: false,
            release_attempts: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LeaseMsg>,
        msg: LeaseMsg,
        st: &mut LeaseActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LeaseMsg::Recover => st.recover(&myself),
            LeaseMsg::Provision => st.provision(&myself),
            LeaseMsg::ProvisionDone(result) => st.provisioned(&myself, result),
            LeaseMsg::Get(reply) => {
                let _ = reply.send(st.record.clone());
            }
            LeaseMsg::Touch(reply) => {
                let _ = reply.send(st.touch(true));
            }
            LeaseMsg::KeepAlive => {
                let _ = st.touch(false);
            }
            LeaseMsg::Begin { phase, reply } => {
                let _ = reply.send(st.begin(phase));
            }
            LeaseMsg::Finish => {
                if matches!(st.record.state, LeaseState::Syncing | LeaseState::Running) {
                    st.record.last_touched_ms = now_ms();
                    st.apply(LeaseEvent::Finished, None, "run finished");
                }
            }
            LeaseMsg::SetRepo { repo_root, reply } => {
                st.record.repo_root = repo_root;
                st.persist("claim changed");
                let _ = reply.send(st.record.clone());
            }
            LeaseMsg::Release { reason, reply } => {
                let r = st.release(&myself, reason);
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            LeaseMsg::ReleaseDone(result) => st.released(&myself, result),
            LeaseMsg::Cleanup => st.cleanup(&myself),
            LeaseMsg::CleanupDone(result) => {
                st.busy_releasing = false;
                match result {
                    Ok(()) => {
                        st.record.sandbox_cleaned = true;
                        st.persist("sandbox of the failed lease deleted");
                    }
                    Err(e) => tracing::warn!(lease = %st.record.id, error = %e,
                        "could not delete the sandbox of a failed lease; will retry"),
                }
            }
            LeaseMsg::Reconcile => st.reconcile(&myself),
            LeaseMsg::Observed(result) => st.observed(result),
        }
        Ok(())
    }
}

impl LeaseActorState {
    /// Moves the lease with `event`, persists and publishes. An illegal move is logged and
    /// changes nothing.
    fn apply(&mut self, event: LeaseEvent, reason: Option<String>, message: &str) -> bool {
        match self.record.state.next(event) {
            Ok(next) => {
                self.record.state = next;
                if reason.is_some() {
                    self.record.reason = reason;
                }
                self.persist(message);
                true
            }
            Err(e) => {
                tracing::warn!(lease = %self.record.id, error = %e, "ignored illegal lease move");
                false
            }
        }
    }

    /// Writes the record to the store, then tells the index and the watchers.
    fn persist(&mut self, message: &str) {
        if let Err(e) = self.shared.store.put_lease(&self.record) {
            tracing::error!(lease = %self.record.id, error = %e, "could not persist lease");
        }
        self.tx.send_replace(self.record.clone());
        self.shared.leases.publish(self.record.clone(), message);
        tracing::debug!(lease = %self.record.id, state = %self.record.state, message);
    }

    /// Pushes the current labels to the provider, in the background.
    fn push_labels(&self) {
        let provider = self.provider.clone();
        let sandbox = self.record.sandbox_ref().to_string();
        let labels = self.record.labels();
        let id = self.record.id.clone();
        tokio::spawn(async move {
            if let Err(e) = provider.set_labels(&sandbox, &labels).await {
                tracing::debug!(lease = %id, error = %e, "could not update sandbox labels");
            }
        });
    }

    fn recover(&mut self, myself: &ActorRef<LeaseMsg>) {
        match self.record.state {
            LeaseState::Pending => self.provision(myself),
            LeaseState::Creating => self.spawn_provisioning(myself),
            LeaseState::Syncing | LeaseState::Running => {
                self.apply(
                    LeaseEvent::Finished,
                    Some("the daemon restarted during a run; that command was lost".into()),
                    "recovered after a restart",
                );
                self.reconcile(myself);
            }
            LeaseState::Ready | LeaseState::Stopped => self.reconcile(myself),
            LeaseState::Releasing => self.spawn_release(myself),
            LeaseState::Failed => {
                if !self.record.sandbox_cleaned {
                    self.cleanup(myself);
                }
            }
            LeaseState::Released => {}
        }
    }

    fn provision(&mut self, myself: &ActorRef<LeaseMsg>) {
        if self.apply(LeaseEvent::Provision, None, "provisioning the sandbox") {
            self.spawn_provisioning(myself);
        }
    }

    fn spawn_provisioning(&mut self, myself: &ActorRef<LeaseMsg>) {
        if self.provisioning.is_some() {
            return;
        }
        let token = CancellationToken::new();
        let provider = self.provider.clone();
        let record = self.record.clone();
        let deadline = self.shared.provision_deadline;
        let me = myself.clone();
        let cancel = token.clone();
        let task = tokio::spawn(async move {
            let result = tokio::select! {
                r = provision_sandbox(provider.as_ref(), &record, deadline) => r,
                () = cancel.cancelled() => return,
            };
            let _ = me.send_message(LeaseMsg::ProvisionDone(result));
        });
        self.provisioning = Some((task, token));
    }

    fn provisioned(
        &mut self,
        myself: &ActorRef<LeaseMsg>,
        result: Result<SandboxInfo, ProviderError>,
    ) {
        self.provisioning = None;
        if self.record.state != LeaseState::Creating {
            // Released (or failed) while the create was in flight: the release task owns
            // the sandbox now.
            return;
        }
        match result {
            Ok(sandbox) => {
                self.record.sandbox_id = Some(sandbox.id);
                self.record.reason = None;
                self.record.last_touched_ms = now_ms();
                self.apply(LeaseEvent::Provisioned, None, "ready");
                self.push_labels();
            }
            Err(e) => {
                self.apply(
                    LeaseEvent::Fail,
                    Some(format!("provisioning failed: {e}")),
                    "provisioning failed",
                );
                self.cleanup(myself);
            }
        }
    }

    fn touch(&mut self, loud: bool) -> Result<LeaseRecord, Error> {
        if !self.record.state.is_live() {
            return Err(Error::WrongState(format!(
                "lease {} is {}{}; nothing to touch",
                self.record.slug,
                self.record.state,
                self.record
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )));
        }
        self.record.last_touched_ms = now_ms();
        if loud {
            self.persist("touched");
            self.push_labels();
        } else {
            // Keep-alives from a running command come every few seconds: keep the store
            // write, skip the event feed noise.
            if let Err(e) = self.shared.store.put_lease(&self.record) {
                tracing::error!(lease = %self.record.id, error = %e, "could not persist lease");
            }
            self.tx.send_replace(self.record.clone());
        }
        Ok(self.record.clone())
    }

    fn begin(&mut self, phase: RunPhase) -> Result<RunTarget, Error> {
        let event = match phase {
            RunPhase::Sync => LeaseEvent::SyncStarted,
            RunPhase::Exec => LeaseEvent::ExecStarted,
        };
        let next = self.record.state.next(event).map_err(|_| {
            Error::WrongState(format!(
                "lease {} is {}, not ready{}",
                self.record.slug,
                self.record.state,
                self.record
                    .reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ))
        })?;
        let sandbox = self.record.sandbox_id.clone().ok_or_else(|| {
            Error::Internal(format!("lease {} has no sandbox id", self.record.id))
        })?;
        let lease_dir = format!(
            "{}/{}",
            self.provider.work_root(&self.record.sandbox_name),
            self.record.id
        );
        self.record.state = next;
        self.record.last_touched_ms = now_ms();
        self.persist(match phase {
            RunPhase::Sync => "syncing",
            RunPhase::Exec => "running",
        });
        Ok(RunTarget {
            sandbox,
            provider: self.provider.clone(),
            lease_dir,
            cancel: self.runs.clone(),
        })
    }

    fn release(
        &mut self,
        myself: &ActorRef<LeaseMsg>,
        reason: String,
    ) -> Result<LeaseRecord, Error> {
        match self.record.state {
            LeaseState::Released => return Ok(self.record.clone()),
            LeaseState::Releasing => {}
            _ => {
                // The intent is persisted before anything is asked of the provider.
                self.apply(LeaseEvent::Release, Some(reason), "releasing");
            }
        }
        self.runs.cancel();
        self.spawn_release(myself);
        Ok(self.record.clone())
    }

    fn spawn_release(&mut self, myself: &ActorRef<LeaseMsg>) {
        if self.busy_releasing {
            return;
        }
        self.busy_releasing = true;
        let provisioning = self.provisioning.take();
        let provider = self.provider.clone();
        let record = self.record.clone();
        let me = myself.clone();
        let delay = backoff(self.release_attempts);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A create may still be in flight: stop it and let it settle before deleting,
            // so the delete cannot overtake it. Orphans left by a race are caught by the
            // registry's owner-label sweep.
            if let Some((task, token)) = provisioning {
                token.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            let result = delete_owned(provider.as_ref(), &record).await;
            let _ = me.send_message(LeaseMsg::ReleaseDone(result));
        });
    }

    fn released(&mut self, myself: &ActorRef<LeaseMsg>, result: Result<(), ProviderError>) {
        self.busy_releasing = false;
        match result {
            Ok(()) => {
                self.apply(LeaseEvent::Released, None, "released");
                if let Err(e) = self.shared.store.delete_manifest(&self.record.id) {
                    tracing::warn!(lease = %self.record.id, error = %e, "could not drop the sync manifest");
                }
                self.shared.leases.remove(&self.record.id);
                myself.stop(Some("released".into()));
            }
            Err(e) => {
                self.release_attempts += 1;
                self.record.reason = Some(format!("release failed, retrying: {e}"));
                self.persist("release failed; retrying");
                tracing::warn!(lease = %self.record.id, error = %e, attempt = self.release_attempts, "release failed; retrying");
                self.spawn_release(myself);
            }
        }
    }

    fn cleanup(&mut self, myself: &ActorRef<LeaseMsg>) {
        if self.record.state != LeaseState::Failed
            || self.record.sandbox_cleaned
            || self.busy_releasing
        {
            return;
        }
        self.busy_releasing = true;
        self.runs.cancel();
        let provisioning = self.provisioning.take();
        let provider = self.provider.clone();
        let record = self.record.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            if let Some((task, token)) = provisioning {
                token.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            let result = delete_owned(provider.as_ref(), &record).await;
            let _ = me.send_message(LeaseMsg::CleanupDone(result));
        });
    }

    fn reconcile(&mut self, myself: &ActorRef<LeaseMsg>) {
        if !matches!(self.record.state, LeaseState::Ready | LeaseState::Stopped) {
            return;
        }
        let provider = self.provider.clone();
        let sandbox = self.record.sandbox_ref().to_string();
        let me = myself.clone();
        tokio::spawn(async move {
            let result = provider.get(&sandbox).await;
            let _ = me.send_message(LeaseMsg::Observed(result));
        });
    }

    fn observed(&mut self, result: Result<Option<SandboxInfo>, ProviderError>) {
        if !matches!(self.record.state, LeaseState::Ready | LeaseState::Stopped) {
            return;
        }
        match result {
            Ok(None) => {
                self.record.sandbox_cleaned = true;
                self.apply(
                    LeaseEvent::Fail,
                    Some("the sandbox disappeared from the provider".into()),
                    "sandbox gone",
                );
            }
            Ok(Some(sb)) => match sb.state {
                SandboxState::Stopped if self.record.state == LeaseState::Ready => {
                    self.apply(LeaseEvent::ProviderStopped, None, "stopped by the provider");
                }
                SandboxState::Error(reason) => {
                    self.apply(
                        LeaseEvent::Fail,
                        Some(format!("the sandbox is in error: {reason}")),
                        "sandbox in error",
                    );
                }
                SandboxState::Destroyed => {
                    self.record.sandbox_cleaned = true;
                    self.apply(
                        LeaseEvent::Fail,
                        Some("the sandbox was deleted outside crabbox".into()),
                        "sandbox gone",
                    );
                }
                SandboxState::Creating | SandboxState::Started | SandboxState::Stopped => {}
            },
            // The provider could not be asked; the next sweep asks again.
            Err(e) => tracing::debug!(lease = %self.record.id, error = %e, "reconcile skipped"),
        }
    }
}

fn backoff(attempts: u32) -> Duration {
    if attempts == 0 {
        return Duration::ZERO;
    }
    let secs = 1u64 << attempts.min(6);
    Duration::from_secs(secs).min(RELEASE_BACKOFF_CAP)
}

/// Creates the lease's sandbox, or adopts the one a previous attempt created (found by its
/// name and checked by its labels), starts it when stopped, and waits until it is ready.
async fn provision_sandbox(
    provider: &dyn Provider,
    record: &LeaseRecord,
    deadline: Duration,
) -> Result<SandboxInfo, ProviderError> {
    let existing = match &record.sandbox_id {
        Some(id) => provider.get(id).await?,
        None => provider.get(&record.sandbox_name).await?,
    };
    let sandbox = match existing {
        Some(sb) if record.owns(&sb.labels) => sb,
        Some(sb) => {
            return Err(ProviderError::new(
                ProviderErrorKind::Provisioning,
                format!(
                    "a sandbox named {} exists but is not this lease's (its labels do not \
                     match); crabbox will not touch it",
                    sb.name
                ),
            ));
        }
        None => {
            provider
                .create(&CreateSpec {
                    name: record.sandbox_name.clone(),
                    labels: record.labels(),
                    options: record.provider_options.clone(),
                })
                .await?
        }
    };
    // Read the labels back: only a sandbox that carries this lease's ownership labels is
    // ever used (or later deleted).
    let seen = provider.get(&sandbox.id).await?.ok_or_else(|| {
        ProviderError::new(
            ProviderErrorKind::Provisioning,
            format!("sandbox {} vanished right after it was created", sandbox.id),
        )
    })?;
    if !record.owns(&seen.labels) {
        return Err(ProviderError::new(
            ProviderErrorKind::Provisioning,
            format!(
                "sandbox {} does not carry this lease's ownership labels; crabbox will not use it",
                sandbox.id
            ),
        ));
    }
    if seen.state == SandboxState::Stopped {
        provider.start(&sandbox.id).await?;
    }
    provider.wait_ready(&sandbox.id, deadline).await
}

/// Deletes the lease's sandbox if it exists and carries this lease's ownership labels.
/// Gone already is a success; a sandbox that is not ours is left alone.
pub async fn delete_owned(
    provider: &dyn Provider,
    record: &LeaseRecord,
) -> Result<(), ProviderError> {
    let found = match provider.get(record.sandbox_ref()).await? {
        Some(sb) => Some(sb),
        None if record.sandbox_id.is_some() => provider.get(&record.sandbox_name).await?,
        None => None,
    };
    match found {
        None => Ok(()),
        Some(sb) if record.owns(&sb.labels) => match provider.release(&sb.id).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        },
        Some(sb) => {
            tracing::warn!(lease = %record.id, sandbox = %sb.name,
                "not deleting a sandbox without this lease's ownership labels");
            Ok(())
        }
    }
}
