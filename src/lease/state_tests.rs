//! The lifecycle's laws, checked over every (state, task, event), and its table of moves.

use super::Effect as F;
use super::LeaseState as S;
use super::*;
use crate::lease::record::{FreshRun, LeaseState, Task};
use crate::lease::state::{Amendment, Taking};

const NOW: u64 = 5_000_000;

fn record(state: LeaseState) -> LeaseRecord {
    LeaseRecord::sample(state)
}

/// Every event, with sample payloads.
fn events() -> Vec<Event> {
    vec![
        Event::Start,
        Event::Recover,
        Event::Retry,
        Event::Prepare,
        Event::Provisioned {
            sandbox_id: "sb-2".into(),
        },
        Event::ProvisionFailed {
            error: "quota".into(),
            auth: false,
        },
        Event::ProvisionFailed {
            error: "Daytona answered 401".into(),
            auth: true,
        },
        Event::Touch,
        Event::KeepAlive,
        Event::Begin(Phase::Sync),
        Event::Begin(Phase::Exec),
        Event::Finish,
        Event::Claim {
            repo_root: Some("/other".into()),
        },
        Event::Claim { repo_root: None },
        Event::Release {
            reason: "stopped by request".into(),
        },
        Event::Kept,
        Event::Amend(Amendment {
            labels: [("env".to_string(), "dev".to_string())].into(),
            ttl_secs: 0,
            idle_timeout_secs: 420,
            keep: true,
        }),
        Event::Deleted,
        Event::DeleteFailed {
            error: "503".into(),
        },
        Event::Reconcile,
        Event::Observed(Observation::Gone),
        Event::Observed(Observation::Destroyed),
        Event::Observed(Observation::Stopped),
        Event::Observed(Observation::Started),
        Event::Observed(Observation::Creating),
        Event::Observed(Observation::Error("runner lost".into())),
        Event::Observed(Observation::Unreachable),
        Event::Crashed {
            why: "the lease actor crashed (boom)".into(),
        },
        Event::Seeded {
            repo_root: "/repo".into(),
        },
        Event::HandedOver {
            to: "host-b".into(),
        },
        Event::Pause,
        Event::Paused(Ok(())),
        Event::Paused(Err("409 conflict".into())),
        Event::Take(Box::new(Taking {
            repo_root: Some("/repo2".into()),
            ttl_secs: 600,
            idle_timeout_secs: 300,
            keep: false,
            labels: Default::default(),
            fresh_run: None,
        })),
    ]
}

fn tasks() -> [Task; 5] {
    [
        Task::Idle,
        Task::Provisioning,
        Task::Deleting,
        Task::Observing,
        Task::Pausing,
    ]
}

