//! The gRPC services. Each handler validates, asks the registry or the lease actor (with a
//! timeout), and maps the error through the one table in [`crate::error`]: nothing more.
//! The use cases driven by a stream live beside them: [`run`] and [`watch`].
//!
//! - [`wire`]: record <-> `crabbox.v1` conversions.

pub mod plan;
pub mod run;
pub mod seed;
pub mod transfer;
pub mod watch;
pub mod wire;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::error::{Error, echo};
use crate::lease::state::{Amendment, Event, step};
use crate::lease::store::Store;
use crate::lease::{LeaseHandle, LeaseMsg, LeaseRecord, LeaseState};
use crate::pb::daemon_service_server::{DaemonService, DaemonServiceServer};
use crate::pb::lease_service_server::{LeaseService, LeaseServiceServer};
use crate::pb::{self, timestamp};
use crate::provider::Providers;
use crate::registry::index::Resolved;
use crate::registry::{AcquireSpec, Registry};
use wire::{acquire_spec, lease_pb};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the handlers work with.
pub struct Api {
    pub registry: Registry,
    pub store: Arc<Store>,
    pub providers: Providers,
    pub default_provider: String,
    pub daemon_id: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// The daemon's own folders (its state, its socket's), canonical: never part of a
    /// sync, even under a sync root. Resolved once (they are the daemon's for its life).
    pub never_sync: Vec<PathBuf>,
    pub started: Instant,
    /// Cancelled at shutdown: streams end.
    pub shutdown: CancellationToken,
    /// The checkouts runs sync, watched so that an unchanged one costs no scan.
    pub checkouts: crate::sync::watch::Checkouts,
    /// Team mode's registry, when configured.
    pub team: Option<Arc<crate::team::Team>>,
    /// Clients' own stdout/stderr handed over for their runs ([`crate::direct`]).
    pub handed: Arc<crate::direct::Handed>,
}

impl Api {
    fn resolve(&self, name: &str) -> Result<Resolved, Error> {
        self.registry.index.resolve(name, &self.store)
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
        self.registry
            .index
            .claimed_by(repo_root)
            .map(Resolved::Live)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no live lease is claimed by {repo_root}: run `crabbox warmup` here, or pass --id"
                ))
            })
    }
}

/// Applies what a request asks of a lease it reuses (labels, ttl, idle timeout, keep);
/// answers the lease and, for people, what changed and what cannot apply to it.
pub async fn amend(
    lease: &LeaseHandle,
    spec: &AcquireSpec,
) -> Result<(LeaseRecord, Vec<String>), Error> {
    crate::registry::check_lifetimes(spec)?;
    for (k, v) in &spec.labels {
        crate::registry::validate_label(k, v)?;
    }
    let before = lease.record();
    let amendment = Amendment {
        labels: spec.labels.clone(),
        ttl_secs: spec.ttl_secs,
        idle_timeout_secs: spec.idle_timeout_secs,
        keep: spec.keep,
    };
    // Most runs ask for what the lease has already: the lifecycle's own (pure) decision
    // says so without a trip through the actor's mailbox on every run.
    let unchanged = step(&before, Event::Amend(amendment.clone()), now_ms())?
        .effects
        .is_empty();
    let after = if unchanged {
        before.clone()
    } else {
        lease
            .ask(|reply| LeaseMsg::Amend { amendment, reply })
            .await?
    };
    let mut notes = Vec::new();
    let secs = crate::clock::human_secs;
    if after.idle_timeout_secs != before.idle_timeout_secs {
        notes.push(format!(
            "idle timeout {} (was {})",
            secs(after.idle_timeout_secs),
            secs(before.idle_timeout_secs)
        ));
    }
    if after.ttl_secs != before.ttl_secs {
        notes.push(format!(
            "ttl {} (was {})",
            secs(after.ttl_secs),
            secs(before.ttl_secs)
        ));
    }
    if after.keep && !before.keep {
        notes.push("kept".into());
    }
    let added: Vec<String> = after
        .user_labels
        .iter()
        .filter(|(k, v)| before.user_labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !added.is_empty() {
        notes.push(format!("labels {}", added.join(", ")));
    }
    let mut said = Vec::new();
    if !notes.is_empty() {
        said.push(format!(
            "lease {} now has: {}",
            after.slug,
            notes.join("; ")
        ));
    }
    if !spec.provider.is_empty() && spec.provider != after.provider {
        said.push(format!(
            "note: lease {} is on the {} provider; --provider {} applies to new leases (stop \
             this one to get one there)",
            after.slug, after.provider, spec.provider
        ));
    }
    if let Some(slug) = spec.slug.as_deref().filter(|s| *s != after.slug) {
        said.push(format!(
            "note: lease {} keeps its name; --slug {slug} applies to new leases (stop this one \
             to get one named {slug})",
            after.slug
        ));
    }
    let other: Vec<String> = spec
        .provider_options
        .iter()
        .filter(|(k, v)| after.provider_options.get(*k) != Some(*v))
        .map(|(k, v)| match after.provider_options.get(k) {
            Some(was) => format!("{k}={v} (it has {was})"),
            None => format!("{k}={v}"),
        })
        .collect();
    if !other.is_empty() {
        said.push(format!(
            "note: lease {} keeps the sandbox it was made with; the provider options asked \
             here ({}) apply to new leases (stop this one to get one with them)",
            after.slug,
            other.join(", ")
        ));
    }
    Ok((after, said))
}

/// A repository root sent by a client: empty (none), or an absolute path. The one check
/// for every entry point that takes one.
pub fn validate_repo_root(repo_root: &str) -> Result<(), Error> {
    if !repo_root.is_empty() && !Path::new(repo_root).is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "repo root {} must be an absolute path",
            echo(repo_root)
        )));
    }
    Ok(())
}

