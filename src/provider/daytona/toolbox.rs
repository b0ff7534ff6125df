//! The toolbox side of the provider: the sandbox's toolbox URL, short checked commands,
//! streamed uploads, and putting a sync into the sandbox.

use reqwest::Method;
use serde_json::{Value, json};

use super::client::Idempotent;
use super::{DaytonaProvider, MANIFEST_FILE, SYNC_COMMAND_TIMEOUT_SECS, e, quote};
use crate::provider::{ProviderError, ProviderErrorKind, UploadSpec};

impl DaytonaProvider {
    /// The toolbox URL for a sandbox (asked of Daytona when the sandbox did not say).
    pub(super) async fn toolbox_url(&self, sandbox: &str) -> Result<String, ProviderError> {
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

    pub(super) async fn toolbox(
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
    pub(super) async fn run_checked(
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
    pub(super) async fn put_file(
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
                Ok(client
                    .request(Method::POST, &url)
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

    /// Puts a sync into the sandbox: prepare the workdir, stream the removal list and the
    /// archive to `upload-v2`, unpack with one command, keep the manifest beside it.
    pub(super) async fn upload_checkout(
        &self,
        sandbox: &str,
        spec: &UploadSpec,
    ) -> Result<(), ProviderError> {
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
            // Each step is guarded by its own input file, which it removes when done: a
            // repeat after a lost answer skips what already happened.
            script.push(format!(
                "if [ -e {remote} ]; then xargs -0 rm -rf -- < {remote}; rm -f {remote}; fi"
            ));
            _keep_alive = Some(list);
        }
        if let Some(archive) = &spec.archive {
            let remote = format!(".crabbox-sync-{tag:x}.tgz");
            self.put_file(sandbox, archive, &format!("{}/{remote}", spec.workdir))
                .await?;
            script.push(format!(
                "if [ -e {remote} ]; then tar xzf {remote} && rm -f {remote}; fi"
            ));
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
}