/// The laws every (state, task, event) triple obeys, checked over all of them.
#[test]
fn every_pair_obeys_the_laws() {
    for state in S::ALL {
        for task in tasks() {
            for event in events() {
                let mut before = record(state);
                before.task = task;
                let what = format!("{state} / {task:?} on {event:?}");
                let Ok(step) = step(&before, event.clone(), NOW) else {
                    continue;
                };
                let after = &step.record;
                let fx = &step.effects;
                // Persisted before any provider work.
                let persist = fx.iter().position(|f| *f == F::Persist);
                for (i, f) in fx.iter().enumerate() {
                    if matches!(f, F::Provision | F::Delete { .. } | F::Observe) {
                        assert!(
                            after.state == before.state || persist.is_some_and(|p| p < i),
                            "{what}: provider work before the intent is persisted"
                        );
                    }
                }
                // A state change is always persisted first and announced: durably, but for a
                // run's phases (ready to syncing/running and back), which a crash may lose.
                if after.state != before.state {
                    let lazily = matches!(event, Event::Begin(_) | Event::Finish);
                    let first = fx.first();
                    if lazily {
                        assert_eq!(
                            first,
                            Some(&F::PersistLazily),
                            "{what}: phase not persisted first"
                        );
                    } else {
                        assert_eq!(persist, Some(0), "{what}: state change not persisted first");
                    }
                    assert!(
                        fx.iter().any(|f| matches!(f, F::Announce(_))),
                        "{what}: state change not announced"
                    );
                }
                // Provider work starts only with its task recorded.
                if fx.contains(&F::Provision) {
                    assert_eq!(after.task, Task::Provisioning, "{what}");
                }
                if fx.iter().any(|f| matches!(f, F::Delete { .. })) {
                    assert_eq!(after.task, Task::Deleting, "{what}");
                }
                if fx.contains(&F::Observe) {
                    assert_eq!(after.task, Task::Observing, "{what}");
                }
                if fx.contains(&F::Pause) {
                    assert_eq!(after.task, Task::Pausing, "{what}");
                }
                // Released is terminal, and only a finished delete reaches it.
                if before.state == S::Released {
                    assert_eq!(after.state, S::Released, "{what}");
                }
                if after.state == S::Released && before.state != S::Released {
                    assert!(
                        fx.contains(&F::Stop) && fx.contains(&F::ForgetManifest),
                        "{what}"
                    );
                    // (or a handover: the sandbox is another daemon's lease now)
                    assert!(
                        matches!(
                            event,
                            Event::Deleted | Event::Release { .. } | Event::HandedOver { .. }
                        ),
                        "{what}"
                    );
                    if matches!(event, Event::HandedOver { .. }) {
                        assert_eq!(before.state, S::Pooled, "{what}");
                    }
                }
                // A lease that fails always says why.
                if after.state == S::Failed && before.state != S::Failed {
                    assert!(after.reason.is_some(), "{what}");
                }
                // A failed lease whose sandbox may exist is being cleaned (or will be
                // at the next retry when a delete is in flight for it already).
                if after.state == S::Failed && before.state != S::Failed {
                    assert!(
                        after.sandbox_cleaned
                            || after.task == Task::Deleting
                            || matches!(event, Event::Crashed { .. }),
                        "{what}: a failed lease's sandbox is left behind"
                    );
                }
                // Releasing always has its delete in flight.
                if after.state == S::Releasing && before.state != S::Releasing {
                    assert_eq!(
                        after.task,
                        Task::Deleting,
                        "{what}: release without a delete"
                    );
                }
            }
        }
    }
}

/// The moves of the state's name, for every (state, event) with no task in flight:
/// the whole table. Anything not listed leaves the state as it is (or is refused).
#[test]
fn the_table_of_moves() {
    let moves: &[(S, &str, S)] = &[
        (S::Pending, "Start", S::Creating),
        (S::Pending, "Recover", S::Creating),
        (S::Syncing, "Recover", S::Ready),
        (S::Running, "Recover", S::Ready),
        (S::Stopped, "Prepare", S::Creating),
        (S::Creating, "Provisioned", S::Ready),
        (S::Creating, "ProvisionFailed", S::Failed),
        (S::Ready, "Begin(Sync)", S::Syncing),
        (S::Ready, "Begin(Exec)", S::Running),
        (S::Syncing, "Begin(Exec)", S::Running),
        (S::Syncing, "Finish", S::Ready),
        (S::Running, "Finish", S::Ready),
        (S::Releasing, "Deleted", S::Released),
        (S::Pooled, "Take(Taking", S::Ready),
        (S::Ready, "Pause", S::Stopped),
        (S::Pooled, "HandedOver", S::Released),
    ];
    for state in S::ALL {
        for event in events() {
            let name = format!("{event:?}");
            let short = name
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_string();
            let key = if name.starts_with("Begin") {
                name.clone()
            } else {
                short
            };
            let before = record(state);
            let got = step(&before, event.clone(), NOW).map(|s| s.record.state);
            let want = moves
                .iter()
                .find(|(s, e, _)| *s == state && *e == key)
                .map(|(_, _, to)| *to);
            let releasing = matches!(event, Event::Release { .. });
            let failing = matches!(event, Event::Crashed { .. })
                || matches!(
                    event,
                    Event::Observed(
                        Observation::Gone | Observation::Destroyed | Observation::Error(_)
                    )
                );
            match got {
                Ok(to) => {
                    if let Some(want) = want {
                        assert_eq!(to, want, "{state} on {name}");
                    } else if releasing && state != S::Released {
                        assert_eq!(to, S::Releasing, "{state} on {name}");
                    } else if failing && to != state {
                        assert_eq!(to, S::Failed, "{state} on {name}");
                    } else {
                        assert_eq!(to, state, "{state} on {name}: an unlisted move");
                    }
                }
                Err(e) => {
                    assert!(want.is_none(), "{state} on {name} refused: {e}");
                    assert!(
                        e.to_string().contains(&before.slug) || matches!(e, Error::Internal(_)),
                        "{e}"
                    );
                }
            }
        }
    }
}

