//! The Watch use case: a stream of lease changes, from a snapshot of the leases to every
//! change after it, optionally until the watched lease settles.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tonic::Status;

use super::Api;
use super::wire::lease_pb;
use crate::lease::{LeaseChange, LeaseRecord};
use crate::pb;

/// Streams changes to `tx` until the client leaves, the daemon stops, or (with
/// `until_settled` and one lease watched) the lease settles.
pub async fn watch(
    api: Arc<Api>,
    req: pb::WatchRequest,
    tx: mpsc::Sender<Result<pb::LeaseEvent, Status>>,
) -> Result<(), Status> {
    // Subscribe before taking the snapshot, so no change falls between the two.
    let mut events = api.registry.index.subscribe();
    let (filter, first): (Option<String>, Vec<LeaseRecord>) = if req.name.is_empty() {
        (None, api.registry.index.records())
    } else {
        let r = api.resolve(&req.name)?.record();
        (Some(r.id.clone()), vec![r])
    };
    let until_settled = req.until_settled;
    tokio::spawn(async move {
        let settled = |r: &LeaseRecord| until_settled && r.state.is_settled();
        for r in &first {
            let ev = pb::LeaseEvent {
                lease: Some(lease_pb(r)),
                message: r.state.as_str().to_string(),
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
            if filter.is_some() && settled(r) {
                return;
            }
        }
        loop {
            let change = tokio::select! {
                c = events.recv() => c,
                () = tx.closed() => return,
                () = api.shutdown.cancelled() => return,
            };
            let change = match change {
                Ok(c) => c,
                Err(RecvError::Lagged(_)) => {
                    // Missed some: resend where the watched lease is now.
                    match filter.as_deref().and_then(|id| api.registry.index.get(id)) {
                        Some(h) => LeaseChange {
                            lease: h.record(),
                            message: "resync".into(),
                        },
                        None => continue,
                    }
                }
                Err(RecvError::Closed) => return,
            };
            if filter.as_deref().is_some_and(|id| id != change.lease.id) {
                continue;
            }
            let ev = pb::LeaseEvent {
                lease: Some(lease_pb(&change.lease)),
                message: change.message,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
            if filter.is_some() && settled(&change.lease) {
                return;
            }
        }
    });
    Ok(())
}
