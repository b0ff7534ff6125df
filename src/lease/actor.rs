//! One actor per lease. It alone changes its lease: every message becomes an [`Event`],
//! [`step`] decides, and the actor carries out the effects in order: the store write
//! first, then the watchers, then provider work in spawned tasks whose results come back as
//! messages. So `Touch` and `Stop` answer while a slow create is running.
//!
//! The actor knows a narrow [`LeaseCtx`]: its store, its provider, the event feed, a
//! deadline and the shutdown token; not the daemon.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::handle::{LeaseChange, LeaseMsg, Outcome, Publisher, RunTarget};
use super::ops;
use super::record::LeaseRecord;
use super::state::{Effect, Event, Observation, step};
use super::store::Durability;
use super::store::Store;
use crate::clock::now_ms;
use crate::error::{Error, ProviderError, ProviderErrorKind};
use crate::provider::{Provider, SandboxInfo, SandboxState};

/// What a lease actor may use.
#[derive(Clone)]
pub struct LeaseCtx {
    pub store: Arc<Store>,
    pub provider: Arc<dyn Provider>,
    /// The event feed behind `Watch`.
    pub events: broadcast::Sender<LeaseChange>,
    /// How long a sandbox may take to become ready.
    pub provision_deadline: Duration,
    /// Cancelled at shutdown; the lease's run token is a child of it.
    pub shutdown: CancellationToken,
}

/// What a lease actor starts from.
pub struct LeaseArgs {
    pub record: LeaseRecord,
    pub ctx: LeaseCtx,
    /// Where the actor publishes every change of its record (the registry holds the
    /// receiving end in its index).
    pub publish: Publisher,
}

/// The lease actor (stateless itself; its state is [`LeaseActorState`]).
pub struct LeaseActor;

/// A lease actor's state.
pub struct LeaseActorState {
    record: LeaseRecord,
    ctx: LeaseCtx,
    publish: Publisher,
    /// The provisioning task and its cancel token, for a delete that must let it settle.
    provisioning: Option<(JoinHandle<()>, CancellationToken)>,
    /// Cancelled on release: stops the lease's running command.
    runs: CancellationToken,
}

/// How long a delete waits for a cancelled create to settle.
const CREATE_SETTLE: Duration = Duration::from_secs(10);

impl Actor for LeaseActor {
    type Msg = LeaseMsg;
    type State = LeaseActorState;
    type Arguments = LeaseArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<LeaseMsg>,
        args: LeaseArgs,
    ) -> Result<LeaseActorState, ActorProcessingErr> {
        Ok(LeaseActorState {
            runs: args.ctx.shutdown.child_token(),
            record: args.record,
            ctx: args.ctx,
            publish: args.publish,
            provisioning: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LeaseMsg>,
        msg: LeaseMsg,
        st: &mut LeaseActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LeaseMsg::Start => st.quietly(&myself, Event::Start),
            LeaseMsg::Recover => st.quietly(&myself, Event::Recover),
            LeaseMsg::Retry => st.quietly(&myself, Event::Retry),
            LeaseMsg::Reconcile => st.quietly(&myself, Event::Reconcile),
            LeaseMsg::KeepAlive => st.quietly(&myself, Event::KeepAlive),
            LeaseMsg::Finish => st.quietly(&myself, Event::Finish),
            LeaseMsg::Kept => st.quietly(&myself, Event::Kept),
            LeaseMsg::Amend { amendment, reply } => {
                st.answer(&myself, Event::Amend(amendment), reply)
            }
            LeaseMsg::Take { taking, reply } => st.answer(&myself, Event::Take(taking), reply),
            LeaseMsg::Pause(reply) => st.answer(&myself, Event::Pause, reply),
            LeaseMsg::HandedOver { to } => {
                let _ = st.apply(&myself, Event::HandedOver { to });
            }
            LeaseMsg::Seeded { repo_root, reply } => {
                st.answer(&myself, Event::Seeded { repo_root }, reply)
            }
            LeaseMsg::Touch(reply) => st.answer(&myself, Event::Touch, reply),
            LeaseMsg::Prepare(reply) => st.answer(&myself, Event::Prepare, reply),
            LeaseMsg::Claim { repo_root, reply } => {
                st.answer(&myself, Event::Claim { repo_root }, reply)
            }
            LeaseMsg::Release { reason, reply } => {
                let r = st.apply(&myself, Event::Release { reason });
                if let Some(reply) = reply {
                    let _ = reply.send(r.map(|()| st.record.clone()));
                }
            }
            LeaseMsg::Begin { phase, reply } => {
                let r = st
                    .apply(&myself, Event::Begin(phase))
                    .map(|()| st.run_target());
                let _ = reply.send(r);
            }
            LeaseMsg::Done(outcome) => {
                if matches!(outcome, Outcome::Provisioned(_)) {
                    // Its task has ended: its handle (and the task's memory) can go.
                    st.provisioning = None;
                }
                let event = match outcome {
                    Outcome::Provisioned(Ok(sb)) => Event::Provisioned { sandbox_id: sb.id },
                    Outcome::Provisioned(Err(e)) => Event::ProvisionFailed {
                        auth: matches!(
                            e.kind,
                            ProviderErrorKind::Auth | ProviderErrorKind::Permission
                        ),
                        error: e.to_string(),
                    },
                    Outcome::Deleted(Ok(())) => Event::Deleted,
                    Outcome::Deleted(Err(e)) => {
                        tracing::warn!(lease = %st.record.id, error = %e, "could not delete the sandbox; will retry");
                        Event::DeleteFailed {
                            error: e.to_string(),
                        }
                    }
                    Outcome::Observed(seen) => Event::Observed(observation(&st.record.id, seen)),
                    Outcome::Paused(r) => Event::Paused(r.map_err(|e| e.to_string())),
                };
                st.quietly(&myself, event);
            }
        }
        Ok(())
    }
}