#[test]
fn recovery_from_each_persisted_state() {
    let want: &[(S, S, Task)] = &[
        (S::Pending, S::Creating, Task::Provisioning),
        (S::Creating, S::Creating, Task::Provisioning),
        (S::Ready, S::Ready, Task::Observing),
        (S::Syncing, S::Ready, Task::Observing),
        (S::Running, S::Ready, Task::Observing),
        (S::Stopped, S::Stopped, Task::Observing),
        (S::Releasing, S::Releasing, Task::Deleting),
        (S::Released, S::Released, Task::Idle),
        (S::Failed, S::Failed, Task::Deleting),
        (S::Pooled, S::Pooled, Task::Observing),
    ];
    assert_eq!(want.len(), S::ALL.len(), "every state");
    for (from, to, task) in want {
        // Whatever task the dead actor had, the new one starts from nothing.
        for stale in tasks() {
            let mut r = record(*from);
            r.task = stale;
            r.attempts = 3;
            let s = step(&r, Event::Recover, NOW).expect("recover is never refused");
            assert_eq!(s.record.state, *to, "{from}");
            assert_eq!(s.record.task, *task, "{from}");
            assert_eq!(s.record.attempts, 0);
        }
    }
    // A run lost to a restart says so.
    let s = step(&record(S::Running), Event::Recover, NOW).expect("ok");
    assert!(s.record.reason.expect("reason").contains("restarted"));
    // A failed lease whose sandbox is gone has nothing left to do.
    let mut r = record(S::Failed);
    r.sandbox_cleaned = true;
    let s = step(&r, Event::Recover, NOW).expect("ok");
    assert!(s.effects.is_empty());
    // A released lease needs no actor.
    let s = step(&record(S::Released), Event::Recover, NOW).expect("ok");
    assert_eq!(s.effects, vec![F::Stop]);
}

#[test]
fn a_fresh_run_lost_to_a_restart_releases_its_lease_unless_kept_on_failure() {
    for state in S::ALL {
        let mut r = record(state);
        r.fresh_run = Some(FreshRun {
            keep_on_failure: false,
        });
        let s = step(&r, Event::Recover, NOW).expect("recover is never refused");
        assert_eq!(s.record.fresh_run, None, "{state}");
        if state.is_live() {
            assert_eq!(s.record.state, S::Releasing, "{state}");
            assert_eq!(s.record.task, Task::Deleting, "{state}");
            assert!(s.record.reason.expect("why").contains("lost"), "{state}");
            assert_eq!(s.effects[0], F::Persist);
        }
        // With --keep-on-failure a lost run counts as failed: the lease stays, an ordinary
        // lease now, and that is stored.
        r.fresh_run = Some(FreshRun {
            keep_on_failure: true,
        });
        let s = step(&r, Event::Recover, NOW).expect("recover");
        assert_eq!(s.record.fresh_run, None, "{state}");
        if state.is_live() {
            assert_ne!(s.record.state, S::Releasing, "{state}");
            assert_eq!(s.effects.first(), Some(&F::Persist), "{state}");
        }
    }
    // A run that ends and keeps its lease makes it an ordinary one.
    let mut r = record(S::Ready);
    r.fresh_run = Some(FreshRun {
        keep_on_failure: true,
    });
    let s = step(&r, Event::Kept, NOW).expect("kept");
    assert_eq!((s.record.fresh_run, s.effects), (None, vec![F::Persist]));
}

