//! The gRPC services. Each handler validates, calls the registry or the lease actor with a
//! timeout, and maps the error through the one table in [`crate::error`]: nothing more.

use std::pin::Pin;
use std::sync::Arc;

use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::index::Resolved;
use super::registry::{AcquireSpec, RegistryMsg};
use super::{ACTOR_CALL_TIMEOUT, Shared, call_result};
use crate::error::Error;
use crate::lease::actor::LeaseMsg;
use crate::lease::{LeaseRecord, LeaseState};
use crate::pb;
use crate::pb::timestamp;
use crate::pb::daemon_service_server::{DaemonService, DaemonServiceServer};
use crate::pb::lease_service_server::{LeaseService, LeaseServiceServer};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The whole gRPC surface: the two services, health and reflection.
pub fn router(
    shared: Arc<Shared>,
    registry: ActorRef<RegistryMsg>,
) -> tonic::transport::server::Router {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // Both services serve as long as the daemon does.
    tokio::spawn(async move {
        health_reporter
            .set_serving::<LeaseServiceServer<LeaseSvc>>()
            .await;
        health_reporter
            .set_serving::<DaemonServiceServer<DaemonSvc>>()
            .await;
    });
    // v1 for current tools, v1alpha for older grpcurl and friends.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(LeaseServiceServer::new(LeaseSvc {
            shared: shared.clone(),
            registry,
        }))
        .add_service(DaemonServiceServer::new(DaemonSvc { shared }))
}

/// `crabbox.v1.LeaseService`.
pub struct LeaseSvc {
    shared: Arc<Shared>,
    registry: ActorRef<RegistryMsg>,
}

/// `crabbox.v1.DaemonService`.
pub struct DaemonSvc {
    shared: Arc<Shared>,
}

pub fn state_pb(s: LeaseState) -> pb::LeaseState {
    match s {
        LeaseState::Pending => pb::LeaseState::Pending,
        LeaseState::Creating => pb::LeaseState::Creating,
        LeaseState::Ready => pb::LeaseState::Ready,
        LeaseState::Syncing => pb::LeaseState::Syncing,
        LeaseState::Running => pb::LeaseState::Running,
        LeaseState::Stopped => pb::LeaseState::Stopped,
        LeaseState::Releasing => pb::LeaseState::Releasing,
        LeaseState::Released => pb::LeaseState::Released,
        LeaseState::Failed => pb::LeaseState::Failed,
    }
}

/// A lease as the wire shows it.
pub fn lease_pb(r: &LeaseRecord) -> pb::Lease {
    pb::Lease {
        id: r.id.clone(),
        slug: r.slug.clone(),
        provider: r.provider.clone(),
        state: state_pb(r.state) as i32,
        sandbox_id: r.sandbox_id.clone().unwrap_or_default(),
        sandbox_name: r.sandbox_name.clone(),
        repo_root: r.repo_root.clone().unwrap_or_default(),
        created_at: Some(timestamp(r.created_at_ms)),
        expires_at: Some(timestamp(r.expires_at_ms())),
        last_touched_at: Some(timestamp(r.last_touched_ms)),
        keep: r.keep,
        labels: r.labels().into_iter().collect(),
        reason: r.reason.clone().unwrap_or_default(),
        ttl_secs: r.ttl_secs,
        idle_timeout_secs: r.idle_timeout_secs,
        work_root: r.work_root.clone(),
    }
}

impl LeaseSvc {
    fn resolve(&self, name: &str) -> Result<Resolved, Error> {
        self.shared.leases.resolve(name, &self.shared.store)
    }

