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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    CreateSpec, ExecExit, ExecOutput, ExecSpec, Provider, ProviderError, ProviderErrorKind,
    SandboxInfo, SandboxState, SshAccessInfo, UploadSpec,
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
}

/// The manifest a synced workdir keeps of itself.
const MANIFEST_FILE: &str = ".crabbox-manifest.json";
/// How long a timed-out upload/extract command may take on the sandbox.
const SYNC_COMMAND_TIMEOUT_SECS: u64 = 600;
/// A cached SSH token is refreshed when it has less than this left.
const SSH_REFRESH_MARGIN: Duration = Duration::from_secs(10 * 60);
/// How long a release waits out 409 (a state change in progress).
const RELEASE_CONFLICT_WAIT: Duration = Duration::from_secs(60);

fn e(kind: ProviderErrorKind, msg: impl Into<String>) -> ProviderError {
    ProviderError::new(kind, msg)
}

fn quote(s: &str) -> String {
    shlex::try_quote(s)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| "''".into())
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
        let reason = || {
            v.get("errorReason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string()
        };
        // Unknown states (new ones appear) count as still coming up.
        let state = match s("state").as_str() {
            "started" => SandboxState::Started,
            "stopped" | "archived" | "paused" => SandboxState::Stopped,
            "error" | "build_failed" => SandboxState::Error(reason()),
            "destroyed" | "destroying" => SandboxState::Destroyed,
            _ => SandboxState::Creating,
        };
        Ok(SandboxInfo {
            id,
            name: s("name"),
            state,
            labels,
        })
    }

    /// The toolbox URL for a sandbox (asked of Daytona when the sandbox did not say).
    async fn toolbox_url(&self, sandbox: &str) -> Result<String, ProviderError> {
        if let Some(u) = self.toolbox.get(sandbox) {
            return Ok(u.clone());
        }
        let v = self
            .call(
                Method::GET,
                &format!("/sandbox/{sandbox}"),
                None,
                Idempotent::Yes,
            )
            .await?;
        let info = self.parse_sandbox(&v)?;
        if let Some(u) = self.toolbox.get(&info.id) {
            let u = u.clone();
            self.toolbox.insert(sandbox.to_string(), u.clone());
            return Ok(u);
        }
        let p = self
            .call(
                Method::GET,
                &format!("/sandbox/{}/toolbox-proxy-url", info.id),
                None,
                Idempotent::Yes,
            )
            .await?;
        let base = p
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| e(ProviderErrorKind::Other, "no toolbox URL for the sandbox"))?;
        let u = format!("{}/{}", base.trim_end_matches('/'), info.id);
        self.toolbox.insert(sandbox.to_string(), u.clone());
        Ok(u)
    }

    async fn toolbox(
        &self,
        sandbox: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idem: Idempotent,
    ) -> Result<Value, ProviderError> {
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        self.client
            .json(method, &format!("{base}{path}"), body, idem)
            .await
            .map_err(|h| h.error)
    }

    /// Runs a short command with `process/execute`; fails unless it exits 0.
    async fn run_checked(
        &self,
        sandbox: &str,
        command: &str,
        what: &str,
    ) -> Result<(), ProviderError> {
        let body = json!({ "command": command, "timeout": SYNC_COMMAND_TIMEOUT_SECS });
        // Sync commands are idempotent by construction (mkdir -p, rm -rf, extracting the
        // same archive), so they may be sent again.
        let v = self
            .toolbox(
                sandbox,
                Method::POST,
                "/process/execute",
                Some(&body),
                Idempotent::Yes,
            )
            .await?;
        let code = v.get("exitCode").and_then(Value::as_i64).unwrap_or(-1);
        if code != 0 {
            let out = v.get("result").and_then(Value::as_str).unwrap_or("");
            return Err(e(
                ProviderErrorKind::Sync,
                format!("{what} failed in the sandbox (exit {code}): {}", out.trim()),
            ));
        }
        Ok(())
    }

    /// Streams a local file to `path` in the sandbox (upload-v2, raw body), retrying a
    /// dropped connection by sending the file again (the upload overwrites).
    async fn put_file(
        &self,
        sandbox: &str,
        local: &std::path::Path,
        path: &str,
    ) -> Result<(), ProviderError> {
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        let url = format!("{base}/files/upload-v2");
        let client = self.client.clone();
        let local = local.to_path_buf();
        let path = path.to_string();
        client
            .send(Idempotent::Yes, || {
                let file = std::fs::File::open(&local).map_err(|err| {
                    e(
                        ProviderErrorKind::Sync,
                        format!("opening {}: {err}", local.display()),
                    )
                })?;
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
                Ok(reqwest::Client::new()
                    .post(&url)
                    .query(&[("path", &path)])
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(reqwest::Body::wrap_stream(stream)))
            })
            .await
            .map(|_| ())
            .map_err(|h| {
                ProviderError::new(
                    ProviderErrorKind::Sync,
                    format!("uploading the sync archive: {}", h.error),
                )
            })
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
        match self
            .api(Method::POST, "/sandbox", Some(&body), Idempotent::No)
            .await
        {
            Ok(v) => self.parse_sandbox(&v),
            // The name exists: ours from an earlier attempt, or someone else's.
            Err(h) if h.status.map(|s| s.as_u16()) == Some(409) => {
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
            // The answer was lost (dropped connection, 5xx): the create may have happened.
            // Never send it again blindly: look for it by its lease label.
            Err(h) if h.status.is_none_or(|s| s.is_server_error()) => {
                match self.find_by_lease(&spec.labels).await? {
                    Some(found) => Ok(found),
                    // Confirmed absent: sending it again cannot make a second sandbox (the
                    // name is unique; a 409 would be answered and adopted as above).
                    None => match self
                        .api(Method::POST, "/sandbox", Some(&body), Idempotent::No)
                        .await
                    {
                        Ok(v) => self.parse_sandbox(&v),
                        Err(h2) if h2.status.is_none_or(|s| s.is_server_error()) => {
                            self.find_by_lease(&spec.labels).await?.ok_or(h2.error)
                        }
                        Err(h2) => Err(h2.error),
                    },
                }
            }
            Err(h) => Err(h.error),
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
        let mut delay = Duration::from_millis(25);
        loop {
            tokio::time::sleep(delay).await;
            let info = self.get(sandbox).await?.ok_or_else(|| {
                e(
                    ProviderErrorKind::Provisioning,
                    format!("sandbox {sandbox} disappeared while starting"),
                )
            })?;
            match &info.state {
                SandboxState::Started => return Ok(info),
                SandboxState::Error(reason) => {
                    return Err(e(
                        ProviderErrorKind::Provisioning,
                        format!("sandbox {sandbox} failed: {reason}"),
                    ));
                }
                SandboxState::Destroyed => {
                    return Err(e(
                        ProviderErrorKind::Provisioning,
                        format!("sandbox {sandbox} was destroyed while starting"),
                    ));
                }
                SandboxState::Stopped => {
                    self.start(&info.id).await?;
                }
                SandboxState::Creating => {}
            }
            if start.elapsed() >= deadline {
                return Err(e(
                    ProviderErrorKind::Provisioning,
                    format!(
                        "sandbox {sandbox} was not started after {}s",
                        deadline.as_secs()
                    ),
                ));
            }
            delay = (delay.mul_f64(1.6)).min(Duration::from_secs(1));
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
        let dir = quote(&spec.workdir);
        let prepare = if spec.clean {
            format!("rm -rf {dir} && mkdir -p {dir}")
        } else {
            format!("mkdir -p {dir}")
        };
        self.run_checked(sandbox, &prepare, "preparing the workdir")
            .await?;
        let tag: u64 = rand::random();
        let mut script = vec![format!("cd {dir}")];
        let mut _keep_alive = None;
        if !spec.remove.is_empty() {
            // The list goes as a file (it can be long), NUL-separated; every path is a plain
            // relative path (checked when the manifest was made).
            let list = tempfile::NamedTempFile::new()
                .map_err(|err| e(ProviderErrorKind::Sync, format!("temp file: {err}")))?;
            let mut bytes = Vec::new();
            for p in &spec.remove {
                if !crate::sandbox::archive::plain_relative(p) {
                    return Err(e(
                        ProviderErrorKind::Sync,
                        format!("refusing to delete {p:?}: not a plain relative path"),
                    ));
                }
                bytes.extend_from_slice(p.as_bytes());
                bytes.push(0);
            }
            std::fs::write(list.path(), bytes)
                .map_err(|err| e(ProviderErrorKind::Sync, format!("temp file: {err}")))?;
            let remote = format!(".crabbox-remove-{tag:x}");
            self.put_file(sandbox, list.path(), &format!("{}/{remote}", spec.workdir))
                .await?;
            script.push(format!("xargs -0 rm -rf -- < {remote}; rm -f {remote}"));
            _keep_alive = Some(list);
        }
        if let Some(archive) = &spec.archive {
            let remote = format!(".crabbox-sync-{tag:x}.tgz");
            self.put_file(sandbox, archive, &format!("{}/{remote}", spec.workdir))
                .await?;
            script.push(format!("tar xzf {remote} && rm -f {remote}"));
        }
        let mut _manifest_file = None;
        if let Some(m) = &spec.manifest {
            let f = tempfile::NamedTempFile::new()
                .map_err(|err| e(ProviderErrorKind::Sync, format!("temp file: {err}")))?;
            std::fs::write(f.path(), m)
                .map_err(|err| e(ProviderErrorKind::Sync, format!("temp file: {err}")))?;
            let path = format!("{}/{}", spec.workdir, MANIFEST_FILE);
            self.put_file(sandbox, f.path(), &path).await?;
            _manifest_file = Some(f);
        }
        if script.len() > 1 {
            self.run_checked(sandbox, &script.join(" && "), "unpacking the sync archive")
                .await?;
        }
        Ok(())
    }

    async fn exec(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        let session: String = format!("crabbox-{:016x}", rand::random::<u64>());
        // Creating a named session is idempotent: a 409 on a retry means it exists.
        match self
            .client
            .json(
                Method::POST,
                &format!("{base}/process/session"),
                Some(&json!({ "sessionId": session })),
                Idempotent::Yes,
            )
            .await
        {
            Ok(_) => {}
            Err(h) if h.status.map(|s| s.as_u16()) == Some(409) => {}
            Err(h) => return Err(h.error),
        }
        let result = self
            .exec_in_session(sandbox, &base, &session, spec, out, cancel)
            .await;
        // The session goes either way (it ends whatever still runs in it).
        let _ = self
            .client
            .json(
                Method::DELETE,
                &format!("{base}/process/session/{session}"),
                None,
                Idempotent::Yes,
            )
            .await;
        result
    }

    async fn ssh_access(
        &self,
        sandbox: &str,
        minutes: u32,
    ) -> Result<SshAccessInfo, ProviderError> {
        if let Some(cached) = self.ssh.get(sandbox) {
            let left = cached.expires_at_ms.saturating_sub(crate::clock::now_ms());
            if Duration::from_millis(left) > SSH_REFRESH_MARGIN {
                return Ok(cached.clone());
            }
        }
        let minutes = if minutes == 0 {
            self.settings.ssh_access_minutes
        } else {
            minutes
        };
        let v = self
            .api(
                Method::POST,
                &format!("/sandbox/{sandbox}/ssh-access?expiresInMinutes={minutes}"),
                None,
                Idempotent::Yes,
            )
            .await
            .map_err(|h| ProviderError::new(ProviderErrorKind::Ssh, h.error.message))?;
        let token = v
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                e(
                    ProviderErrorKind::Ssh,
                    "Daytona's ssh-access answer has no token",
                )
            })?
            .to_string();
        let (host, port, user) = match v
            .get("sshCommand")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
        {
            Some(cmd) => parse_ssh_command(cmd)
                .map_err(|m| e(ProviderErrorKind::Ssh, self.client.redact(&m)))?,
            None => (self.settings.ssh_gateway_host.clone(), 22, token.clone()),
        };
        let expires_at_ms = v
            .get("expiresAt")
            .and_then(Value::as_str)
            .and_then(|t| {
                humantime::parse_rfc3339_weak(
                    t.trim_end_matches('Z').split('.').next().unwrap_or(t),
                )
                .ok()
            })
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or_else(|| crate::clock::now_ms() + u64::from(minutes) * 60_000);
        let access = SshAccessInfo {
            host,
            port,
            user,
            expires_at_ms,
        };
        self.ssh.insert(sandbox.to_string(), access.clone());
        Ok(access)
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

impl DaytonaProvider {
    async fn exec_in_session(
        &self,
        sandbox: &str,
        base: &str,
        session: &str,
        spec: &ExecSpec,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        let mut script = format!("cd {} && ", quote(&spec.cwd));
        for (k, v) in &spec.env {
            script.push_str(&format!("export {k}={}; ", quote(v)));
        }
        script.push_str(&spec.command);
        let exec_url = format!("{base}/process/session/{session}/exec");
        let body = json!({ "command": script, "runAsync": true, "async": true });
        let mut cmd = None;
        for attempt in 0..3 {
            match self
                .client
                .json(Method::POST, &exec_url, Some(&body), Idempotent::No)
                .await
            {
                Ok(v) => {
                    cmd = v
                        .get("cmdId")
                        .and_then(Value::as_str)
                        .filter(|c| !c.is_empty())
                        .map(str::to_string);
                    break;
                }
                // The answer was lost: the command may be running. Never start it twice:
                // look in the (fresh, private) session first.
                Err(h) if attempt < 2 && h.status.is_none_or(|s| s.is_server_error()) => {
                    let v = self
                        .client
                        .json(
                            Method::GET,
                            &format!("{base}/process/session/{session}"),
                            None,
                            Idempotent::Yes,
                        )
                        .await
                        .map_err(|h| h.error)?;
                    let found = v
                        .get("commands")
                        .and_then(Value::as_array)
                        .and_then(|cmds| {
                            cmds.iter()
                                .find(|c| {
                                    c.get("command").and_then(Value::as_str)
                                        == Some(script.as_str())
                                })
                                .and_then(|c| {
                                    c.get("id").and_then(Value::as_str).map(str::to_string)
                                })
                        });
                    if found.is_some() {
                        cmd = found;
                        break;
                    }
                }
                Err(h) => return Err(h.error),
            }
        }
        let cmd = cmd.ok_or_else(|| {
            e(
                ProviderErrorKind::Other,
                "Daytona's exec answer has no cmdId",
            )
        })?;
        let ws_url = format!("{base}/process/session/{session}/command/{cmd}/logs?follow=true")
            .replacen("http", "ws", 1);
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                ws_url.as_str(),
            )
            .map_err(|err| e(ProviderErrorKind::Other, format!("log stream URL: {err}")))?;
        {
            let h = request.headers_mut();
            let creds = self
                .client
                .authorize(reqwest::Client::new().get("http://x"))?
                .build()
                .map_err(|err| e(ProviderErrorKind::Other, err.to_string()))?;
            for (k, v) in creds.headers() {
                h.insert(k.clone(), v.clone());
            }
        }
        // The handshake is a GET: a 5xx, a 429 or a dropped connection is tried again.
        let mut attempt = 0u32;
        let mut ws = loop {
            attempt += 1;
            match tokio_tungstenite::connect_async(request.clone()).await {
                Ok((ws, _)) => break ws,
                Err(err) => {
                    use tokio_tungstenite::tungstenite::Error as WsError;
                    let transient = match &err {
                        WsError::Http(resp) => {
                            resp.status().is_server_error() || resp.status().as_u16() == 429
                        }
                        WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed => true,
                        _ => false,
                    };
                    if !transient || attempt >= 6 {
                        return Err(e(
                            ProviderErrorKind::Unavailable,
                            self.client
                                .redact(&format!("opening the command's log stream: {err}")),
                        ));
                    }
                    tokio::time::sleep(client::backoff(self.client.retry, attempt)).await;
                }
            }
        };
        let mut demux = demux::Demux::default();
        let timeout = async {
            match spec.timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        let mut activity = tokio::time::interval(Duration::from_secs(60));
        let (mut cancelled, mut timed_out) = (false, false);
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                        for o in demux.push(&b) { let _ = out.send(o).await; }
                    }
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                        for o in demux.push(t.as_bytes()) { let _ = out.send(o).await; }
                    }
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        return Err(e(ProviderErrorKind::Unavailable, format!("the command's log stream broke: {err}")));
                    }
                },
                () = cancel.cancelled() => { cancelled = true; break; }
                () = &mut timeout => { timed_out = true; break; }
                _ = activity.tick() => {
                    let _ = self.api(Method::POST, &format!("/sandbox/{sandbox}/last-activity"), None, Idempotent::Yes).await;
                }
            }
        }
        for o in demux.finish() {
            let _ = out.send(o).await;
        }
        if cancelled || timed_out {
            let _ = ws.close(None).await;
            // Deleting the session (done by the caller) ends the command.
            return Ok(ExecExit {
                code: if timed_out {
                    crate::sandbox::process::TIMEOUT_EXIT_CODE
                } else {
                    130
                },
                signal: None,
                timed_out,
                cancelled,
            });
        }
        // The stream closed at exit; the code may lag a moment behind.
        let url = format!("{base}/process/session/{session}/command/{cmd}");
        for _ in 0..100 {
            let v = self
                .client
                .json(Method::GET, &url, None, Idempotent::Yes)
                .await
                .map_err(|h| h.error)?;
            if let Some(code) = v.get("exitCode").and_then(Value::as_i64) {
                return Ok(ExecExit {
                    code: code as i32,
                    signal: None,
                    timed_out: false,
                    cancelled: false,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(e(
            ProviderErrorKind::Other,
            "the command's log stream ended but Daytona reports no exit code",
        ))
    }
}

/// How long an environment's image may take to build.
const SNAPSHOT_BUILD_DEADLINE: Duration = Duration::from_secs(600);

impl DaytonaProvider {
    /// The snapshot name for an environment: a hash of the Dockerfile and resources, keyed
    /// by the account (so the name reveals nothing, and accounts do not share names).
    fn snapshot_name(&self, dockerfile: &str, options: &BTreeMap<String, String>) -> String {
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
    async fn ensure_snapshot(
        &self,
        dockerfile: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<String, ProviderError> {
        let name = self.snapshot_name(dockerfile, options);
        let started = Instant::now();
        let mut creates = 0;
        loop {
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
                    let state = v.get("state").and_then(Value::as_str).unwrap_or("unknown");
                    match state {
                        "active" => return Ok(name),
                        "error" | "build_failed" => {
                            let reason = v
                                .get("errorReason")
                                .and_then(Value::as_str)
                                .unwrap_or("no reason given");
                            return Err(e(
                                ProviderErrorKind::Provisioning,
                                format!(
                                    "building the environment's image (snapshot {name}) failed: {reason}"
                                ),
                            ));
                        }
                        _ => {
                            tracing::info!(snapshot = %name, state, "waiting for the environment's image")
                        }
                    }
                }
                Err(h) if h.status.map(|s| s.as_u16()) == Some(404) && creates < 3 => {
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
                Err(h) => return Err(h.error),
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
}

/// Parses Daytona's `sshCommand`: `ssh [-p N | -pN] user@host`. Any other option is refused
/// (it would be run on the user's machine).
pub fn parse_ssh_command(cmd: &str) -> Result<(String, u16, String), String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    if words.first() != Some(&"ssh") {
        return Err(format!("unexpected sshCommand from Daytona: {cmd}"));
    }
    let mut port = 22u16;
    let mut target = None;
    let mut i = 1;
    while i < words.len() {
        let w = words[i];
        if w == "-p" {
            let n = words.get(i + 1).ok_or("sshCommand has -p without a port")?;
            port = n
                .parse()
                .map_err(|_| format!("bad port {n:?} in sshCommand"))?;
            i += 2;
            continue;
        }
        if let Some(n) = w.strip_prefix("-p") {
            port = n
                .parse()
                .map_err(|_| format!("bad port {n:?} in sshCommand"))?;
        } else if w.starts_with('-') {
            return Err(format!(
                "refusing sshCommand option {w:?}: only -p is accepted"
            ));
        } else if target.is_none() {
            target = Some(w);
        } else {
            return Err("sshCommand has more than one target".into());
        }
        i += 1;
    }
    let (user, host) = target
        .and_then(|t| t.rsplit_once('@'))
        .ok_or("sshCommand has no user@host")?;
    if user.is_empty() || host.is_empty() {
        return Err("sshCommand has an empty user or host".into());
    }
    Ok((host.to_string(), port, user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_commands() {
        assert_eq!(
            parse_ssh_command("ssh tok@ssh.app.daytona.io"),
            Ok(("ssh.app.daytona.io".into(), 22, "tok".into()))
        );
        assert_eq!(
            parse_ssh_command("ssh -p 2222 tok@h"),
            Ok(("h".into(), 2222, "tok".into()))
        );
        assert_eq!(
            parse_ssh_command("ssh -p2222 tok@h"),
            Ok(("h".into(), 2222, "tok".into()))
        );
        for bad in [
            "ssh -o ProxyCommand=evil tok@h",
            "scp tok@h",
            "ssh -p x tok@h",
            "ssh h",
            "ssh a@h b@h",
            "ssh -p",
        ] {
            assert!(parse_ssh_command(bad).is_err(), "{bad}");
        }
    }
}
