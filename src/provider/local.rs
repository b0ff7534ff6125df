//! The `local` provider, the embedded default: a sandbox is a folder under the state dir
//! (see [`crate::sandbox`]), commands run through `/bin/sh` in their own process group.
//! It needs no account and no network. Its sandboxes isolate files, not processes: a
//! command can see the rest of this machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    CreateSpec, DIGEST_FILE, ExecExit, ExecOutput, ExecSpec, Input, Provider, ProviderError,
    ProviderErrorKind, SandboxInfo, SandboxState, SshAccessInfo, UploadSpec,
};
use crate::sandbox::{self, Engine, EngineError, EngineState, SandboxMeta};

/// The `local` provider.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    engine: Engine,
}

impl LocalProvider {
    /// Sandboxes live under `root` (the daemon uses `<state dir>/sandboxes`).
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalProvider, ProviderError> {
        let engine = Engine::open(root).map_err(engine_err)?;
        Ok(LocalProvider { engine })
    }

    /// The folder of a sandbox's files, for people who want to look.
    pub fn home(&self, sandbox: &str) -> PathBuf {
        self.engine.home(sandbox)
    }

    /// A path the caller gave must stay inside the sandbox's folder.
    fn inside(&self, sandbox: &str, path: &str) -> Result<PathBuf, ProviderError> {
        let dir = self.engine.dir(sandbox);
        let p = Path::new(path);
        let ok = p.is_absolute()
            && p.starts_with(&dir)
            && !p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        if !ok {
            return Err(ProviderError::new(
                ProviderErrorKind::Invalid,
                format!("path {path} is outside sandbox {sandbox}"),
            ));
        }
        Ok(p.to_path_buf())
    }

    fn meta(&self, sandbox: &str) -> Result<SandboxMeta, ProviderError> {
        self.engine.get(sandbox).map_err(engine_err)
    }
}

fn engine_err(e: EngineError) -> ProviderError {
    let kind = match &e {
        EngineError::NotFound(_) => ProviderErrorKind::NotFound,
        EngineError::NameTaken(_) | EngineError::Invalid(_) => ProviderErrorKind::Invalid,
        EngineError::Io { .. } => ProviderErrorKind::Other,
    };
    ProviderError::new(kind, format!("local provider: {e}"))
}