    /// The lease a request names, or the repo's claimed live lease when it names none.
    fn resolve_or_claimed(&self, name: &str, repo_root: &str) -> Result<Resolved, Error> {
        if !name.is_empty() {
            return self.resolve(name);
        }
        if repo_root.is_empty() {
            return Err(Error::InvalidArgument(
                "no lease named and no repository to find one by: pass --id".into(),
            ));
        }
        self.shared
            .leases
            .claimed_by(repo_root)
            .map(Resolved::Live)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no live lease is claimed by {repo_root}: run `crabbox warmup` here, or pass --id"
                ))
            })
    }

    async fn ask<T>(
        &self,
        actor: &ActorRef<LeaseMsg>,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<T, Error>>) -> LeaseMsg,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
    {
        actor
            .call(msg, Some(ACTOR_CALL_TIMEOUT))
            .await
            .map_err(|e| Error::Internal(format!("lease actor unreachable: {e}")))
            .and_then(call_result)?
    }

    async fn claim(
        &self,
        lease_id: String,
        repo_root: String,
        reclaim: bool,
    ) -> Result<LeaseRecord, Error> {
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
}

#[tonic::async_trait]
impl LeaseService for LeaseSvc {
    async fn warmup(&self, req: Request<pb::WarmupRequest>) -> Result<Response<pb::Lease>, Status> {
        let req = req.into_inner();
        let spec = AcquireSpec {
            provider: req.provider,
            slug: (!req.slug.is_empty()).then_some(req.slug),
            ttl_secs: req.ttl_secs,
            idle_timeout_secs: req.idle_timeout_secs,
            keep: req.keep,
            labels: req.labels.into_iter().collect(),
            repo_root: (!req.repo_root.is_empty()).then_some(req.repo_root),
            reuse_claimed: true,
            provider_options: req.provider_options.into_iter().collect(),
        };
        let acquired = self
            .registry
            .call(
                |reply| RegistryMsg::Acquire { spec, reply },
                Some(ACTOR_CALL_TIMEOUT),
            )
            .await
            .map_err(|e| Error::Internal(format!("registry unreachable: {e}")))
            .and_then(call_result)??;
        Ok(Response::new(lease_pb(&acquired.record)))
    }

    async fn get(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let r = self.resolve(&req.into_inner().name)?;
        Ok(Response::new(lease_pb(&r.record())))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let records = if req.into_inner().all {
            let mut all = self.shared.store.all_leases().map_err(Status::from)?;
            // The live view is fresher than the store for leases with an actor.
            for r in all.iter_mut() {
                if let Some(h) = self.shared.leases.get(&r.id) {
                    *r = h.record();
                }
            }
            all
        } else {
            self.shared
                .leases
                .records()
                .into_iter()
                .filter(|r| r.state != LeaseState::Released)
                .collect()
        };
        Ok(Response::new(pb::ListResponse {
            leases: records.iter().map(lease_pb).collect(),
        }))
    }