#[test]
fn an_amendment_adds_and_never_takes_away() {
    let mut r = record(S::Ready);
    r.keep = true;
    r.user_labels.insert("team".into(), "infra".into());
    let a = Amendment {
        labels: [("env".to_string(), "dev".to_string())].into(),
        ttl_secs: 0,
        idle_timeout_secs: 420,
        keep: false,
    };
    let s = step(&r, Event::Amend(a.clone()), NOW).expect("amended");
    assert_eq!(s.record.idle_timeout_secs, 420);
    assert_eq!(s.record.ttl_secs, r.ttl_secs, "0 leaves it");
    assert!(s.record.keep, "keep is never unset");
    assert_eq!(s.record.user_labels.len(), 2);
    assert_eq!(s.effects[0], F::Persist);
    // The same again changes nothing and says nothing.
    let again = step(&s.record, Event::Amend(a), NOW).expect("same");
    assert!(again.effects.is_empty());
}

#[test]
fn a_whole_life() {
    let mut r = record(S::Pending);
    r.sandbox_id = None;
    let go = |r: &mut LeaseRecord, e: Event| {
        *r = step(r, e, NOW).expect("legal").record;
    };
    go(&mut r, Event::Start);
    assert_eq!((r.state, r.task), (S::Creating, Task::Provisioning));
    go(
        &mut r,
        Event::Provisioned {
            sandbox_id: "sb-9".into(),
        },
    );
    assert_eq!(r.sandbox_id.as_deref(), Some("sb-9"));
    assert_eq!(r.last_touched_ms, NOW);
    go(&mut r, Event::Begin(Phase::Sync));
    go(&mut r, Event::Begin(Phase::Exec));
    go(&mut r, Event::Finish);
    go(&mut r, Event::Reconcile);
    go(&mut r, Event::Observed(Observation::Stopped));
    assert_eq!(r.state, S::Stopped);
    go(&mut r, Event::Prepare);
    assert_eq!(r.state, S::Creating);
    go(
        &mut r,
        Event::Provisioned {
            sandbox_id: "sb-9".into(),
        },
    );
    go(
        &mut r,
        Event::Release {
            reason: "stopped by request".into(),
        },
    );
    assert_eq!((r.state, r.task), (S::Releasing, Task::Deleting));
    go(&mut r, Event::Deleted);
    assert_eq!(r.state, S::Released);
}

#[test]
fn a_release_during_a_cleanup_finishes_when_the_cleanup_does() {
    // Provisioning fails: the lease fails and its sandbox is being deleted.
    let mut r = record(S::Creating);
    r.task = Task::Provisioning;
    let s = step(
        &r,
        Event::ProvisionFailed {
            error: "snapshot not found".into(),
            auth: false,
        },
        NOW,
    )
    .expect("ok");
    assert_eq!((s.record.state, s.record.task), (S::Failed, Task::Deleting));
    // The run that created it ends and releases it while the cleanup is in flight: no
    // second delete, the failure's reason is kept.
    let s = step(
        &s.record,
        Event::Release {
            reason: "the run that created it ended".into(),
        },
        NOW,
    )
    .expect("ok");
    assert_eq!(s.record.state, S::Releasing);
    assert!(!s.effects.iter().any(|f| matches!(f, F::Delete { .. })));
    assert!(
        s.record
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("snapshot not found")
    );
    // The cleanup's end is the release's end.
    let s = step(&s.record, Event::Deleted, NOW).expect("ok");
    assert_eq!(s.record.state, S::Released);
}

