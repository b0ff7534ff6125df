//! The lease's protocol: the messages its actor takes, the handle other tasks hold, and
//! one [`ask`] (with its timeout) for every request that wants an answer.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, Message, RpcReplyPort};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use super::record::{LeaseRecord, LeaseState};
use super::state::{Amendment, Phase, Taking};
use crate::error::{Error, ProviderError};
use crate::provider::{Provider, SandboxInfo};

/// How long a caller waits for an actor to answer before giving up.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages to a lease actor.
pub enum LeaseMsg {
    /// Sent by the registry right after spawning the actor of a new lease.
    Start,
    /// Sent by the registry right after spawning the actor of a stored lease (a daemon
    /// restart, a restart after a crash): pick up from the stored state.
    Recover,
    /// Sent by the registry's sweep to a lease whose state needs provider work that is not
    /// in flight.
    Retry,
    /// Sent by the registry's sweep now and then: compare with the provider.
    Reconcile,
    /// The Touch RPC: mark the lease used now.
    Touch(RpcReplyPort<Result<LeaseRecord, Error>>),
    /// Sent every few seconds by a running command, and by ssh: the lease is in use.
    KeepAlive,
    /// Sent by a run before it waits for the lease: start it when stopped; refused when it
    /// can never be used.
    Prepare(RpcReplyPort<Result<LeaseRecord, Error>>),
    /// Sent by a run as its sync or command begins; answers what the run needs to act.
    Begin {
        phase: Phase,
        reply: RpcReplyPort<Result<RunTarget, Error>>,
    },
    /// Sent by a run's phase guard when the sync or the command ended, however it ended.
    Finish,
    /// Sent by the registry, which decides who may claim: set or clear the repo claim.
    Claim {
        repo_root: Option<String>,
        reply: RpcReplyPort<Result<LeaseRecord, Error>>,
    },
    /// Release the lease: the Stop RPC, expiry, the end of a fresh run. Answers at once
    /// with the lease in `releasing`; follow it with [`LeaseHandle::state`].
    Release {
        reason: String,
        reply: Option<RpcReplyPort<Result<LeaseRecord, Error>>>,
    },
    /// `crabbox pause`: stop the sandbox, keep the lease; answers once the stop is under
    /// way (follow the lease's task to know when it is done).
    Pause(RpcReplyPort<Result<LeaseRecord, Error>>),
    /// Sent by the seeder once a pooled sandbox holds a repo's checkout.
    Seeded {
        repo_root: String,
        reply: RpcReplyPort<Result<LeaseRecord, Error>>,
    },
    /// Team mode: another daemon took this pooled sandbox (it is that daemon's now).
    HandedOver { to: String },
    /// Sent by the registry: a fresh lease takes this pooled one.
    Take {
        taking: Box<Taking>,
        reply: RpcReplyPort<Result<LeaseRecord, Error>>,
    },
    /// Sent by the run that created the lease when it ends and keeps it.
    Kept,
    /// Sent by a warmup or run that reuses the lease with settings of its own.
    Amend {
        amendment: Amendment,
        reply: RpcReplyPort<Result<LeaseRecord, Error>>,
    },
    /// Sent by the actor's own provider tasks when they end.
    Done(Outcome),
}

/// What a provider task of the actor came back with.
pub enum Outcome {
    Provisioned(Result<SandboxInfo, ProviderError>),
    Deleted(Result<(), ProviderError>),
    Observed(Result<Option<SandboxInfo>, ProviderError>),
    Paused(Result<(), ProviderError>),
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

/// A change of a lease, for the event feed behind `Watch`.
#[derive(Debug, Clone)]
pub struct LeaseChange {
    pub lease: LeaseRecord,
    pub message: String,
}

/// A live lease as other tasks reach it, without a trip through any mailbox for reads.
#[derive(Clone)]
pub struct LeaseHandle {
    pub actor: ActorRef<LeaseMsg>,
    /// The lease as of its last change (the actor publishes every change here).
    pub state: watch::Receiver<LeaseRecord>,
    /// Held for the whole of a run: runs on one lease are serialized.
    pub run_lock: Arc<Mutex<()>>,
    /// Set when what the store says the sandbox holds could not be forgotten after a failed
    /// upload: the next sync must send everything.
    pub manifest_untrusted: Arc<AtomicBool>,
    /// The sandbox was seen, since this daemon started, to hold what the store says (its
    /// digest checked once, or a sync by this daemon): later syncs trust the store.
    pub remote_verified: Arc<AtomicBool>,
}

impl LeaseHandle {
    /// A handle for an actor that publishes on `state`.
    pub fn new(actor: ActorRef<LeaseMsg>, state: watch::Receiver<LeaseRecord>) -> Self {
        LeaseHandle {
            actor,
            state,
            run_lock: Arc::new(Mutex::new(())),
            manifest_untrusted: Arc::new(AtomicBool::new(false)),
            remote_verified: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The lease as of its last change.
    pub fn record(&self) -> LeaseRecord {
        self.state.borrow().clone()
    }

    /// Asks the actor and waits (bounded) for its answer.
    pub async fn ask<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<Result<T, Error>>) -> LeaseMsg,
    ) -> Result<T, Error> {
        ask(&self.actor, "lease actor", msg).await
    }

