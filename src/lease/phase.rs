//! The lease lifecycle: one serializable state enum and one pure transition function.
//!
//! Every state change of a lease goes through [`LeaseState::next`]. It has no catch-all arm:
//! adding a state or an event makes the compiler ask what every pair means. An illegal move
//! is an [`IllegalTransition`], never a silent change.

use serde::{Deserialize, Serialize};

/// Where a lease is in its life (SPEC "Leases"); lowercase in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Recorded, nothing asked of the provider yet.
    Pending,
    /// The provider is creating (or starting) the sandbox.
    Creating,
    /// The sandbox is up and idle.
    Ready,
    /// A checkout is being synced into the sandbox.
    Syncing,
    /// A command is running in the sandbox.
    Running,
    /// The provider stopped the sandbox; the next use starts it again.
    Stopped,
    /// The sandbox is being deleted (the intent is persisted before the call).
    Releasing,
    /// The sandbox is gone. Terminal.
    Released,
    /// Something failed; the reason is kept on the lease. Its sandbox is cleaned up; only a
    /// release moves it on.
    Failed,
}

/// What happened to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Provisioning began: create the sandbox (or start a stopped one).
    Provision,
    /// The sandbox answered ready.
    Provisioned,
    /// A sync began.
    SyncStarted,
    /// A command began (after a sync, or straight from ready).
    ExecStarted,
    /// The sync or the command ended; the sandbox is idle again.
    Finished,
    /// The provider reported the sandbox stopped.
    ProviderStopped,
    /// A release was asked for (stop, expiry, end of a fresh run).
    Release,
    /// The provider confirmed the sandbox is gone.
    Released,
    /// An operation failed.
    Fail,
}

/// A move the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease cannot go from {from} on {event:?}")]
pub struct IllegalTransition {
    /// The state the lease was in.
    pub from: LeaseState,
    /// The event that does not apply there.
    pub event: LeaseEvent,
}

impl LeaseState {
    /// Every state, for tests and counts.
    pub const ALL: [LeaseState; 9] = [
        LeaseState::Pending,
        LeaseState::Creating,
        LeaseState::Ready,
        LeaseState::Syncing,
        LeaseState::Running,
        LeaseState::Stopped,
        LeaseState::Releasing,
        LeaseState::Released,
        LeaseState::Failed,
    ];

    /// The state after `event`, or why that move is illegal.
    pub fn next(self, event: LeaseEvent) -> Result<LeaseState, IllegalTransition> {
        use LeaseEvent as E;
        use LeaseState as S;
        let illegal = Err(IllegalTransition { from: self, event });
        match event {
            E::Provision => match self {
                S::Pending | S::Stopped => Ok(S::Creating),
                S::Creating
                | S::Ready
                | S::Syncing
                | S::Running
                | S::Releasing
                | S::Released
                | S::Failed => illegal,
            },
            E::Provisioned => match self {
                S::Creating => Ok(S::Ready),
                S::Pending
                | S::Ready
                | S::Syncing
                | S::Running
                | S::Stopped
                | S::Releasing
                | S::Released
                | S::Failed => illegal,
            },
            E::SyncStarted => match self {
                S::Ready => Ok(S::Syncing),
                S::Pending
                | S::Creating
                | S::Syncing
                | S::Running
                | S::Stopped
                | S::Releasing
                | S::Released
                | S::Failed => illegal,
            },
            E::ExecStarted => match self {
                S::Ready | S::Syncing => Ok(S::Running),
                S::Pending
                | S::Creating
                | S::Running
                | S::Stopped
                | S::Releasing
                | S::Released
                | S::Failed => illegal,
            },
            E::Finished => match self {
                S::Syncing | S::Running => Ok(S::Ready),
                S::Pending
                | S::Creating
                | S::Ready
                | S::Stopped
                | S::Releasing
                | S::Released
                | S::Failed => illegal,
            },
            E::ProviderStopped => match self {
                S::Ready | S::Stopped => Ok(S::Stopped),
                S::Pending
                | S::Creating
                | S::Syncing
                | S::Running
                | S::Releasing
                | S::Released
                | S::Failed => illegal,
            },
            E::Release => match self {
                S::Pending
                | S::Creating
                | S::Ready
                | S::Syncing
                | S::Running
                | S::Stopped
                | S::Releasing
                | S::Failed => Ok(S::Releasing),
                S::Released => illegal,
            },
            E::Released => match self {
                S::Releasing => Ok(S::Released),
                S::Pending
                | S::Creating
                | S::Ready
                | S::Syncing
                | S::Running
                | S::Stopped
                | S::Released
                | S::Failed => illegal,
            },
            E::Fail => match self {
                S::Pending
                | S::Creating
                | S::Ready
                | S::Syncing
                | S::Running
                | S::Stopped
                | S::Releasing
                | S::Failed => Ok(S::Failed),
                S::Released => illegal,
            },
        }
    }

