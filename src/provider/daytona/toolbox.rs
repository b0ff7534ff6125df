//! The toolbox side of the provider: the sandbox's toolbox URL, short checked commands,
//! streamed uploads, and putting a sync into the sandbox.

use reqwest::Method;
use serde_json::{Value, json};

use super::client::Idempotent;
use super::{DaytonaProvider, SYNC_COMMAND_TIMEOUT_SECS, e, quote};
use crate::provider::{DIGEST_FILE, FileDelta, ProviderError, ProviderErrorKind, UploadSpec};

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

    /// Runs a command with `process/execute` in `cwd`: one request, its exit code and
    /// output. Not re-sent after a lost answer (the command may have run).
    pub(super) async fn execute_once(
        &self,
        sandbox: &str,
        command: &str,
        cwd: &str,
        timeout: std::time::Duration,
    ) -> Result<crate::provider::Executed, ProviderError> {
        let command = format!("mkdir -p -- {q} && cd -- {q} && {command}", q = quote(cwd));
        let body = json!({ "command": command, "timeout": timeout.as_secs().max(1) });
        let v = self
            .toolbox(
                sandbox,
                Method::POST,
                "/process/execute",
                Some(&body),
                Idempotent::No,
            )
            .await?;
        Ok(crate::provider::Executed {
            code: v.get("exitCode").and_then(Value::as_i64).unwrap_or(-1) as i32,
            output: v
                .get("result")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }

    /// Streams the file at `path` in the sandbox (`files/download`) into `out`.
    pub(super) async fn download_file(
        &self,
        sandbox: &str,
        path: &str,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, ProviderError> {
        use futures_util::StreamExt;
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        let url = format!("{base}/files/download");
        let headers = self.client.auth_headers()?;
        let answer = self
            .client
            .request(Method::GET, &url)
            .query(&[("path", path)])
            .headers(headers)
            .send()
            .await
            .map_err(|err| {
                e(
                    ProviderErrorKind::Unavailable,
                    self.client.redact(&format!("downloading {path}: {err}")),
                )
            })?;
        let status = answer.status();
        if !status.is_success() {
            let kind = if status.as_u16() == 404 {
                ProviderErrorKind::NotFound
            } else {
                ProviderErrorKind::Other
            };
            let text = answer.text().await.unwrap_or_default();
            return Err(e(
                kind,
                self.client
                    .redact(&format!("downloading {path}: {status} {}", text.trim())),
            ));
        }
        let mut body = answer.bytes_stream();
        let mut total = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|err| {
                e(
                    ProviderErrorKind::Unavailable,
                    format!("downloading {path}: the connection dropped: {err}"),
                )
            })?;
            total += chunk.len() as u64;
            if out.send(chunk.to_vec()).await.is_err() {
                return Err(e(
                    ProviderErrorKind::Other,
                    "the reader of the download went away",
                ));
            }
        }
        Ok(total)
    }

    /// Streams a local file to `path` in the sandbox (upload-v2, raw body), retrying a
    /// dropped connection by sending the file again (the upload overwrites).
    pub(super) async fn put_file(
        &self,
        sandbox: &str,
        local: &std::path::Path,
        path: &str,
    ) -> Result<(), ProviderError> {
        self.put_file_counted(sandbox, local, path, &crate::sync::Sent::default())
            .await
    }

    /// [`Self::put_file`], counting in `sent` the bytes handed to the connection (from 0
    /// again when the upload is retried).
    pub(super) async fn put_file_counted(
        &self,
        sandbox: &str,
        local: &std::path::Path,
        path: &str,
        sent: &crate::sync::Sent,
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
                sent.reset();
                let counter = sent.clone();
                let stream = futures_util::StreamExt::inspect(
                    tokio_util::io::ReaderStream::with_capacity(
                        tokio::fs::File::from_std(file),
                        256 * 1024,
                    ),
                    move |chunk| {
                        if let Ok(bytes) = chunk {
                            counter.add(bytes.len() as u64);
                        }
                    },
                );
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
                    format!("uploading {path}: {}", h.error),
                )
            })
    }

    /// Puts a sync into the sandbox with one upload (the archive, streamed to `/tmp`) and
    /// one command that does the rest: prepare the workdir, drop the digest, delete what
    /// went (the list travels in the command itself, unless it is very long), unpack, write
    /// the new digest. Each destructive step is guarded by the archive's presence and the
    /// archive is removed when unpacked, so a repeat after a lost answer does no harm.
    pub(super) async fn upload_checkout(
        &self,
        sandbox: &str,
        spec: &UploadSpec,
    ) -> Result<(), ProviderError> {
        let dir = quote(&spec.workdir);
        let tag: u64 = rand::random();
        let mut script = vec![if spec.clean {
            format!("rm -rf {dir} && mkdir -p {dir}")
        } else {
            format!("mkdir -p {dir}")
        }];
        script.push(format!("cd {dir}"));
        script.push(format!("rm -f {DIGEST_FILE}"));
        // The removal list, NUL-separated; every path is a plain relative path (checked
        // when the manifest was made, and again here).
        let mut list = Vec::new();
        for p in &spec.remove {
            if !crate::sandbox::archive::plain_relative(p) {
                return Err(e(
                    ProviderErrorKind::Sync,
                    format!("refusing to delete {p:?}: not a plain relative path"),
                ));
            }
            list.extend_from_slice(p.as_bytes());
            list.push(0);
        }
        let mut _list_file = None;
        let removal = if list.is_empty() {
            None
        } else if list.len() <= INLINE_REMOVALS {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&list);
            Some(format!("printf %s {b64} | base64 -d | xargs -0 rm -rf --"))
        } else {
            // Too long for a command line: a file of its own (one more upload).
            let f = tempfile::NamedTempFile::new()
                .map_err(|err| e(ProviderErrorKind::Sync, format!("temp file: {err}")))?;
            std::fs::write(f.path(), &list)
                .map_err(|err| e(ProviderErrorKind::Sync, format!("temp file: {err}")))?;
            let remote = format!("/tmp/.crabbox-remove-{tag:x}");
            self.put_file(sandbox, f.path(), &remote).await?;
            _list_file = Some(f);
            Some(format!(
                "if [ -e {remote} ]; then xargs -0 rm -rf -- < {remote}; rm -f {remote}; fi"
            ))
        };
        match &spec.archive {
            Some(archive) => {
                let remote = format!("/tmp/.crabbox-sync-{tag:x}.tgz");
                self.put_file_counted(sandbox, archive, &remote, &spec.sent)
                    .await?;
                // Changed files are in the removal list too (a stale symlink is never
                // written through): the removal only runs while the archive is there to
                // put them back.
                let mut step = format!("if [ -e {remote} ]; then ");
                if let Some(r) = &removal {
                    step.push_str(&format!("{r} && "));
                }
                step.push_str(&format!("tar xzf {remote} && "));
                let deltas = delta_folder(&spec.deltas)?;
                if let Some(dir) = &deltas {
                    // Every changed large file is put together beside its old version
                    // before the archive goes: a repeat until then starts over from the
                    // old files.
                    step.push_str(&format!("{} && ", build_deltas(dir)));
                }
                step.push_str(&format!("rm -f {remote}; fi"));
                script.push(step);
                if let Some(dir) = &deltas {
                    // Then moved into place; a repeat finishes what is left to move.
                    script.push(finish_deltas(dir));
                }
            }
            None => script.extend(removal),
        }
        script.push(format!("printf %s {} > {DIGEST_FILE}", quote(&spec.digest)));
        self.run_checked(sandbox, &script.join(" && "), "putting the sync in place")
            .await
    }

    /// The digest a synced workdir keeps (`None` when it has none).
    pub(super) async fn read_digest(
        &self,
        sandbox: &str,
        workdir: &str,
    ) -> Result<Option<String>, ProviderError> {
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        let url = format!("{base}/files/download");
        let path = format!("{workdir}/{DIGEST_FILE}");
        let client = self.client.clone();
        match client
            .send(Idempotent::Yes, || {
                Ok(client.request(Method::GET, &url).query(&[("path", &path)]))
            })
            .await
        {
            Ok(body) => Ok(Some(String::from_utf8_lossy(&body).trim().to_string())),
            Err(h) if h.status.map(|s| s.as_u16()) == Some(404) => Ok(None),
            Err(h) => Err(h.error),
        }
    }
}

