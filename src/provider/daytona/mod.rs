//! The `daytona` provider: Daytona's control plane for sandboxes and its toolbox for files
//! and commands (see DAYTONA.md). Credentials live in the daemon ([`auth`]).
//!
//! - Create is never blindly re-sent: a lost answer is recovered by the lease label, a
//!   duplicate name by reading the sandbox and checking its labels.
//! - Readiness: a fast, growing poll (first look within 50 ms, at most 1 s apart).
//! - Sync: the archive is streamed from disk to `upload-v2`, extracted by one command.
//! - Exec: a session with an async command and the logs WebSocket, so stdout and stderr
//!   arrive live and apart; cancel deletes the session (ending the command).

pub mod auth;
pub mod client;
pub mod demux;
mod events;
mod exec;
mod pty;
mod snapshots;
pub mod ssh;
mod toolbox;

pub use ssh::parse_ssh_command;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    CreateSpec, ExecExit, ExecOutput, ExecSpec, Input, Provider, ProviderError, ProviderErrorKind,
    SandboxInfo, SandboxState, SshAccessInfo, UploadSpec, shell_quote as quote,
};
use client::{Client, HttpError, Idempotent};

/// Provider settings the daemon resolves from config and environment.
#[derive(Debug, Clone)]
pub struct DaytonaSettings {
    pub api_url: String,
    pub work_root: String,
    pub ssh_gateway_host: String,
    pub ssh_access_minutes: u32,
    /// Defaults for leases that name none.
    pub snapshot: Option<String>,
    pub target: Option<String>,
    pub user: String,
}

impl Default for DaytonaSettings {
    fn default() -> Self {
        DaytonaSettings {
            api_url: "https://app.daytona.io/api".into(),
            work_root: "/home/daytona/crabbox".into(),
            ssh_gateway_host: "ssh.app.daytona.io".into(),
            ssh_access_minutes: 30,
            snapshot: None,
            target: None,
            user: "daytona".into(),
        }
    }
}

/// The `daytona` provider.
pub struct DaytonaProvider {
    client: Client,
    settings: DaytonaSettings,
    /// Set when the credentials found are unusable (a JWT without organisation): every
    /// call answers it.
    credentials_error: Option<ProviderError>,
    /// Toolbox base URL per sandbox id.
    toolbox: DashMap<String, String>,
    /// Minted SSH access per sandbox, reused while it has 10 minutes left.
    ssh: DashMap<String, SshAccessInfo>,
    /// Daytona's events channel (sandbox state changes, pushed).
    events: events::Events,
    /// The session each sandbox's commands run in, kept for the lease's life.
    sessions: DashMap<String, String>,
}

/// How long a timed-out upload/extract command may take on the sandbox.
const SYNC_COMMAND_TIMEOUT_SECS: u64 = 600;
/// A cached SSH token is refreshed when it has less than this left.
const SSH_REFRESH_MARGIN: Duration = Duration::from_secs(10 * 60);
/// How long a release waits out 409 (a state change in progress).
const RELEASE_CONFLICT_WAIT: Duration = Duration::from_secs(60);

fn e(kind: ProviderErrorKind, msg: impl Into<String>) -> ProviderError {
    ProviderError::new(kind, msg)
}

