//! The copy use cases (`CopyFrom`, `CopyTo`): files in and out of a lease's sandbox as
//! one tar stream, through [`crate::lease::ops::transfer`].

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tonic::Status;

use super::wire::lease_pb;
use super::{Api, validate_repo_root};
use crate::error::Error;
use crate::lease::ops::transfer::{self, Source};
use crate::lease::{LeaseHandle, LeaseMsg, LeaseRecord, LeaseState};
use crate::pb;
use crate::provider::Provider;
use crate::registry::index::Resolved;

/// A lease ready for a copy: its record, provider, work root, and the checkout folder
/// relative remote paths start from.
pub struct Target {
    pub handle: LeaseHandle,
    pub record: LeaseRecord,
    pub provider: Arc<dyn Provider>,
    pub work_root: String,
    pub base: String,
}

impl Api {
    /// The lease a copy names (or the repo's), when it has a started sandbox.
    pub(super) fn copy_target(&self, lease: &str, repo_root: &str) -> Result<Target, Error> {
        validate_repo_root(repo_root)?;
        let handle = match self.resolve_or_claimed(lease, repo_root)? {
            Resolved::Live(h) => h,
            Resolved::Stored(r) => {
                return Err(r.not_usable("its sandbox is gone: nothing to copy"));
            }
        };
        let record = handle.record();
        if !matches!(
            record.state,
            LeaseState::Ready | LeaseState::Syncing | LeaseState::Running
        ) {
            let hint = if record.state == LeaseState::Stopped {
                format!("it is paused: `crabbox resume {}` first", record.slug)
            } else {
                format!(
                    "it is not ready: wait with `crabbox status {} --wait`",
                    record.slug
                )
            };
            return Err(record.not_usable(hint));
        }
        let provider = self
            .providers
            .get(&record.provider)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("provider {} is gone", record.provider)))?;
        let work_root = provider.work_root(&record.sandbox_name);
        // Relative paths start at the checkout of the lease's own repo (the one its runs
        // sync), else of the asking repo, else the lease's folder.
        let repo = record
            .repo_root
            .as_deref()
            .or(Some(repo_root).filter(|r| !r.is_empty()));
        let lease_dir = format!("{work_root}/{}", record.id);
        let base = match repo
            .and_then(|r| Path::new(r).file_name())
            .and_then(|n| n.to_str())
        {
            Some(name) => format!("{lease_dir}/{name}"),
            None => lease_dir,
        };
        Ok(Target {
            handle,
            record,
            provider,
            work_root,
            base,
        })
    }
}

/// `CopyFrom`: packs the sources and streams the header, then the archive.
pub async fn copy_from(
    api: Arc<Api>,
    req: pb::CopyFromRequest,
) -> Result<mpsc::Receiver<Result<pb::CopyChunk, Status>>, Status> {
    if req.sources.is_empty() {
        return Err(
            Error::InvalidArgument("nothing to copy: name at least one path".into()).into(),
        );
    }
    let t = api.copy_target(&req.lease, &req.repo_root)?;
    let mut sources = Vec::new();
    for s in &req.sources {
        let resolved = transfer::resolve(s, &t.base, &t.work_root, req.any_path)
            .map_err(Error::InvalidArgument)?;
        // A relative source keeps its relative spelling (a glob's matches keep their
        // paths), once it is known to stay inside.
        sources.push(Source::parse(if s.starts_with('/') {
            &resolved
        } else {
            s
        }));
    }
    let sandbox = t.record.sandbox_ref().to_string();
    let (packed, archive) = transfer::pack(
        t.provider.as_ref(),
        &sandbox,
        &t.work_root,
        &t.base,
        &sources,
    )
    .await
    .map_err(Error::from)?;
    t.handle.tell(LeaseMsg::KeepAlive);
    let (tx, rx) = mpsc::channel(16);
    let chunk = header(
        Some(lease_pb(&t.record)),
        packed.entries,
        packed.missing,
        &t.base,
    );
    let _ = tx.send(Ok(chunk)).await;
    if let Some(archive) = archive {
        tokio::spawn(async move {
            let sent = send_chunks(t.provider.as_ref(), &sandbox, &t.work_root, &archive, |c| {
                let tx = tx.clone();
                async move { tx.send(Ok(c)).await.is_ok() }
            })
            .await;
            if let Err(e) = sent {
                let _ = tx.send(Err(Error::from(e).into())).await;
            }
        });
    }
    Ok(rx)
}

