//! Environments: the snapshot for a Dockerfile, named by a keyed hash, looked up, built
//! when absent and waited for until active.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Client, Idempotent};
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
        // The build's log lines, followed while it builds (see `follow_build_log`): from
        // its first look (a log may not be readable before the build starts: followed
        // again when the follower ended early, a few times).
        let mut build_log: Option<tokio::task::JoinHandle<()>> = None;
        let mut follower = StopOnDrop(&mut build_log);
        let mut follows = 0;
        loop {
            match self.snapshot(&name).await {
                Ok(Some(snap))
                    if matches!(snap.state.as_str(), "pending" | "building" | "pulling")
                        && follower.0.as_ref().is_none_or(|t| t.is_finished())
                        && follows < 3 =>
                {
                    if follows == 0 {
                        tracing::info!(snapshot = %name, progress = true, "building the environment's image");
                    }
                    follows += 1;
                    let client = self.client.clone();
                    let id = snap.id.clone();
                    *follower.0 = Some(tokio::spawn(tracing::Instrument::in_current_span(
                        async move { follow_build_log(&client, &id).await },
                    )));
                }
                Ok(Some(snap)) => match snap.state.as_str() {
                    "active" => {
                        follower.finish().await;
                        return Ok(name);
                    }
                    "error" | "build_failed" => {
                        follower.finish().await;
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
                    id: text("id").unwrap_or_else(|| name.to_string()),
                    state: text("state").unwrap_or_else(|| "unknown".into()),
                    error_reason: text("errorReason").unwrap_or_else(|| "no reason given".into()),
                }))
            }
            Err(h) if h.status.map(|s| s.as_u16()) == Some(404) => Ok(None),
            Err(h) => Err(h.error),
        }
    }
}

/// Aborts the build-log follower when the wait ends, however it ends.
struct StopOnDrop<'a>(&'a mut Option<tokio::task::JoinHandle<()>>);

impl StopOnDrop<'_> {
    /// Lets the follower print the build's last lines (its stream ends with the build),
    /// for at most 2 s.
    async fn finish(&mut self) {
        if let Some(mut task) = self.0.take()
            && tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Streams the snapshot's build log (`build-logs-url`, then `?follow=true`, as the
/// official SDK reads it) into the log, a line at a time, as progress: `crabbox` shows
/// each line in its spinner, `-v` too. Best effort: a log that cannot be read changes
/// nothing about the build.
async fn follow_build_log(client: &Client, id: &str) {
    use futures_util::StreamExt;
    {
        let url = match client
            .json(
                Method::GET,
                &client.url(&format!("/snapshots/{id}/build-logs-url")),
                None,
                Idempotent::Yes,
            )
            .await
        {
            Ok(v) => match v.get("url").and_then(Value::as_str) {
                Some(u) => u.to_string(),
                None => return,
            },
            Err(h) => {
                tracing::debug!(error = %h.error, "the image build's log cannot be read");
                return;
            }
        };
        let Ok(headers) = client.auth_headers() else {
            return;
        };
        let answer = client
            .request(Method::GET, &url)
            .query(&[("follow", "true")])
            .headers(headers)
            .send()
            .await;
        let mut body = match answer {
            Ok(r) if r.status().is_success() => r.bytes_stream(),
            Ok(r) => {
                tracing::debug!(
                    status = r.status().as_u16(),
                    "the image build's log cannot be read"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(error = %client.redact(&e.to_string()), "the image build's log cannot be read");
                return;
            }
        };
        let mut pending = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            pending.extend_from_slice(&chunk);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if !line.is_empty() {
                    tracing::info!(progress = true, "image build: {}", client.redact(&line));
                }
            }
        }
    }
}

/// A snapshot as the provider cares about it.
pub(super) struct Snapshot {
    pub id: String,
    pub state: String,
    pub error_reason: String,
}