/// A sandbox state of Daytona's as crabbox cares about it; `v` is the sandbox (for its
/// error reason). Unknown states (new ones appear) count as still coming up.
fn parse_state(state: &str, v: &Value) -> SandboxState {
    match state {
        "started" => SandboxState::Started,
        "stopped" | "archived" | "paused" => SandboxState::Stopped,
        "error" | "build_failed" => SandboxState::Error(
            v.get("errorReason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        ),
        "destroyed" | "destroying" => SandboxState::Destroyed,
        _ => SandboxState::Creating,
    }
}

fn gone(sandbox: &str) -> ProviderError {
    e(
        ProviderErrorKind::Provisioning,
        format!("sandbox {sandbox} disappeared while starting"),
    )
}

impl DaytonaProvider {
    pub fn new(
        settings: DaytonaSettings,
        credentials: auth::Resolved,
    ) -> Result<Self, ProviderError> {
        let (creds, credentials_error) = match credentials {
            auth::Resolved::Found(c) => (Some(c), None),
            auth::Resolved::Missing => (None, Some(client::no_credentials())),
            auth::Resolved::Invalid(err) => (None, Some(err)),
        };
        Ok(DaytonaProvider {
            client: Client::new(&settings.api_url, creds)?,
            settings,
            credentials_error,
            toolbox: DashMap::new(),
            ssh: DashMap::new(),
            events: Default::default(),
            sessions: DashMap::new(),
        })
    }

    pub fn settings(&self) -> &DaytonaSettings {
        &self.settings
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn ready(&self) -> Result<(), ProviderError> {
        match &self.credentials_error {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    /// [`Self::api`] when only the error matters, not the HTTP status.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idem: Idempotent,
    ) -> Result<Value, ProviderError> {
        self.api(method, path, body, idem)
            .await
            .map_err(|h| h.error)
    }

    async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idem: Idempotent,
    ) -> Result<Value, HttpError> {
        if let Err(err) = self.ready() {
            return Err(HttpError {
                status: None,
                error: err,
            });
        }
        self.client
            .json(method, &self.client.url(path), body, idem)
            .await
    }

    fn parse_sandbox(&self, v: &Value) -> Result<SandboxInfo, ProviderError> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let id = s("id");
        if id.is_empty() {
            return Err(e(
                ProviderErrorKind::Other,
                "Daytona answered a sandbox without an id",
            ));
        }
        let labels: BTreeMap<String, String> = v
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let proxy = s("toolboxProxyUrl");
        if !proxy.is_empty() {
            self.toolbox
                .insert(id.clone(), format!("{}/{id}", proxy.trim_end_matches('/')));
        }
        Ok(SandboxInfo {
            id,
            name: s("name"),
            state: parse_state(&s("state"), v),
            labels,
        })
    }

    /// What a waiting lease does with the sandbox as it now is: ready (started), a
    /// failure (error, destroyed), or wait on (a stopped one is asked to start).
    async fn settle(
        &self,
        sandbox: &str,
        info: &SandboxInfo,
    ) -> Result<Option<SandboxInfo>, ProviderError> {
        match &info.state {
            SandboxState::Started => Ok(Some(info.clone())),
            SandboxState::Error(reason) => Err(e(
                ProviderErrorKind::Provisioning,
                format!("sandbox {sandbox} failed: {reason}"),
            )),
            SandboxState::Destroyed => Err(e(
                ProviderErrorKind::Provisioning,
                format!("sandbox {sandbox} was destroyed while starting"),
            )),
            SandboxState::Stopped => {
                self.start(&info.id).await?;
                Ok(None)
            }
            SandboxState::Creating => Ok(None),
        }
    }

    /// The sandbox already named `spec.name`, when it carries this lease's labels (an
    /// earlier attempt of this create made it); anyone else's is refused.
    async fn adopt(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        let v = self
            .call(
                Method::GET,
                &format!("/sandbox/{}", spec.name),
                None,
                Idempotent::Yes,
            )
            .await?;
        let found = self.parse_sandbox(&v)?;
        if found.labels.get("lease") == spec.labels.get("lease")
            && found.labels.get("owner") == spec.labels.get("owner")
        {
            Ok(found)
        } else {
            Err(e(
                ProviderErrorKind::Provisioning,
                format!(
                    "a sandbox named {} already exists and is not this lease's",
                    spec.name
                ),
            ))
        }
    }

    /// Finds the sandbox a lost create may have made, by its lease label.
    async fn find_by_lease(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<SandboxInfo>, ProviderError> {
        let Some(lease) = labels.get("lease") else {
            return Ok(None);
        };
        let filter = BTreeMap::from([("lease".to_string(), lease.clone())]);
        // The list is eventually consistent after a create: look a few times.
        for _ in 0..5 {
            if let Some(found) = self.list(&filter).await?.into_iter().next() {
                return Ok(Some(found));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(None)
    }
}

#[async_trait]
impl Provider for DaytonaProvider {
    fn name(&self) -> &str {
        "daytona"
    }

    fn work_root(&self, _sandbox_name: &str) -> String {
        self.settings.work_root.trim_end_matches('/').to_string()
    }

    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        self.ready()?;
        let opt = |k: &str| spec.options.get(k).filter(|v| !v.is_empty()).cloned();
        let mut body = json!({
            "name": spec.name,
            "labels": spec.labels,
            "user": opt("user").unwrap_or_else(|| self.settings.user.clone()),
            "env": {},
        });
        if let Some(dockerfile) = opt("dockerfile") {
            // An environment: its image is a snapshot built from the Dockerfile (which then
            // also carries the resources).
            let snapshot = self.ensure_snapshot(&dockerfile, &spec.options).await?;
            body["snapshot"] = json!(snapshot);
        } else {
            if let Some(s) = opt("snapshot").or_else(|| self.settings.snapshot.clone()) {
                body["snapshot"] = json!(s);
            }
            for (opt_key, field) in [("cpu", "cpu"), ("memory", "memory"), ("disk", "disk")] {
                if let Some(n) = opt(opt_key).and_then(|v| v.parse::<u64>().ok()) {
                    body[field] = json!(n);
                }
            }
        }
        if opt("network_block_all").as_deref() == Some("true") {
            body["networkBlockAll"] = json!(true);
        }
        if let Some(list) = opt("network_allow_list") {
            body["networkAllowList"] = json!(list);
        }
        if let Some(t) = opt("target").or_else(|| self.settings.target.clone()) {
            body["target"] = json!(t);
        }
        if let Some(m) = opt("auto_stop_minutes").and_then(|m| m.parse::<u64>().ok()) {
            body["autoStopInterval"] = json!(m);
        }
        // A create is never re-sent blindly: after a lost answer it is sent again only once
        // the sandbox is confirmed absent (by its lease label), a bounded number of times.
        let mut retries = client::Retries::new(self.client.retry, Idempotent::Yes);
        loop {
            let h = match self
                .api(Method::POST, "/sandbox", Some(&body), Idempotent::No)
                .await
            {
                Ok(v) => return self.parse_sandbox(&v),
                Err(h) => h,
            };
            match h.status.map(|s| s.as_u16()) {
                // The name exists: ours from an earlier attempt, or someone else's.
                Some(409) => return self.adopt(spec).await,
                // The answer was lost (dropped connection, 5xx): the create may have
                // happened. Look for it by its lease label before anything else.
                None | Some(500..=599) => {
                    if let Some(found) = self.find_by_lease(&spec.labels).await? {
                        return Ok(found);
                    }
                    // Confirmed absent: sending it again cannot make a second sandbox (the
                    // name is unique; a 409 would be answered and adopted).
                    match retries.after_failure(h.status, None) {
                        Ok(delay) => tokio::time::sleep(delay).await,
                        Err(detail) => {
                            return Err(e(h.error.kind, format!("{}{detail}", h.error.message)));
                        }
                    }
                }
                _ => return Err(h.error),
            }
        }
    }

    async fn get(&self, sandbox: &str) -> Result<Option<SandboxInfo>, ProviderError> {
        match self
            .api(
                Method::GET,
                &format!("/sandbox/{sandbox}"),
                None,
                Idempotent::Yes,
            )
            .await
        {
            Ok(v) => self.parse_sandbox(&v).map(Some),
            Err(h) if h.status.map(|s| s.as_u16()) == Some(404) => Ok(None),
            Err(h) => Err(h.error),
        }
    }

    async fn wait_ready(
        &self,
        sandbox: &str,
        deadline: Duration,
    ) -> Result<SandboxInfo, ProviderError> {
        let start = Instant::now();
        // Told the moment the sandbox changes (subscribed before the first look, so no
        // change falls in between); a look at it now and then all the same, often while
        // the channel is down.
        let mut events = self.events.subscribe(&self.client);
        let mut info = self.get(sandbox).await?.ok_or_else(|| gone(sandbox))?;
        let mut poll = Duration::from_millis(25);
        loop {
            if let Some(ready) = self.settle(sandbox, &info).await? {
                return Ok(ready);
            }
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(e(
                    ProviderErrorKind::Provisioning,
                    format!(
                        "sandbox {sandbox} was not started after {}s",
                        deadline.as_secs()
                    ),
                ));
            }
            let cap = if self.events.is_up() {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(150)
            };
            poll = poll.min(cap);
            let fresh = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) if ev.id == info.id => Some(self.parse_sandbox(&ev.sandbox).map(|mut i| {
                        // The event's new state is the news; the DTO may lag it.
                        i.state = parse_state(&ev.state, &ev.sandbox);
                        i
                    })?),
                    Ok(_) => None,
                    // Missed some: look.
                    Err(_) => Some(self.get(sandbox).await?.ok_or_else(|| gone(sandbox))?),
                },
                () = tokio::time::sleep(poll.min(left)) => {
                    poll = poll.mul_f64(1.6);
                    Some(self.get(sandbox).await?.ok_or_else(|| gone(sandbox))?)
                }
            };
            if let Some(i) = fresh {
                info = i;
            }
        }
    }

    async fn start(&self, sandbox: &str) -> Result<SandboxInfo, ProviderError> {
        let v = self
            .call(
                Method::POST,
                &format!("/sandbox/{sandbox}/start"),
                None,
                Idempotent::Yes,
            )
            .await?;
        self.parse_sandbox(&v)
    }

    async fn stop(&self, sandbox: &str) -> Result<(), ProviderError> {
        self.call(
            Method::POST,
            &format!("/sandbox/{sandbox}/stop"),
            None,
            Idempotent::Yes,
        )
        .await?;
        // Daytona stops in the background: answer once it says stopped.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            match self.get(sandbox).await? {
                Some(sb) if sb.state == SandboxState::Stopped => return Ok(()),
                Some(SandboxInfo {
                    state: SandboxState::Error(reason),
                    ..
                }) => {
                    return Err(e(
                        ProviderErrorKind::Other,
                        format!("sandbox {sandbox} went into error while stopping: {reason}"),
                    ));
                }
                None => {
                    return Err(e(
                        ProviderErrorKind::Other,
                        format!("sandbox {sandbox} vanished while stopping"),
                    ));
                }
                Some(_) if std::time::Instant::now() > deadline => {
                    return Err(e(
                        ProviderErrorKind::Other,
                        format!("sandbox {sandbox} did not stop within 120s"),
                    ));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(150)).await,
            }
        }
    }

    async fn set_labels(
        &self,
        sandbox: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let body = json!({ "labels": labels });
        self.api(
            Method::PUT,
            &format!("/sandbox/{sandbox}/labels"),
            Some(&body),
            Idempotent::Yes,
        )
        .await
        .map(|_| ())
        .map_err(|h| h.error)
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxInfo>, ProviderError> {
        let filter = serde_json::to_string(labels)
            .map_err(|err| e(ProviderErrorKind::Other, err.to_string()))?;
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let mut query = vec![("labels", filter.clone()), ("limit", "100".to_string())];
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let qs: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish();
            let v = self
                .call(
                    Method::GET,
                    &format!("/sandbox?{qs}"),
                    None,
                    Idempotent::Yes,
                )
                .await?;
            // Old servers answer a bare array; new ones {items, nextCursor}.
            let items = v
                .get("items")
                .or(Some(&v))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in &items {
                out.push(self.parse_sandbox(item)?);
            }
            cursor = v
                .get("nextCursor")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            if cursor.is_none() || items.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    async fn upload(&self, sandbox: &str, spec: &UploadSpec) -> Result<(), ProviderError> {
        self.upload_checkout(sandbox, spec).await
    }

    async fn synced_digest(
        &self,
        sandbox: &str,
        workdir: &str,
    ) -> Result<Option<String>, ProviderError> {
        self.read_digest(sandbox, workdir).await
    }

    async fn preview(
        &self,
        sandbox: &str,
        port: u16,
        signed: Option<Duration>,
    ) -> Result<crate::provider::Preview, ProviderError> {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let secs = signed.map(|ttl| ttl.as_secs().clamp(1, 24 * 3600));
        let path = match secs {
            Some(secs) => {
                format!(
                    "/sandbox/{sandbox}/ports/{port}/signed-preview-url?expiresInSeconds={secs}"
                )
            }
            None => format!("/sandbox/{sandbox}/ports/{port}/preview-url"),
        };
        let v = self
            .api(Method::GET, &path, None, Idempotent::Yes)
            .await
            .map_err(|h| h.error)?;
        let url = text(&v, "url")
            .ok_or_else(|| e(ProviderErrorKind::Other, "Daytona answered no preview url"))?;
        // A signed URL carries its access; a plain one needs its token in a header.
        Ok(match secs {
            Some(secs) => crate::provider::Preview {
                url,
                token: None,
                header: None,
                expires_at_ms: Some(crate::clock::now_ms() + secs * 1000),
            },
            None => crate::provider::Preview {
                url,
                token: text(&v, "token"),
                header: Some("X-Daytona-Preview-Token".into()),
                expires_at_ms: None,
            },
        })
    }

    async fn execute(
        &self,
        sandbox: &str,
        command: &str,
        cwd: &str,
        timeout: Duration,
    ) -> Result<crate::provider::Executed, ProviderError> {
        self.execute_once(sandbox, command, cwd, timeout).await
    }

    async fn read_file(
        &self,
        sandbox: &str,
        path: &str,
        out: mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, ProviderError> {
        self.download_file(sandbox, path, out).await
    }

    async fn write_file(
        &self,
        sandbox: &str,
        path: &str,
        local: &std::path::Path,
    ) -> Result<(), ProviderError> {
        self.put_file(sandbox, local, path).await
    }

    async fn exec(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        match spec.tty {
            Some(size) => {
                self.exec_on_pty(sandbox, spec, size, input, out, cancel)
                    .await
            }
            None => self.exec_command(sandbox, spec, input, out, cancel).await,
        }
    }

    async fn ssh_access(
        &self,
        sandbox: &str,
        minutes: u32,
    ) -> Result<SshAccessInfo, ProviderError> {
        self.mint_ssh_access(sandbox, minutes).await
    }

    fn check_ready(&self) -> Result<(), ProviderError> {
        self.ready()
    }

    async fn doctor(&self, options: &BTreeMap<String, String>) -> Vec<(String, bool, String)> {
        let mut checks = Vec::new();
        if let Err(err) = self.ready() {
            checks.push(("daytona credentials".into(), false, err.message));
            return checks;
        }
        checks.push((
            "daytona credentials".into(),
            true,
            format!("found, for {}", self.client.api_url()),
        ));
        match self
            .api(Method::GET, "/api-keys/current", None, Idempotent::Yes)
            .await
        {
            Ok(v) => {
                let perms: Vec<String> = v
                    .get("permissions")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let missing: Vec<&str> = ["write:sandboxes", "delete:sandboxes"]
                    .into_iter()
                    .filter(|p| !perms.iter().any(|x| x == p))
                    .collect();
                checks.push(if missing.is_empty() {
                    (
                        "daytona key permissions".into(),
                        true,
                        "write:sandboxes, delete:sandboxes".into(),
                    )
                } else {
                    (
                        "daytona key permissions".into(),
                        false,
                        format!(
                            "the key lacks {}: create a key with them in the Daytona dashboard",
                            missing.join(", ")
                        ),
                    )
                });
            }
            // A JWT has no key to introspect; 404/403 from older servers are not fatal.
            Err(h) if matches!(h.status.map(|s| s.as_u16()), Some(403 | 404)) => {
                checks.push((
                    "daytona key permissions".into(),
                    true,
                    "not checked (no API key to introspect)".into(),
                ));
            }
            Err(h) => checks.push(("daytona API".into(), false, h.error.message)),
        }
        if let Some(dockerfile) = options.get("dockerfile").filter(|d| !d.is_empty()) {
            // An environment: say which snapshot its image resolves to, and how it stands.
            let name = self.snapshot_name(dockerfile, options);
            let check = match self.snapshot(&name).await {
                Ok(Some(snap)) if matches!(snap.state.as_str(), "build_failed" | "error") => (
                    false,
                    format!(
                        "{name} (from environment.image) failed to build: {}; fix the \
                         Dockerfile (a changed one gets a new snapshot)",
                        snap.error_reason
                    ),
                ),
                Ok(Some(snap)) => (
                    true,
                    format!("{name} (from environment.image) is {}", snap.state),
                ),
                Ok(None) => (
                    true,
                    format!(
                        "{name} (from environment.image) does not exist yet: the first lease \
                         builds it (up to 10 minutes)"
                    ),
                ),
                Err(err) => (false, format!("{name} (from environment.image): {err}")),
            };
            checks.push(("daytona snapshot".into(), check.0, check.1));
            return checks;
        }
        let snapshot = options
            .get("snapshot")
            .filter(|s| !s.is_empty())
            .cloned()
            .or_else(|| self.settings.snapshot.clone());
        match snapshot {
            None => checks.push(("daytona snapshot".into(), true, "none set: Daytona's default is used".into())),
            Some(name) => match self.api(Method::GET, &format!("/snapshots/{name}"), None, Idempotent::Yes).await {
                Ok(v) => {
                    let state = v.get("state").and_then(Value::as_str).unwrap_or("unknown").to_string();
                    checks.push(("daytona snapshot".into(), state == "active", format!("{name} is {state}")));
                }
                Err(h) => checks.push((
                    "daytona snapshot".into(),
                    false,
                    format!("{name}: {}; set daytona.snapshot (or --daytona-snapshot) to an existing snapshot", h.error.message),
                )),
            },
        }
        checks
    }

    async fn release(&self, sandbox: &str) -> Result<(), ProviderError> {
        // Its session goes with it.
        self.sessions.remove(sandbox);
        let started = Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            match self
                .api(
                    Method::DELETE,
                    &format!("/sandbox/{sandbox}"),
                    None,
                    Idempotent::Yes,
                )
                .await
            {
                Ok(_) => break,
                Err(h) if h.status.map(|s| s.as_u16()) == Some(404) => break,
                Err(h)
                    if h.status.map(|s| s.as_u16()) == Some(409)
                        && started.elapsed() < RELEASE_CONFLICT_WAIT =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(h) => return Err(h.error),
            }
        }
        self.toolbox.remove(sandbox);
        self.ssh.remove(sandbox);
        Ok(())
    }
}