fn info(meta: SandboxMeta) -> SandboxInfo {
    let state = match meta.state {
        EngineState::Creating => SandboxState::Creating,
        EngineState::Started => SandboxState::Started,
        EngineState::Stopped => SandboxState::Stopped,
        EngineState::Error => {
            SandboxState::Error(meta.error_reason.unwrap_or_else(|| "unknown error".into()))
        }
    };
    SandboxInfo {
        id: meta.id,
        name: meta.name,
        state,
        labels: meta.labels,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ProviderError::new(
            ProviderErrorKind::Other,
            format!("local provider task: {e}"),
        )
    })?
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        "local"
    }

    fn work_root(&self, sandbox_name: &str) -> String {
        // Local sandboxes use their name as id, so the path is known before creation.
        self.engine
            .home(sandbox_name)
            .join("crabbox")
            .to_string_lossy()
            .into_owned()
    }

    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        let meta = self
            .engine
            .create(
                &spec.name,
                &spec.name,
                spec.labels.clone(),
                BTreeMap::new(),
                EngineState::Started,
            )
            .map_err(engine_err)?;
        Ok(info(meta))
    }

    async fn get(&self, sandbox: &str) -> Result<Option<SandboxInfo>, ProviderError> {
        Ok(self.engine.find(sandbox).map_err(engine_err)?.map(info))
    }

    async fn wait_ready(
        &self,
        sandbox: &str,
        _deadline: Duration,
    ) -> Result<SandboxInfo, ProviderError> {
        // Local sandboxes are started as soon as they exist.
        let i = info(self.meta(sandbox)?);
        match &i.state {
            SandboxState::Started => Ok(i),
            SandboxState::Error(reason) => Err(ProviderError::new(
                ProviderErrorKind::Provisioning,
                format!("sandbox {sandbox} is in error: {reason}"),
            )),
            other => Err(ProviderError::new(
                ProviderErrorKind::Provisioning,
                format!("sandbox {sandbox} is {other:?}, not started"),
            )),
        }
    }

    async fn start(&self, sandbox: &str) -> Result<SandboxInfo, ProviderError> {
        let meta = self
            .engine
            .update(sandbox, |m| m.state = EngineState::Started)
            .map_err(engine_err)?;
        Ok(info(meta))
    }

    async fn stop(&self, sandbox: &str) -> Result<(), ProviderError> {
        // Nothing runs in a local sandbox between commands (a run is refused a pause): the
        // folder stays, and commands are refused until it is started again.
        self.engine
            .update(sandbox, |m| m.state = EngineState::Stopped)
            .map_err(engine_err)?;
        Ok(())
    }

    async fn set_labels(
        &self,
        sandbox: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let labels = labels.clone();
        self.engine
            .update(sandbox, |m| m.labels = labels)
            .map_err(engine_err)?;
        Ok(())
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxInfo>, ProviderError> {
        let all = self.engine.list().map_err(engine_err)?;
        Ok(all
            .into_iter()
            .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(v)))
            .map(info)
            .collect())
    }

    async fn upload(&self, sandbox: &str, spec: &UploadSpec) -> Result<(), ProviderError> {
        self.meta(sandbox)?;
        let workdir = self.inside(sandbox, &spec.workdir)?;
        let spec = spec.clone();
        blocking(move || {
            let sync_err = |what: &str, e: std::io::Error| {
                ProviderError::new(
                    ProviderErrorKind::Sync,
                    format!("{what} in {}: {e}", workdir.display()),
                )
            };
            if spec.clean {
                sandbox::archive::remove_tree(&workdir)
                    .map_err(|e| sync_err("emptying the workdir", e))?;
            }
            std::fs::create_dir_all(&workdir).map_err(|e| sync_err("creating the workdir", e))?;
            match std::fs::remove_file(workdir.join(DIGEST_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(sync_err("removing the old digest", e));
                }
                _ => {}
            }
            sandbox::archive::remove_paths(&workdir, &spec.remove)
                .map_err(|e| sync_err("removing old files", e))?;
            if let Some(archive) = &spec.archive {
                sandbox::archive::unpack(archive, &workdir)
                    .map_err(|e| sync_err("unpacking the archive", e))?;
            }
            if !spec.deltas.is_empty() {
                sandbox::archive::apply_deltas(&workdir, &spec.deltas)
                    .map_err(|e| sync_err("putting changed files together", e))?;
                let dirs: std::collections::BTreeSet<String> = spec
                    .deltas
                    .iter()
                    .filter_map(|d| d.literal.split_once('/').map(|(dir, _)| dir.to_string()))
                    .collect();
                sandbox::archive::remove_paths(&workdir, &dirs.into_iter().collect::<Vec<_>>())
                    .map_err(|e| sync_err("removing the changes' folder", e))?;
            }
            std::fs::write(workdir.join(DIGEST_FILE), &spec.digest)
                .map_err(|e| sync_err("writing the digest", e))?;
            Ok(())
        })
        .await
    }

    async fn synced_digest(
        &self,
        sandbox: &str,
        workdir: &str,
    ) -> Result<Option<String>, ProviderError> {
        let path = self.inside(sandbox, workdir)?.join(DIGEST_FILE);
        Ok(std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string()))
    }

    async fn exec(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        self.run_in(sandbox, spec, input, out, cancel).await
    }

    async fn read_file(
        &self,
        sandbox: &str,
        path: &str,
        out: mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, ProviderError> {
        use tokio::io::AsyncReadExt;
        let p = self.inside(sandbox, path)?;
        let mut f = tokio::fs::File::open(&p).await.map_err(|e| {
            ProviderError::new(
                if e.kind() == std::io::ErrorKind::NotFound {
                    ProviderErrorKind::NotFound
                } else {
                    ProviderErrorKind::Other
                },
                format!("reading {path}: {e}"),
            )
        })?;
        let mut total = 0u64;
        loop {
            let mut buf = Vec::with_capacity(256 * 1024);
            let n = (&mut f)
                .take(256 * 1024)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| {
                    ProviderError::new(ProviderErrorKind::Other, format!("reading {path}: {e}"))
                })?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            if out.send(buf).await.is_err() {
                return Err(ProviderError::new(
                    ProviderErrorKind::Other,
                    "the reader of the file went away",
                ));
            }
        }
    }

    async fn write_file(
        &self,
        sandbox: &str,
        path: &str,
        local: &Path,
    ) -> Result<(), ProviderError> {
        let p = self.inside(sandbox, path)?;
        let io = |e: std::io::Error| {
            ProviderError::new(ProviderErrorKind::Other, format!("writing {path}: {e}"))
        };
        if let Some(dir) = p.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        tokio::fs::copy(local, &p).await.map_err(io)?;
        Ok(())
    }

    async fn preview(
        &self,
        sandbox: &str,
        port: u16,
        _signed: Option<Duration>,
    ) -> Result<super::Preview, ProviderError> {
        // Local sandboxes share this machine's network: the port is on loopback, and
        // needs no token (signed or not).
        self.meta(sandbox)?;
        Ok(super::Preview {
            url: format!("http://127.0.0.1:{port}"),
            ..Default::default()
        })
    }

    async fn ssh_access(
        &self,
        sandbox: &str,
        _minutes: u32,
    ) -> Result<SshAccessInfo, ProviderError> {
        Err(ProviderError::new(
            ProviderErrorKind::Ssh,
            format!(
                "ssh is not supported by the local provider: its sandboxes are folders on this \
                 machine (cd {}), or use --provider daytona",
                self.engine.home(sandbox).display()
            ),
        ))
    }

    async fn release(&self, sandbox: &str) -> Result<(), ProviderError> {
        let engine = self.engine.clone();
        let sandbox = sandbox.to_string();
        blocking(move || engine.delete(&sandbox).map_err(engine_err)).await
    }
}

impl LocalProvider {
    /// Runs a command in the sandbox's folder, its stdin fed from `input` when given.
    async fn run_in(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        let meta = self.meta(sandbox)?;
        if meta.state != EngineState::Started {
            return Err(ProviderError::new(
                ProviderErrorKind::Provisioning,
                format!("sandbox {sandbox} is not started"),
            ));
        }
        let cwd = self.inside(sandbox, &spec.cwd)?;
        std::fs::create_dir_all(&cwd).map_err(|e| {
            ProviderError::new(
                ProviderErrorKind::Other,
                format!("creating {}: {e}", cwd.display()),
            )
        })?;
        let process = sandbox::ProcessSpec {
            command: spec.command.clone(),
            cwd,
            env: spec.env.clone(),
            timeout: spec.timeout,
            jail: None,
            tty: spec.tty,
        };
        sandbox::process::run(&process, input, out, cancel)
            .await
            .map_err(|e| {
                ProviderError::new(
                    ProviderErrorKind::Other,
                    format!("starting the command in sandbox {sandbox}: {e}"),
                )
            })
    }
}