/// What an observing task's answer means for the lease.
fn observation(id: &str, seen: Result<Option<SandboxInfo>, ProviderError>) -> Observation {
    match seen {
        Ok(None) => Observation::Gone,
        Ok(Some(sb)) => match sb.state {
            SandboxState::Creating => Observation::Creating,
            SandboxState::Started => Observation::Started,
            SandboxState::Stopped => Observation::Stopped,
            SandboxState::Error(reason) => Observation::Error(reason),
            SandboxState::Destroyed => Observation::Destroyed,
        },
        Err(e) => {
            tracing::debug!(lease = %id, error = %e, "reconcile skipped");
            Observation::Unreachable
        }
    }
}

impl LeaseActorState {
    /// Applies an event nobody waits on; a refusal or a failed store write is logged.
    fn quietly(&mut self, myself: &ActorRef<LeaseMsg>, event: Event) {
        if let Err(e) = self.apply(myself, event) {
            tracing::warn!(lease = %self.record.id, error = %e, "lease event not applied");
        }
    }

    /// Applies an event and answers with the lease as it is after it.
    fn answer(
        &mut self,
        myself: &ActorRef<LeaseMsg>,
        event: Event,
        reply: RpcReplyPort<Result<LeaseRecord, Error>>,
    ) {
        let r = self.apply(myself, event).map(|()| self.record.clone());
        let _ = reply.send(r);
    }

    /// Steps the lease and carries out the effects in order. When the store write fails,
    /// the lease stays as it was and nothing after the write is done.
    ///
    /// The watch channel is updated before the event feed: a `Watch` subscribes to the feed
    /// and then reads the watch channel, so a change it finds announced is always visible.
    fn apply(&mut self, myself: &ActorRef<LeaseMsg>, event: Event) -> Result<(), Error> {
        let step = step(&self.record, event, now_ms())?;
        let before = std::mem::replace(&mut self.record, step.record);
        let mut published = false;
        for effect in step.effects {
            match effect {
                Effect::Persist | Effect::PersistLazily => {
                    let durability = if effect == Effect::Persist {
                        Durability::Now
                    } else {
                        Durability::Lazy
                    };
                    if let Err(e) = self.ctx.store.put_lease_with(&self.record, durability) {
                        tracing::error!(lease = %self.record.id, error = %e, "could not persist the lease; nothing done");
                        self.record = before;
                        return Err(e);
                    }
                    self.publish.send(self.record.clone());
                    published = true;
                }
                Effect::Announce(message) => {
                    if !published {
                        self.publish.send(self.record.clone());
                        published = true;
                    }
                    log_life(&self.record, message);
                    // No subscriber is fine.
                    let _ = self.ctx.events.send(LeaseChange {
                        lease: self.record.clone(),
                        message: message.into(),
                    });
                }
                Effect::Provision => self.spawn_provisioning(myself),
                Effect::Delete { after } => self.spawn_delete(myself, after),
                Effect::Observe => {
                    let provider = self.ctx.provider.clone();
                    let sandbox = self.record.sandbox_ref().to_string();
                    spawn_task(myself, self.span(), Outcome::Observed, async move {
                        provider.get(&sandbox).await
                    });
                }
                Effect::Pause => {
                    let provider = self.ctx.provider.clone();
                    let sandbox = self.record.sandbox_ref().to_string();
                    spawn_task(myself, self.span(), Outcome::Paused, async move {
                        provider.stop(&sandbox).await
                    });
                }
                Effect::PushLabels => self.push_labels(),
                Effect::CancelRuns => self.runs.cancel(),
                Effect::ForgetManifest => {
                    if let Err(e) = self.ctx.store.delete_manifest(&self.record.id) {
                        tracing::warn!(lease = %self.record.id, error = %e, "could not drop the sync manifest of a released lease");
                    }
                }
                Effect::Stop => myself.stop(Some("released".into())),
            }
        }
        if !published && self.record != before {
            // A change of the in-flight task only: no store write, no event.
            self.publish.send(self.record.clone());
        }
        Ok(())
    }

    /// What a run needs once `Begin` moved the lease.
    fn run_target(&self) -> RunTarget {
        RunTarget {
            sandbox: self.record.sandbox_ref().to_string(),
            provider: self.ctx.provider.clone(),
            lease_dir: format!(
                "{}/{}",
                self.ctx.provider.work_root(&self.record.sandbox_name),
                self.record.id
            ),
            cancel: self.runs.clone(),
        }
    }

