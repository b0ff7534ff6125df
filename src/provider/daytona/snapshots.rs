//! Environments: the snapshot for a Dockerfile, named by a keyed hash, looked up, built
//! when absent and waited for until active.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::client::Idempotent;
use super::{DaytonaProvider, e};
use crate::provider::{ProviderError, ProviderErrorKind};

/// How long an environment's image may take to build.
const SNAPSHOT_BUILD_DEADLINE: Duration = Duration::from_secs(600);

impl DaytonaProvider {
    /// The snapshot name for an environment: a hash of the Dockerfile and resources, keyed
    /// by the account (so the name reveals nothing, and accounts do not share names).
    pub(super) fn snapshot_name(
        &self,
        dockerfile: &str,
        options: &BTreeMap<String, String>,
    ) -> String {
        let account = format!(
            "{}\n{}",
            self.client.api_url(),
            self.client.account_material()
        );
        let key = blake3::derive_key("crabbox environment snapshot v1", account.as_bytes());
        let mut h = blake3::Hasher::new_keyed(&key);
        h.update(dockerfile.as_bytes());
        for k in ["cpu", "memory", "disk"] {
            h.update(
                format!("\0{k}={}", options.get(k).map(String::as_str).unwrap_or("")).as_bytes(),
            );
        }
        let hex = h.finalize().to_hex();
        format!("crabbox-env-{}", &hex.as_str()[..16])
    }

    /// Finds the environment's snapshot, creating it when absent, and waits until it is
    /// active; `build_failed` / `error` report Daytona's `errorReason`.
    pub(super) async fn ensure_snapshot(
        &self,
        dockerfile: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<String, ProviderError> {
        let name = self.snapshot_name(dockerfile, options);
        let started = Instant::now();
        let mut creates = 0;
        loop {
            match self.snapshot(&name).await {
                Ok(Some(snap)) => match snap.state.as_str() {
                    "active" => return Ok(name),
                    "error" | "build_failed" => {
                        return Err(e(
                            ProviderErrorKind::Provisioning,
                            format!(
                                "building the environment's image (snapshot {name}) failed: {}",
                                snap.error_reason
                            ),
                        ));
                    }
                    state => {
                        tracing::info!(snapshot = %name, state, "waiting for the environment's image")
                    }
                },
                Ok(None) if creates < 3 => {
                    creates += 1;
                    let mut body =
                        json!({ "name": name, "buildInfo": { "dockerfileContent": dockerfile } });
                    for k in ["cpu", "memory", "disk"] {
                        if let Some(n) = options.get(k).and_then(|v| v.parse::<u64>().ok()) {
                            body[k] = json!(n);
                        }
                    }
                    tracing::info!(snapshot = %name, "building the environment's image");
                    match self
                        .api(Method::POST, "/snapshots", Some(&body), Idempotent::No)
                        .await
                    {
                        Ok(_) => {}
                        // Someone else is building it: wait for theirs.
                        Err(h) if h.status.map(|s| s.as_u16()) == Some(409) => {}
                        // A lost answer: the next look finds it (or creates it again).
                        Err(h) if h.status.is_none_or(|s| s.is_server_error()) => {}
                        Err(h) => return Err(h.error),
                    }
                    continue;
                }
                Ok(None) => {
                    return Err(e(
                        ProviderErrorKind::Provisioning,
                        format!(
                            "the environment's image (snapshot {name}) vanished 3 times while it was built"
                        ),
                    ));
                }
                Err(err) => return Err(err),
            }
            if started.elapsed() > SNAPSHOT_BUILD_DEADLINE {
                return Err(e(
                    ProviderErrorKind::Provisioning,
                    format!(
                        "the environment's image (snapshot {name}) was not built within {}m",
                        SNAPSHOT_BUILD_DEADLINE.as_secs() / 60
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// How the snapshot named `name` stands; `None` when Daytona has none by that name.
    pub(super) async fn snapshot(&self, name: &str) -> Result<Option<Snapshot>, ProviderError> {
        match self
            .api(
                Method::GET,
                &format!("/snapshots/{name}"),
                None,
                Idempotent::Yes,
            )
            .await
        {
            Ok(v) => {
                let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
                Ok(Some(Snapshot {
                    state: text("state").unwrap_or_else(|| "unknown".into()),
                    error_reason: text("errorReason").unwrap_or_else(|| "no reason given".into()),
                }))
            }
            Err(h) if h.status.map(|s| s.as_u16()) == Some(404) => Ok(None),
            Err(h) => Err(h.error),
        }
    }
}

/// A snapshot as the provider cares about it.
pub(super) struct Snapshot {
    pub state: String,
    pub error_reason: String,
}