#[test]
fn failed_deletes_back_off_and_stale_answers_are_ignored() {
    let mut r = record(S::Releasing);
    r.task = Task::Deleting;
    for (attempt, secs) in [(1, 2), (2, 4), (3, 8), (6, 60), (9, 60)] {
        r.attempts = attempt - 1;
        let s = step(
            &r,
            Event::DeleteFailed {
                error: "503".into(),
            },
            NOW,
        )
        .expect("ok");
        assert!(
            s.effects.contains(&F::Delete {
                after: Duration::from_secs(secs)
            }),
            "attempt {attempt}: {:?}",
            s.effects
        );
    }
    // An observation that comes back after a release began is dropped.
    let mut r = record(S::Releasing);
    r.task = Task::Deleting;
    let s = step(&r, Event::Observed(Observation::Gone), NOW).expect("ok");
    assert_eq!(s.record, r);
    assert!(s.effects.is_empty());
}

#[test]
fn refusals_name_the_lease_and_what_to_do() {
    let e = step(&record(S::Released), Event::Touch, NOW).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "lease swift-crab is released; nothing to touch"
    );
    let mut r = record(S::Failed);
    r.reason = Some("quota".into());
    let e = step(&r, Event::Begin(Phase::Exec), NOW).expect_err("refused");
    assert!(e.to_string().contains("is failed (quota)"), "{e}");
    assert_eq!(e.code_and_kind().1.exit_code(), 7);
    let e = step(&r, Event::Prepare, NOW).expect_err("refused");
    assert_eq!(e.code_and_kind().1.exit_code(), 5, "{e}");
    // Refused credentials stay an auth failure (exit 3) however the lease is reached.
    let mut c = record(S::Creating);
    c.task = Task::Provisioning;
    let failed = step(
        &c,
        Event::ProvisionFailed {
            error: "Daytona answered 401: check the Daytona API key".into(),
            auth: true,
        },
        NOW,
    )
    .expect("failed")
    .record;
    let e = step(&failed, Event::Prepare, NOW).expect_err("refused");
    assert_eq!(e.code_and_kind().1.exit_code(), 3, "{e}");
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
fn a_pooled_lease_waits_then_becomes_the_lease_that_takes_it() {
    // Made for a pool: provisioned into `pooled`, not `ready`, with its pool label.
    let mut r = record(S::Creating);
    r.pool = Some("local".into());
    r.repo_root = None;
    let s = step(
        &r,
        Event::Provisioned {
            sandbox_id: "sb-9".into(),
        },
        NOW,
    )
    .expect("ok");
    assert_eq!(s.record.state, S::Pooled);
    assert_eq!(
        s.record.labels().get("pool").map(String::as_str),
        Some("local")
    );
    assert_eq!(
        s.record.labels().get("state").map(String::as_str),
        Some("pooled")
    );
    let pooled = s.record;
    // Nobody uses, touches, claims or amends it while it waits.
    for e in [
        Event::Touch,
        Event::Prepare,
        Event::Begin(Phase::Sync),
        Event::Claim {
            repo_root: Some("/repo".into()),
        },
        Event::Amend(Amendment::default()),
    ] {
        let err = step(&pooled, e.clone(), NOW).expect_err("refused");
        assert!(err.to_string().contains(&pooled.slug), "{e:?}: {err}");
    }
    // Stopped by the provider while it waits: released (the pool makes another).
    let mut observing = pooled.clone();
    observing.task = Task::Observing;
    let s = step(&observing, Event::Observed(Observation::Stopped), NOW).expect("ok");
    assert_eq!(s.record.state, S::Releasing);
    // Taken: the lease the taker asked for, created now, out of the pool.
    let mut seeded = pooled.clone();
    seeded.seeded_for = Some("/repo".into());
    let take = |repo: &str| {
        Event::Take(Box::new(Taking {
            repo_root: Some(repo.into()),
            ttl_secs: 600,
            idle_timeout_secs: 300,
            keep: true,
            labels: [("team".to_string(), "infra".to_string())].into(),
            fresh_run: Some(FreshRun {
                keep_on_failure: false,
            }),
        }))
    };
    let s = step(&seeded, take("/repo"), NOW + 7).expect("ok");
    let t = &s.record;
    assert_eq!(t.state, S::Ready);
    assert_eq!(
        (t.pool.clone(), t.repo_root.as_deref()),
        (None, Some("/repo"))
    );
    assert_eq!((t.created_at_ms, t.last_touched_ms), (NOW + 7, NOW + 7));
    assert_eq!((t.ttl_secs, t.idle_timeout_secs, t.keep), (600, 300, true));
    assert_eq!(t.labels().get("team").map(String::as_str), Some("infra"));
    assert_eq!(t.labels().get("pool"), None);
    assert_eq!(
        s.effects[..3],
        [
            F::Persist,
            F::Announce("taken from the pool"),
            F::PushLabels
        ]
    );
    assert!(
        !s.effects.contains(&F::ForgetManifest),
        "its own seed is kept"
    );
    // Another repo's seed is forgotten.
    let s = step(&seeded, take("/other"), NOW).expect("ok");
    assert!(s.effects.contains(&F::ForgetManifest));
    assert_eq!(s.record.seeded_for, None);
    // Only once.
    let err = step(&s.record, take("/repo"), NOW).expect_err("not pooled");
    assert!(err.to_string().contains("no longer in the pool"), "{err}");
    // Rebuilt from its labels after the store lost it: still pooled, in its pool.
    let back = LeaseRecord::from_labels(
        "local",
        &pooled.owner,
        "sb-9",
        &pooled.sandbox_name,
        &pooled.labels(),
    )
    .expect("rebuilt");
    assert_eq!(
        (back.state, back.pool.as_deref()),
        (S::Pooled, Some("local"))
    );
    assert!(back.user_labels.is_empty(), "{:?}", back.user_labels);
}