/// The whole gRPC surface: the two services, health and reflection.
/// Who may call: anyone who reached the Unix socket (the socket's folder and the peer check
/// decide that), and over TCP only a client that sends `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct Caller {
    token: Option<Arc<str>>,
}

impl Caller {
    /// No check (the Unix socket).
    pub fn local() -> Self {
        Caller { token: None }
    }

    /// The token every call must carry (TCP).
    pub fn with_token(token: &str) -> Self {
        Caller {
            token: Some(token.into()),
        }
    }
}

impl tonic::service::Interceptor for Caller {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(req);
        };
        let sent = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compared in constant time: the answer's timing says nothing of the token.
        let ok = sent.is_some_and(|s| {
            s.len() == token.len()
                && s.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "crabboxd over TCP needs `authorization: Bearer <token>`: the token is in \
                 tcp-token in the daemon's state dir",
            ))
        }
    }
}

/// The router type: every service behind the [`Caller`] check.
pub type Router = tonic::transport::server::Router<
    tower::layer::util::Stack<
        tonic::service::InterceptorLayer<Caller>,
        tower::layer::util::Identity,
    >,
>;

pub fn router(api: Arc<Api>, caller: Caller) -> Router {
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
    // Windows of 8 MiB for what clients send (stdin, `cp` into a sandbox): HTTP/2's 64 KiB
    // default would make them wait for the daemon's window update after every 64 KiB.
    tonic::transport::Server::builder()
        .initial_stream_window_size(8 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .layer(tonic::service::InterceptorLayer::new(caller))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(LeaseServiceServer::new(LeaseSvc(api.clone())))
        .add_service(DaemonServiceServer::new(DaemonSvc(api)))
}

/// `crabbox.v1.LeaseService`.
pub struct LeaseSvc(Arc<Api>);

/// `crabbox.v1.DaemonService`.
pub struct DaemonSvc(Arc<Api>);

#[tonic::async_trait]
impl LeaseService for LeaseSvc {
    async fn warmup(&self, req: Request<pb::WarmupRequest>) -> Result<Response<pb::Lease>, Status> {
        let req = req.into_inner();
        validate_repo_root(&req.repo_root)?;
        let (keep, repo_root) = (req.keep, req.repo_root.clone());
        let wait = Duration::from_secs(req.wait_for_slot_secs);
        let spec = acquire_spec(req, keep, &repo_root);
        let acquired = acquire_waiting(&self.0, spec.clone(), wait, |_| async {}).await?;
        let (record, notes) = if acquired.fresh {
            (acquired.lease.record(), Vec::new())
        } else {
            // The repo's lease, reused: what this warmup asks of it applies to it, and what
            // cannot (a slug, another provider) is said.
            amend(&acquired.lease, &spec).await?
        };
        let mut answer = Response::new(lease_pb(&record));
        for note in notes {
            answer.metadata_mut().append_bin(
                pb::NOTE_METADATA,
                tonic::metadata::MetadataValue::from_bytes(note.as_bytes()),
            );
        }
        Ok(answer)
    }

    async fn get(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let r = self.0.resolve(&req.into_inner().name)?;
        Ok(Response::new(lease_pb(&r.record())))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = req.into_inner();
        let filter = wire::ListFilter::from_request(&req)?;
        let index = &self.0.registry.index;
        let basic = req.view == pb::LeaseView::Basic as i32;
        let make = if basic {
            wire::lease_pb_basic
        } else {
            lease_pb
        };
        let (leases, next_page_token) = if req.all {
            let mut all = self.0.store.all_leases().map_err(Status::from)?;
            // The live view is fresher than the store for leases with an actor.
            for r in all.iter_mut() {
                if let Some(h) = index.get(&r.id) {
                    *r = h.record();
                }
            }
            all.retain(|r| filter.matches(r));
            all.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
            let (page, token) = filter.page(all);
            (page.iter().map(make).collect(), token)
        } else {
            // Live leases only, read in place: each of the page's leases is made into its
            // answer there, nothing else is copied. Pooled sandboxes are nobody's lease
            // yet: shown by --all, --state pooled and `crabbox pool status`.
            let pooled = filter.names(LeaseState::Pooled);
            let (page, last) = index.page(
                |r| {
                    r.state != LeaseState::Released
                        && (r.state != LeaseState::Pooled || pooled)
                        && filter.matches(r)
                },
                filter.after(),
                filter.page_size(),
                make,
            );
            (page, wire::ListFilter::token_after(last))
        };
        Ok(Response::new(pb::ListResponse {
            leases,
            next_page_token,
        }))
    }

    type WatchStream = EventStream<pb::LeaseEvent>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        watch::watch(self.0.clone(), req.into_inner(), tx).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type CopyFromStream = EventStream<pb::CopyChunk>;

    async fn copy_from(
        &self,
        req: Request<pb::CopyFromRequest>,
    ) -> Result<Response<Self::CopyFromStream>, Status> {
        let rx = transfer::copy_from(self.0.clone(), req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn copy_to(
        &self,
        req: Request<tonic::Streaming<pb::CopyToChunk>>,
    ) -> Result<Response<pb::CopyToResult>, Status> {
        Ok(Response::new(
            transfer::copy_to(self.0.clone(), req.into_inner()).await?,
        ))
    }

    async fn port(
        &self,
        req: Request<pb::PortRequest>,
    ) -> Result<Response<pb::PortAnswer>, Status> {
        let req = req.into_inner();
        let port = u16::try_from(req.port)
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| Error::InvalidArgument(format!("port {} is not 1-65535", req.port)))?;
        let t = self.0.copy_target(&req.lease, &req.repo_root)?;
        let signed = (req.signed_ttl_secs > 0).then(|| Duration::from_secs(req.signed_ttl_secs));
        let p = t
            .provider
            .preview(t.record.sandbox_ref(), port, signed)
            .await
            .map_err(Error::from)?;
        t.handle.tell(LeaseMsg::KeepAlive);
        Ok(Response::new(pb::PortAnswer {
            lease: Some(lease_pb(&t.record)),
            url: p.url,
            token: p.token.unwrap_or_default(),
            header: p.header.unwrap_or_default(),
            expires_at: p.expires_at_ms.map(timestamp),
        }))
    }

    async fn runs(
        &self,
        req: Request<pb::RunsRequest>,
    ) -> Result<Response<pb::RunsResponse>, Status> {
        let req = req.into_inner();
        validate_repo_root(&req.repo_root)?;
        let limit = match req.limit {
            0 => 20,
            n => n.min(10_000) as usize,
        };
        let mut runs = if req.all {
            self.0.store.recent_runs(limit)?
        } else if !req.lease.is_empty() {
            let id = match self.0.resolve(&req.lease)? {
                Resolved::Live(h) => h.record().id,
                Resolved::Stored(r) => r.id,
            };
            self.0.store.runs(&id)?
        } else if !req.repo_root.is_empty() {
            // Every lease this repo had, released ones too (a fresh run's lease is).
            let mut runs = Vec::new();
            for l in self.0.store.all_leases()? {
                if l.repo_root.as_deref() == Some(req.repo_root.as_str()) {
                    runs.extend(self.0.store.runs(&l.id)?);
                }
            }
            runs
        } else {
            return Err(Error::InvalidArgument(
                "name a lease, or pass --all (or run it in a repository)".into(),
            )
            .into());
        };
        runs.sort_by_key(|r| std::cmp::Reverse(r.started_ms));
        runs.truncate(limit);
        Ok(Response::new(pb::RunsResponse {
            runs: runs
                .into_iter()
                .map(|r| pb::RunInfo {
                    lease_id: r.lease_id,
                    started_at: Some(timestamp(r.started_ms)),
                    ended_at: Some(timestamp(r.ended_ms)),
                    command: r.command,
                    exit_code: r.exit_code,
                    files_uploaded: r.files_uploaded,
                    artifacts: r.artifacts,
                    missing_artifacts: r.missing_artifacts,
                })
                .collect(),
        }))
    }

    type TraceStream = EventStream<pb::TraceLine>;

    async fn trace(
        &self,
        req: Request<pb::TraceRequest>,
    ) -> Result<Response<Self::TraceStream>, Status> {
        let req = req.into_inner();
        let id = self.0.resolve(&req.name)?.record().id;
        let (recent, mut lines) = crate::relay::subscribe(&id, req.since_unix_ms);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let wire = |l: crate::relay::Line| {
                Ok(pb::TraceLine {
                    line: l.text,
                    progress: l.progress,
                })
            };
            for line in recent {
                if tx.send(wire(line)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    line = lines.recv() => match line {
                        Some(line) => {
                            if tx.send(wire(line)).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RunStream = EventStream<pb::RunEvent>;

    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        // The run lives in its own task: this handler's future is dropped when the client
        // leaves, and the run must then cancel its command and clean up.
        tokio::spawn(run::run(self.0.clone(), req.into_inner(), tx, None).instrument(run::span()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RunWithInputStream = EventStream<pb::RunEvent>;

    async fn run_with_input(
        &self,
        req: Request<tonic::Streaming<pb::RunInput>>,
    ) -> Result<Response<Self::RunWithInputStream>, Status> {
        use pb::run_input::Input;
        let mut inbound = req.into_inner();
        let start = match inbound.message().await? {
            Some(pb::RunInput {
                input: Some(Input::Start(start)),
            }) => start,
            _ => {
                return Err(Error::InvalidArgument(
                    "RunWithInput: the first message must be `start` (a RunRequest)".into(),
                )
                .into());
            }
        };
        // A few chunks in flight, no more: when the command does not read, this stops
        // reading the client's stream, and HTTP/2 flow control holds the client back.
        let (stdin_tx, stdin_rx) = mpsc::channel::<crate::provider::Input>(8);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let input = match msg.input {
                    Some(Input::Stdin(bytes)) => crate::provider::Input::Data(bytes),
                    // A size out of bounds is clamped: the terminal it came from is real.
                    Some(Input::Resize(size)) => {
                        crate::provider::Input::Resize(run::clamp_size(&size))
                    }
                    Some(Input::Start(_)) | None => continue,
                };
                if stdin_tx.send(input).await.is_err() {
                    return;
                }
            }
            // The client's stream ended: the command's stdin is closed (EOF).
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run::run(self.0.clone(), start, tx, Some(stdin_rx)).instrument(run::span()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ssh(&self, req: Request<pb::SshRequest>) -> Result<Response<pb::SshAccess>, Status> {
        let req = req.into_inner();
        validate_repo_root(&req.repo_root)?;
        let handle = match self.0.resolve_or_claimed(&req.lease, &req.repo_root)? {
            Resolved::Live(h) => h,
            Resolved::Stored(r) => {
                return Err(r.not_usable("run `crabbox warmup` for a new lease").into());
            }
        };
        let record = handle.record();
        if !matches!(
            record.state,
            LeaseState::Ready | LeaseState::Syncing | LeaseState::Running
        ) {
            let hint = format!(
                "it is not ready: wait with `crabbox status {} --wait`",
                record.slug
            );
            return Err(record.not_usable(hint).into());
        }
        let provider = self
            .0
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
        handle.tell(LeaseMsg::KeepAlive);
        Ok(Response::new(pb::SshAccess {
            lease: Some(lease_pb(&record)),
            host: access.host,
            port: access.port as u32,
            user: access.user,
            expires_at: Some(timestamp(access.expires_at_ms)),
        }))
    }

    async fn touch(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let record = match self.0.resolve(&req.into_inner().name)? {
            Resolved::Live(h) => h.ask(LeaseMsg::Touch).await?,
            Resolved::Stored(r) => return Err(r.not_usable("nothing to touch").into()),
        };
        Ok(Response::new(lease_pb(&record)))
    }

    async fn stop(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let record = match self.0.resolve(&req.into_inner().name)? {
            Resolved::Live(h) => {
                h.ask(|reply| LeaseMsg::Release {
                    reason: "stopped by request".into(),
                    reply: Some(reply),
                })
                .await?
            }
            // Released already: stopping again is a success.
            Resolved::Stored(r) => *r,
        };
        Ok(Response::new(lease_pb(&record)))
    }

    async fn pause(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let h = match self.0.resolve(&req.into_inner().name)? {
            Resolved::Live(h) => h,
            Resolved::Stored(r) => return Err(r.not_usable("there is nothing to pause").into()),
        };
        h.ask(LeaseMsg::Pause).await?;
        // Until the stop is done (or failed: the lease is ready again and says why).
        let mut rx = h.state.clone();
        let record = loop {
            let r = rx.borrow_and_update().clone();
            if r.task != crate::lease::Task::Pausing {
                break r;
            }
            if rx.changed().await.is_err() {
                break h.record();
            }
        };
        if record.state == LeaseState::Ready
            && let Some(why) = record
                .reason
                .as_deref()
                .filter(|r| r.starts_with("pause failed"))
        {
            return Err(Error::Provider(crate::error::ProviderError::new(
                crate::error::ProviderErrorKind::Other,
                format!("lease {}: {why}; it is still running", record.slug),
            ))
            .into());
        }
        Ok(Response::new(lease_pb(&record)))
    }

    async fn resume(&self, req: Request<pb::LeaseRef>) -> Result<Response<pb::Lease>, Status> {
        let h = match self.0.resolve(&req.into_inner().name)? {
            Resolved::Live(h) => h,
            Resolved::Stored(r) => {
                return Err(r.not_usable("run again to get a new one").into());
            }
        };
        let mut rx = h.state.clone();
        loop {
            let r = rx.borrow_and_update().clone();
            match crate::lease::state::readiness(&r) {
                crate::lease::state::Readiness::Usable => {
                    return Ok(Response::new(lease_pb(&r)));
                }
                crate::lease::state::Readiness::Unusable(e) => return Err(e.into()),
                crate::lease::state::Readiness::Start => {
                    h.ask(LeaseMsg::Prepare).await?;
                }
                crate::lease::state::Readiness::Wait => {}
            }
            if rx.changed().await.is_err() {
                return Err(h.record().not_usable("run again to get a new one").into());
            }
        }
    }

    async fn sync_plan(
        &self,
        req: Request<pb::SyncPlanRequest>,
    ) -> Result<Response<pb::SyncPlanResponse>, Status> {
        Ok(Response::new(plan::plan(&self.0, req.into_inner()).await?))
    }

    async fn claim(&self, req: Request<pb::ClaimRequest>) -> Result<Response<pb::Lease>, Status> {
        let req = req.into_inner();
        if req.repo_root.is_empty() {
            return Err(Error::InvalidArgument(
                "claim needs the repository's absolute root path".into(),
            )
            .into());
        }
        validate_repo_root(&req.repo_root)?;
        let r = self.0.resolve(&req.lease)?.record();
        let record = self
            .0
            .registry
            .claim(r.id, req.repo_root, req.reclaim)
            .await?;
        Ok(Response::new(lease_pb(&record)))
    }
}

#[tonic::async_trait]
impl DaemonService for DaemonSvc {
    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let api = &self.0;
        let counts = api
            .registry
            .index
            .count_by_state()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let mut providers: Vec<String> = api.providers.keys().cloned().collect();
        providers.sort();
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: api.started.elapsed().as_secs(),
            providers,
            default_provider: api.default_provider.clone(),
            lease_counts: counts,
            daemon_id: api.daemon_id.clone(),
            socket: api.socket.display().to_string(),
            state_dir: api.state_dir.display().to_string(),
        }))
    }

    async fn doctor(
        &self,
        req: Request<pb::DoctorRequest>,
    ) -> Result<Response<pb::DoctorResponse>, Status> {
        let req = req.into_inner();
        let name = if req.provider.is_empty() {
            self.0.default_provider.clone()
        } else {
            req.provider
        };
        let provider = self.0.providers.get(&name).cloned().ok_or_else(|| {
            Status::from(Error::InvalidArgument(format!(
                "provider {} is not available in this daemon",
                echo(&name)
            )))
        })?;
        let options = req.provider_options;
        let checks = provider
            .doctor(&options)
            .await
            .into_iter()
            .map(|(name, ok, detail)| pb::Check { name, ok, detail })
            .collect::<Vec<_>>();
        let mut checks = checks;
        if let Some(team) = &self.0.team {
            checks.extend(
                team.doctor()
                    .await
                    .into_iter()
                    .map(|(name, ok, detail)| pb::Check { name, ok, detail }),
            );
        }
        Ok(Response::new(pb::DoctorResponse { checks }))
    }

    async fn pool_status(
        &self,
        _req: Request<pb::PoolStatusRequest>,
    ) -> Result<Response<pb::PoolStatusResponse>, Status> {
        Ok(Response::new(pool_status(&self.0).await?))
    }

    async fn pool_fill(
        &self,
        _req: Request<pb::PoolFillRequest>,
    ) -> Result<Response<pb::PoolStatusResponse>, Status> {
        self.0.registry.pool_fill().await?;
        Ok(Response::new(pool_status(&self.0).await?))
    }

    async fn team_list(
        &self,
        req: Request<pb::TeamListRequest>,
    ) -> Result<Response<pb::TeamListResponse>, Status> {
        let req = req.into_inner();
        let team = self.0.team.as_ref().ok_or_else(|| {
            Status::from(Error::InvalidArgument(
                "team mode is off in this daemon: set team: (database_url, name) in its config \
                 (~/.config/crabbox/config.yaml) or CRABBOX_TEAM_DATABASE_URL, then restart it"
                    .into(),
            ))
        })?;
        let leases = if req.name.is_empty() {
            let user = Some(req.user.as_str()).filter(|u| !u.is_empty());
            team.list(user, req.all).await?
        } else {
            let found = team.find(&req.name).await?.ok_or_else(|| {
                Status::from(Error::NotFound(format!(
                    "no lease of team {} is named {}; see `crabbox list --team`",
                    team.settings.name,
                    echo(&req.name)
                )))
            })?;
            vec![found]
        };
        Ok(Response::new(pb::TeamListResponse {
            team: team.settings.name.clone(),
            leases: leases.into_iter().map(team_lease_pb).collect(),
        }))
    }

    async fn team_stop(
        &self,
        req: Request<pb::TeamStopRequest>,
    ) -> Result<Response<pb::TeamLease>, Status> {
        let req = req.into_inner();
        let team = self.0.team.as_ref().ok_or_else(|| {
            Status::from(Error::InvalidArgument(
                "team mode is off in this daemon".into(),
            ))
        })?;
        let lease = team.find(&req.name).await?.ok_or_else(|| {
            Status::from(Error::NotFound(format!(
                "no lease of team {} is named {}; see `crabbox list --team`",
                team.settings.name,
                echo(&req.name)
            )))
        })?;
        if lease.daemon_id == self.0.daemon_id {
            return Err(Error::InvalidArgument(format!(
                "lease {} is this daemon's: stop it with `crabbox stop {}`",
                lease.slug, lease.id
            ))
            .into());
        }
        if lease.state == "released" {
            return Ok(Response::new(team_lease_pb(lease)));
        }
        if lease.user != team.settings.user && !req.force {
            return Err(Error::InvalidArgument(format!(
                "lease {} is {}'s (on {}): pass --force to stop another user's lease (who \
                 stopped it, and when, is recorded)",
                lease.slug, lease.user, lease.host
            ))
            .into());
        }
        let done = team.stop_remote(&lease, &self.0.providers).await?;
        Ok(Response::new(team_lease_pb(done)))
    }

    async fn pool_drain(
        &self,
        req: Request<pb::PoolDrainRequest>,
    ) -> Result<Response<pb::PoolDrainResponse>, Status> {
        let pool = Some(req.into_inner().pool).filter(|p| !p.is_empty());
        let released = self.0.registry.pool_drain(pool).await?;
        Ok(Response::new(pb::PoolDrainResponse { released }))
    }
}

/// [`Registry::acquire`], and in team mode, when the team's quota is used up and `wait`
/// allows it, a place in the team's queue for a slot: asked again every half second (the
/// head of the queue takes the next free slot) until it is given one or `wait` is over.
/// `said` is told once that it waits.
pub(crate) async fn acquire_waiting<F, Fut>(
    api: &Api,
    mut spec: crate::registry::AcquireSpec,
    wait: Duration,
    said: F,
) -> Result<crate::registry::Acquired, Error>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + wait;
    let mut ticket = None;
    let result = loop {
        match api.registry.acquire(spec.clone()).await {
            Err(e) if crate::team::is_quota_refusal(&e) && Instant::now() < deadline => {
                let Some(team) = &api.team else { break Err(e) };
                match ticket {
                    None => match team.enqueue().await {
                        Ok(t) => {
                            ticket = Some(t);
                            spec.slot_ticket = Some(t);
                            said(format!("waiting for a team slot: {e}")).await;
                        }
                        Err(_) => break Err(e),
                    },
                    Some(t) => {
                        let _ = team.still_waiting(t).await;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = api.shutdown.cancelled() => break Err(e),
                }
            }
            other => break other,
        }
    };
    if let (Some(t), Some(team)) = (ticket, &api.team) {
        team.dequeue(t).await;
    }
    result
}

/// A team lease as the wire shows it.
fn team_lease_pb(l: crate::team::TeamLease) -> pb::TeamLease {
    let ts = |ms: u64| (ms > 0).then(|| crate::pb::timestamp(ms));
    pb::TeamLease {
        created_at: ts(l.created_at_ms),
        expires_at: ts(l.expires_at_ms),
        heartbeat_at: ts(l.heartbeat_ms),
        stopped_at: ts(l.stopped_at_ms),
        stopped_by: l.stopped_by,
        id: l.id,
        slug: l.slug,
        user: l.user,
        host: l.host,
        daemon_id: l.daemon_id,
        repo_name: l.repo_name,
        provider: l.provider,
        sandbox_id: l.sandbox_id,
        sandbox_name: l.sandbox_name,
        state: l.state,
        generation: l.generation,
        reason: l.reason,
        released_by: l.released_by,
    }
}

/// Every pool with its counts, health and leases.
async fn pool_status(api: &Api) -> Result<pb::PoolStatusResponse, Error> {
    let views = api.registry.pool_status().await?;
    let records = api.registry.index.records();
    let pools = views
        .into_iter()
        .map(|(p, count, health)| pb::Pool {
            seeded: records
                .iter()
                .filter(|r| r.pool.as_deref() == Some(p.name.as_str()))
                .filter_map(|r| Some((r.id.clone(), r.seeded_for.clone()?)))
                .collect(),
            leases: records
                .iter()
                .filter(|r| {
                    r.pool.as_deref() == Some(p.name.as_str())
                        && (r.state.is_live() || r.state == LeaseState::Releasing)
                })
                .map(lease_pb)
                .collect(),
            name: p.name,
            provider: p.provider,
            size: p.size,
            max: p.max,
            idle_ttl_secs: p.idle_ttl.as_secs(),
            options: p.options.into_iter().collect(),
            repos: p.repos.iter().map(|r| r.display().to_string()).collect(),
            ready: count.ready,
            filling: count.filling,
            taken: health.taken,
            drained: health.drained,
            failures: health.failures,
            last_error: health.last_error.unwrap_or_default(),
            retry_at: (health.retry_at_ms > crate::clock::now_ms())
                .then(|| crate::pb::timestamp(health.retry_at_ms)),
        })
        .collect();
    Ok(pb::PoolStatusResponse { pools })
}