    /// Tells the actor, without waiting. A stopped actor (a released lease) drops it.
    pub fn tell(&self, msg: LeaseMsg) {
        let _ = self.actor.send_message(msg);
    }
}

/// Asks any actor and waits up to [`ASK_TIMEOUT`] for a fallible answer; `who` names the
/// actor in the error.
pub async fn ask<M: Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    who: &str,
    msg: impl FnOnce(RpcReplyPort<Result<T, Error>>) -> M,
) -> Result<T, Error> {
    match actor.call(msg, Some(ASK_TIMEOUT)).await {
        Ok(CallResult::Success(answer)) => answer,
        Ok(CallResult::Timeout) => Err(Error::Internal(format!(
            "the {who} did not answer within {}s",
            ASK_TIMEOUT.as_secs()
        ))),
        Ok(CallResult::SenderError) => Err(Error::Internal(format!(
            "the {who} stopped before answering (see the daemon log)"
        ))),
        Err(e) => Err(Error::Internal(format!("the {who} is unreachable: {e}"))),
    }
}

/// How many leases with a live actor are in each state, kept as they move: read in
/// O(1) whatever the number of leases (`Info`).
#[derive(Debug, Default)]
pub struct StateCounts([std::sync::atomic::AtomicI64; LeaseState::ALL.len()]);

impl StateCounts {
    fn add(&self, s: LeaseState, n: i64) {
        self.0[s as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The states with at least one lease, and how many.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        LeaseState::ALL
            .iter()
            .filter_map(|s| {
                let n = self.0[*s as usize].load(std::sync::atomic::Ordering::Relaxed);
                (n > 0).then_some((s.as_str(), n as u64))
            })
            .collect()
    }
}

/// Where a lease actor publishes each change of its record: the watch channel its handle
/// reads, and the state counts (this actor counts once, in its latest state, until it
/// ends).
pub struct Publisher {
    tx: tokio::sync::watch::Sender<LeaseRecord>,
    counts: std::sync::Arc<StateCounts>,
}

impl Publisher {
    pub fn new(
        tx: tokio::sync::watch::Sender<LeaseRecord>,
        counts: std::sync::Arc<StateCounts>,
    ) -> Publisher {
        counts.add(tx.borrow().state, 1);
        Publisher { tx, counts }
    }

    pub fn send(&self, record: LeaseRecord) {
        let new = record.state;
        let old = self.tx.send_replace(record).state;
        if old != new {
            self.counts.add(old, -1);
            self.counts.add(new, 1);
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.counts.add(self.tx.borrow().state, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_each_actor_to_its_latest_state_and_forget_it_when_it_ends() {
        let counts = Arc::new(StateCounts::default());
        let (tx, _rx) = watch::channel(LeaseRecord::sample(LeaseState::Pending));
        let a = Publisher::new(tx, counts.clone());
        let (tx, _rx2) = watch::channel(LeaseRecord::sample(LeaseState::Pending));
        let b = Publisher::new(tx, counts.clone());
        assert_eq!(counts.snapshot(), vec![("pending", 2)]);
        a.send(LeaseRecord::sample(LeaseState::Ready));
        a.send(LeaseRecord::sample(LeaseState::Ready));
        b.send(LeaseRecord::sample(LeaseState::Creating));
        assert_eq!(counts.snapshot(), vec![("creating", 1), ("ready", 1)]);
        drop(a);
        assert_eq!(counts.snapshot(), vec![("creating", 1)]);
        drop(b);
        assert!(counts.snapshot().is_empty());
    }
}
