//! Deleting a lease's sandbox, only ever when it carries this lease's ownership labels.

use crate::error::ProviderError;
use crate::lease::record::LeaseRecord;
use crate::provider::Provider;

/// Deletes the lease's sandbox if it exists and carries this lease's ownership labels.
/// Gone already is a success; a sandbox that is not ours is left alone. Safe to repeat.
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