    /// The lowercase name used in JSON, labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Pending => "pending",
            LeaseState::Creating => "creating",
            LeaseState::Ready => "ready",
            LeaseState::Syncing => "syncing",
            LeaseState::Running => "running",
            LeaseState::Stopped => "stopped",
            LeaseState::Releasing => "releasing",
            LeaseState::Released => "released",
            LeaseState::Failed => "failed",
        }
    }

    /// Does the lease still hold (or may still hold) a sandbox that can be used?
    /// Live leases are the ones `list` shows and repo claims resolve to.
    pub fn is_live(self) -> bool {
        !matches!(
            self,
            LeaseState::Releasing | LeaseState::Released | LeaseState::Failed
        )
    }

    /// Has the lease reached a state where waiting for it makes no more sense?
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            LeaseState::Ready | LeaseState::Stopped | LeaseState::Released | LeaseState::Failed
        )
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::LeaseEvent as E;
    use super::LeaseState as S;
    use super::*;

    const EVENTS: [LeaseEvent; 9] = [
        E::Provision,
        E::Provisioned,
        E::SyncStarted,
        E::ExecStarted,
        E::Finished,
        E::ProviderStopped,
        E::Release,
        E::Released,
        E::Fail,
    ];

    /// The whole table of legal moves; every other (state, event) pair must be refused.
    const LEGAL: &[(LeaseState, LeaseEvent, LeaseState)] = &[
        (S::Pending, E::Provision, S::Creating),
        (S::Stopped, E::Provision, S::Creating),
        (S::Creating, E::Provisioned, S::Ready),
        (S::Ready, E::SyncStarted, S::Syncing),
        (S::Ready, E::ExecStarted, S::Running),
        (S::Syncing, E::ExecStarted, S::Running),
        (S::Syncing, E::Finished, S::Ready),
        (S::Running, E::Finished, S::Ready),
        (S::Ready, E::ProviderStopped, S::Stopped),
        (S::Stopped, E::ProviderStopped, S::Stopped),
        (S::Pending, E::Release, S::Releasing),
        (S::Creating, E::Release, S::Releasing),
        (S::Ready, E::Release, S::Releasing),
        (S::Syncing, E::Release, S::Releasing),
        (S::Running, E::Release, S::Releasing),
        (S::Stopped, E::Release, S::Releasing),
        (S::Releasing, E::Release, S::Releasing),
        (S::Failed, E::Release, S::Releasing),
        (S::Releasing, E::Released, S::Released),
        (S::Pending, E::Fail, S::Failed),
        (S::Creating, E::Fail, S::Failed),
        (S::Ready, E::Fail, S::Failed),
        (S::Syncing, E::Fail, S::Failed),
        (S::Running, E::Fail, S::Failed),
        (S::Stopped, E::Fail, S::Failed),
        (S::Releasing, E::Fail, S::Failed),
        (S::Failed, E::Fail, S::Failed),
    ];

    #[test]
    fn every_pair_is_legal_exactly_when_the_table_says() {
        for from in S::ALL {
            for event in EVENTS {
                let expected = LEGAL
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (from.next(event), expected) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "{from} on {event:?}"),
                    (Err(e), None) => {
                        assert_eq!(e, IllegalTransition { from, event });
                        assert!(e.to_string().contains(from.as_str()));
                    }
                    (got, want) => panic!("{from} on {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn released_is_terminal() {
        for event in EVENTS {
            assert!(S::Released.next(event).is_err(), "{event:?}");
        }
    }

    #[test]
    fn json_names_are_lowercase() {
        for s in S::ALL {
            let json = serde_json::to_string(&s).expect("serialize");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            let back: LeaseState = serde_json::from_str(&json).expect("parse");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn a_whole_life() {
        let mut s = S::Pending;
        for e in [
            E::Provision,
            E::Provisioned,
            E::SyncStarted,
            E::ExecStarted,
            E::Finished,
            E::ProviderStopped,
            E::Provision,
            E::Provisioned,
            E::Release,
            E::Released,
        ] {
            s = s.next(e).expect("legal");
        }
        assert_eq!(s, S::Released);
    }
}