#[test]
fn a_pause_stops_then_settles_and_a_failed_one_says_why() {
    let s = step(&record(S::Ready), Event::Pause, NOW).expect("ok");
    assert_eq!((s.record.state, s.record.task), (S::Stopped, Task::Pausing));
    assert_eq!(
        s.effects,
        vec![F::Persist, F::Announce("pausing"), F::Pause]
    );
    // While it stops, a run waits instead of starting it.
    assert!(matches!(readiness(&s.record), Readiness::Wait));
    let done = step(&s.record, Event::Paused(Ok(())), NOW).expect("ok");
    assert_eq!(
        (done.record.state, done.record.task),
        (S::Stopped, Task::Idle)
    );
    assert!(matches!(readiness(&done.record), Readiness::Start));
    let failed = step(&s.record, Event::Paused(Err("boom".into())), NOW).expect("ok");
    assert_eq!(failed.record.state, S::Ready);
    assert!(
        failed
            .record
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("pause failed: boom")
    );
    // A stale answer (released meanwhile) changes nothing.
    let releasing = step(&s.record, Event::Release { reason: "x".into() }, NOW).expect("ok");
    let stale = step(&releasing.record, Event::Paused(Ok(())), NOW).expect("ok");
    assert_eq!(stale.record, releasing.record);
    // Paused twice is fine; a running lease is refused with what to do.
    assert!(
        step(&done.record, Event::Pause, NOW)
            .expect("ok")
            .effects
            .is_empty()
    );
    let e = step(&record(S::Running), Event::Pause, NOW).expect_err("busy");
    assert!(e.to_string().contains("a run is using it"), "{e}");
}