/// A fetched archive's header on the wire: what each source brought, what was missing.
pub(super) fn header(
    lease: Option<pb::Lease>,
    entries: Vec<(u32, String)>,
    missing: Vec<String>,
    base: &str,
) -> pb::CopyChunk {
    pb::CopyChunk {
        chunk: Some(pb::copy_chunk::Chunk::Header(pb::CopyHeader {
            lease,
            entries: entries
                .into_iter()
                .map(|(source, name)| pb::CopyEntry { source, name })
                .collect(),
            missing,
            base: base.to_string(),
        })),
    }
}

/// Streams a staged archive as data chunks through `emit` (which answers false once the
/// client is gone), then removes it; answers its size.
pub(super) async fn send_chunks<F, Fut>(
    provider: &dyn Provider,
    sandbox: &str,
    work_root: &str,
    archive: &str,
    mut emit: F,
) -> Result<u64, crate::error::ProviderError>
where
    F: FnMut(pb::CopyChunk) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let send = transfer::send(provider, sandbox, work_root, archive, tx);
    let forward = async {
        while let Some(d) = rx.recv().await {
            let chunk = pb::CopyChunk {
                chunk: Some(pb::copy_chunk::Chunk::Data(d)),
            };
            if !emit(chunk).await {
                return;
            }
        }
    };
    let (sent, ()) = tokio::join!(send, forward);
    sent
}

/// `CopyTo`: the archive goes to a temp file in the daemon's state dir (constant
/// memory), then into the sandbox, unpacked into the folder `start` names.
pub async fn copy_to(
    api: Arc<Api>,
    mut inbound: tonic::Streaming<pb::CopyToChunk>,
) -> Result<pb::CopyToResult, Status> {
    let start = match inbound.message().await? {
        Some(pb::CopyToChunk {
            chunk: Some(pb::copy_to_chunk::Chunk::Start(s)),
        }) => s,
        _ => {
            return Err(
                Error::InvalidArgument("CopyTo: the first message must be `start`".into()).into(),
            );
        }
    };
    let t = api.copy_target(&start.lease, &start.repo_root)?;
    if !start.single_entry.is_empty()
        && (start.single_entry.contains('/') || matches!(start.single_entry.as_str(), "." | ".."))
    {
        return Err(Error::InvalidArgument(format!(
            "CopyTo: single_entry {:?} must be a plain name",
            start.single_entry
        ))
        .into());
    }
    let dest_text = if start.dest.is_empty() {
        "."
    } else {
        &start.dest
    };
    let dest = transfer::resolve(dest_text, &t.base, &t.work_root, start.any_path)
        .map_err(Error::InvalidArgument)?;
    let tmp_dir = api.state_dir.join("tmp");
    std::fs::create_dir_all(&tmp_dir)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", tmp_dir.display())))?;
    let file = tempfile::Builder::new()
        .prefix("copy-")
        .suffix(".tar")
        .tempfile_in(&tmp_dir)
        .map_err(|e| Error::Internal(format!("a temp file for the copy: {e}")))?;
    let mut out = tokio::fs::File::from_std(
        file.reopen()
            .map_err(|e| Error::Internal(format!("the copy's temp file: {e}")))?,
    );
    let mut bytes = 0u64;
    while let Some(msg) = inbound.message().await? {
        if let Some(pb::copy_to_chunk::Chunk::Data(d)) = msg.chunk {
            bytes += d.len() as u64;
            out.write_all(&d)
                .await
                .map_err(|e| Error::Internal(format!("writing the copy's temp file: {e}")))?;
        }
    }
    out.flush()
        .await
        .map_err(|e| Error::Internal(format!("writing the copy's temp file: {e}")))?;
    drop(out);
    transfer::put(
        t.provider.as_ref(),
        t.record.sandbox_ref(),
        &t.work_root,
        &dest,
        Some(start.single_entry.as_str()).filter(|e| !e.is_empty()),
        file.path(),
    )
    .await
    .map_err(Error::from)?;
    t.handle.tell(LeaseMsg::KeepAlive);
    Ok(pb::CopyToResult {
        lease: Some(lease_pb(&t.record)),
        dest,
        bytes,
    })
}