    /// The span the lease's provider work runs in: its lines reach `crabbox -v`
    /// ([`crate::relay`]), whatever the log's level.
    fn span(&self) -> tracing::Span {
        tracing::debug_span!("lease", lease = %self.record.id)
    }

    fn spawn_provisioning(&mut self, myself: &ActorRef<LeaseMsg>) {
        let token = CancellationToken::new();
        let provider = self.ctx.provider.clone();
        let record = self.record.clone();
        let deadline = self.ctx.provision_deadline;
        let me = myself.clone();
        let cancel = token.clone();
        let span = self.span();
        let task = tokio::spawn(async move {
            let work = tokio::spawn(
                async move { ops::provision::provision(provider.as_ref(), &record, deadline).await }
                    .instrument(span),
            );
            let abort = work.abort_handle();
            let result = tokio::select! {
                r = work => r.unwrap_or_else(|e| Err(task_died(e))),
                () = cancel.cancelled() => {
                    abort.abort();
                    return;
                }
            };
            let _ = me.send_message(LeaseMsg::Done(Outcome::Provisioned(result)));
        });
        self.provisioning = Some((task, token));
    }

    fn spawn_delete(&mut self, myself: &ActorRef<LeaseMsg>, after: Duration) {
        let provisioning = self.provisioning.take();
        let provider = self.ctx.provider.clone();
        let record = self.record.clone();
        spawn_task(myself, self.span(), Outcome::Deleted, async move {
            tokio::time::sleep(after).await;
            // A create may still be in flight: stop it and let it settle before deleting,
            // so the delete cannot overtake it. Orphans left by a race are caught by the
            // registry's owner-label sweep.
            if let Some((task, token)) = provisioning {
                token.cancel();
                let _ = tokio::time::timeout(CREATE_SETTLE, task).await;
            }
            ops::release::delete_owned(provider.as_ref(), &record).await
        });
    }

    /// Pushes the current labels to the provider, in the background.
    fn push_labels(&self) {
        let provider = self.ctx.provider.clone();
        let sandbox = self.record.sandbox_ref().to_string();
        let labels = self.record.labels();
        let id = self.record.id.clone();
        let record = self.record.clone();
        tokio::spawn(async move {
            if let Err(e) = provider.set_labels(&sandbox, &labels).await {
                tracing::debug!(lease = %id, error = %e, "could not update sandbox labels");
                return;
            }
            // Read back: the sandbox must still say it is this lease's (a relabel of a
            // pooled sandbox is checked before and after).
            match provider.get(&sandbox).await {
                Ok(Some(sb)) if !record.owns(&sb.labels) => {
                    tracing::error!(lease = %id, %sandbox, "after a relabel the sandbox does not carry this lease's ownership labels; crabbox will not delete it");
                }
                _ => {}
            }
        });
    }
}

/// A lease's life in the daemon's log: the moves a person looks for (ready, pooled,
/// stopped, failed, released) at info with the reason and how long it took or lived, the
/// rest at debug.
fn log_life(r: &LeaseRecord, message: &str) {
    use crate::lease::LeaseState as S;
    let age =
        crate::clock::human_secs(crate::clock::now_ms().saturating_sub(r.created_at_ms) / 1000);
    let reason = r.reason.as_deref().unwrap_or("");
    match r.state {
        S::Ready | S::Pooled if matches!(message, "ready" | "pooled" | "taken from the pool") => {
            tracing::info!(lease = %r.id, slug = %r.slug, provider = %r.provider,
                sandbox = %r.sandbox_name, after = %age, "lease {message}")
        }
        S::Failed => tracing::warn!(lease = %r.id, slug = %r.slug, after = %age, %reason,
            "lease {message}"),
        S::Released => tracing::info!(lease = %r.id, slug = %r.slug, lived = %age, %reason,
            "lease released"),
        S::Stopped if message == "paused" || message.starts_with("stopped") => {
            tracing::info!(lease = %r.id, slug = %r.slug, %reason, "lease {message}")
        }
        _ => tracing::debug!(lease = %r.id, state = %r.state, message),
    }
}

/// Runs provider work in its own task and sends its outcome back to the actor. A task that
/// panics still answers (as a failure), so the lease never waits on a task that is gone.
fn spawn_task<T: Send + 'static>(
    myself: &ActorRef<LeaseMsg>,
    span: tracing::Span,
    outcome: fn(Result<T, ProviderError>) -> Outcome,
    work: impl Future<Output = Result<T, ProviderError>> + Send + 'static,
) {
    let me = myself.clone();
    tokio::spawn(async move {
        let result = tokio::spawn(work.instrument(span))
            .await
            .unwrap_or_else(|e| Err(task_died(e)));
        let _ = me.send_message(LeaseMsg::Done(outcome(result)));
    });
}

fn task_died(e: tokio::task::JoinError) -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Other,
        format!("the provider task ended abnormally ({e}); see the daemon log"),
    )
}