/// The one folder the deltas' files arrive in (workdir-relative, quoted), if any.
fn delta_folder(deltas: &[FileDelta]) -> Result<Option<String>, ProviderError> {
    let mut dirs = deltas
        .iter()
        .map(|d| d.literal.split_once('/').map(|(dir, _)| dir));
    let Some(first) = dirs.next() else {
        return Ok(None);
    };
    match first {
        Some(dir) if crate::sandbox::archive::plain_relative(dir) && dirs.all(|d| d == first) => {
            Ok(Some(quote(dir)))
        }
        _ => Err(e(
            ProviderErrorKind::Sync,
            "the sync's deltas are not in one folder of the workdir",
        )),
    }
}

/// Puts each delta together from its recipe ([`FileDelta::recipe`]) as `<literal>.new`,
/// with nothing but a POSIX shell, `tail -c` and `head -c`; checks its length; sets its mode
/// and mtime.
fn build_deltas(dir: &str) -> String {
    format!(
        "( for r in {dir}/*.ops; do i=${{r%.ops}}; p=$(cat \"$i.path\"); p=${{p%x}}; \
         {{ read -r size mode mtime; while read -r s off len; do \
         if [ \"$s\" = o ]; then f=$p; else f=$i; fi; \
         tail -c +$((off + 1)) -- \"$f\" | head -c \"$len\" || exit 1; done; }} \
         < \"$r\" > \"$i.new\" || exit 1; \
         read -r size mode mtime < \"$r\"; \
         [ \"$(wc -c < \"$i.new\")\" -eq \"$size\" ] || {{ echo \"$p: rebuilt with the wrong length\" >&2; exit 1; }}; \
         chmod \"$mode\" \"$i.new\" && {{ touch -m -d \"@$mtime\" \"$i.new\" 2>/dev/null || :; }} || exit 1; \
         done )"
    )
}

/// Moves every delta built by [`build_deltas`] into place, then drops their folder.
fn finish_deltas(dir: &str) -> String {
    format!(
        "( for n in {dir}/*.new; do [ -e \"$n\" ] || continue; i=${{n%.new}}; \
         p=$(cat \"$i.path\"); p=${{p%x}}; mv -f -- \"$n\" \"$p\" || exit 1; done ) \
         && rm -rf {dir}"
    )
}

/// Removal lists up to this many bytes travel inside the command (as base64).
const INLINE_REMOVALS: usize = 96 * 1024;