    type WatchStream = EventStream<pb::LeaseEvent>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        // Subscribe before taking the snapshot, so no change falls between the two.
        let mut events = self.shared.leases.subscribe();
        let (filter, first): (Option<String>, Vec<LeaseRecord>) = if req.name.is_empty() {
            (None, self.shared.leases.records())
        } else {
            let r = self.resolve(&req.name)?.record();
            (Some(r.id.clone()), vec![r])
        };
        let until_settled = req.until_settled;
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
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
                    () = shared.shutdown.cancelled() => return,
                };
                let change = match change {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed some: resend where the watched lease is now.
                        match filter.as_deref().and_then(|id| shared.leases.get(id)) {
                            Some(h) => super::index::LeaseChange {
                                lease: h.record(),
                                message: "resync".into(),
                            },
                            None => continue,
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RunStream = EventStream<pb::RunEvent>;

    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        // The run lives in its own task: this handler's future is dropped when the client
        // leaves, and the run must then cancel its command and clean up.
        tokio::spawn(crate::lease::run::run_task(
            self.shared.clone(),
            self.registry.clone(),
            req,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ssh(&self, req: Request<pb::SshRequest>) -> Result<Response<pb::SshAccess>, Status> {
        let req = req.into_inner();
        let handle = match self.resolve_or_claimed(&req.lease, &req.repo_root)? {
            Resolved::Live(h) => h,
            Resolved::Stored(r) => {
                return Err(Error::WrongState(format!("lease {} is {}", r.slug, r.state)).into());
            }
        };
        let record = handle.record();
        if !matches!(
            record.state,
            LeaseState::Ready | LeaseState::Syncing | LeaseState::Running
        ) {
            return Err(Error::WrongState(format!(
                "lease {} is {}, not ready: wait with `crabbox status {} --wait`",
                record.slug, record.state, record.slug
            ))
            .into());
        }
        let provider = self
            .shared
            .providers
            .get(&record.provider)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("provider {} is gone", record.provider)))?;
        let minutes = if req.ttl_minutes == 0 {
            30
        } else {
            req.ttl_minutes.min(24 * 60) as u32
        };
        let access = provider
            .ssh_access(record.sandbox_ref(), minutes)
            .await
            .map_err(Error::from)?;
        let _ = handle.actor.send_message(LeaseMsg::KeepAlive);
        Ok(Response::new(pb::SshAccess {
            lease: Some(lease_pb(&record)),
            host: access.host,
            port: access.port as u32,
            user: access.user,
            expires_at: Some(timestamp(access.expires_at_ms)),
        }))
    }

    async fn touch(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let r = self.resolve(&req.into_inner().name)?;
        let Resolved::Live(h) = r else {
            let r = r.record();
            return Err(Error::WrongState(format!(
                "lease {} is {}; nothing to touch",
                r.slug, r.state
            ))
            .into());
        };
        let record = self.ask(&h.actor, LeaseMsg::Touch).await?;
        Ok(Response::new(lease_pb(&record)))
    }

    async fn stop(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let r = self.resolve(&req.into_inner().name)?;
        let Resolved::Live(h) = r else {
            // Released already: stopping again is a success.
            return Ok(Response::new(lease_pb(&r.record())));
        };
        let record = self
            .ask(&h.actor, |reply| LeaseMsg::Release {
                reason: "stopped by request".into(),
                reply: Some(reply),
            })
            .await?;
        Ok(Response::new(lease_pb(&record)))
    }

    async fn claim(&self, req: Request<pb::ClaimRequest>) -> Result<Response<pb::Lease>, Status> {
        let req = req.into_inner();
        if req.repo_root.is_empty() || !std::path::Path::new(&req.repo_root).is_absolute() {
            return Err(Error::InvalidArgument(
                "claim needs the repository's absolute root path".into(),
            )
            .into());
        }
        let r = self.resolve(&req.lease)?.record();
        let record = self.claim(r.id, req.repo_root, req.reclaim).await?;
        Ok(Response::new(lease_pb(&record)))
    }
}

#[tonic::async_trait]
impl DaemonService for DaemonSvc {
    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let mut counts = std::collections::HashMap::new();
        for r in self.shared.leases.records() {
            *counts.entry(r.state.as_str().to_string()).or_insert(0u64) += 1;
        }
        let mut providers: Vec<String> = self.shared.providers.keys().cloned().collect();
        providers.sort();
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.shared.started.elapsed().as_secs(),
            providers,
            default_provider: self.shared.default_provider.clone(),
            lease_counts: counts,
            daemon_id: self.shared.daemon_id.clone(),
            socket: self.shared.socket.display().to_string(),
            state_dir: self.shared.state_dir.display().to_string(),
        }))
    }

    async fn doctor(
        &self,
        req: Request<pb::DoctorRequest>,
    ) -> Result<Response<pb::DoctorResponse>, Status> {
        let req = req.into_inner();
        let name = if req.provider.is_empty() {
            self.shared.default_provider.clone()
        } else {
            req.provider
        };
        let provider = self.shared.providers.get(&name).cloned().ok_or_else(|| {
            Status::from(Error::InvalidArgument(format!(
                "provider {name:?} is not available in this daemon"
            )))
        })?;
        let options = req.provider_options.into_iter().collect();
        let checks = provider
            .doctor(&options)
            .await
            .into_iter()
            .map(|(name, ok, detail)| pb::Check { name, ok, detail })
            .collect();
        Ok(Response::new(pb::DoctorResponse { checks }))
    }
}
