//! Creating a lease's sandbox, adopting the one a previous attempt created, and waiting
//! until it is ready.

use std::time::Duration;

use crate::error::{ProviderError, ProviderErrorKind};
use crate::lease::record::LeaseRecord;
use crate::provider::{CreateSpec, Provider, SandboxInfo, SandboxState};

/// Creates the lease's sandbox, or adopts the one a previous attempt created (found by its
/// id or name and checked by its labels), starts it when stopped, and waits until it is
/// ready or `deadline` passes.
pub async fn provision(
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
            tracing::debug!(sandbox = %record.sandbox_name, provider = provider.name(), "creating the sandbox");
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
        tracing::debug!(sandbox = %sandbox.id, "starting the stopped sandbox");
        provider.start(&sandbox.id).await?;
    }
    tracing::debug!(sandbox = %sandbox.id, "waiting until the sandbox is started");
    let started = std::time::Instant::now();
    let ready = provider.wait_ready(&sandbox.id, deadline).await?;
    tracing::debug!(sandbox = %sandbox.id, ms = started.elapsed().as_millis() as u64, "the sandbox is started");
    Ok(ready)
}
