//! The `local` provider, the embedded default: a sandbox is a folder under the state dir
//! (see [`crate::sandbox`]), commands run through `/bin/sh` in their own process group,
//! jailed by bubblewrap ([`crate::sandbox::jail::Jail::Local`]): a PID namespace of
//! their own, the sandbox folder and its own `/tmp` writable, the user's home and the
//! daemon's folders hidden, the rest read-only. It is a namespace jail, not a VM.
//! Config `local.isolation: none` (or `CRABBOX_LOCAL_ISOLATION=none`, read by the daemon)
//! runs commands unjailed; `local.mounts` shows host folders inside the jail.

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

/// How local commands are isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In a bubblewrap jail, with `hide` folders empty inside it and `mounts` (host
    /// path, writable) shown at their own path.
    Jail {
        hide: Vec<PathBuf>,
        mounts: Vec<(PathBuf, bool)>,
    },
    /// Unjailed: the command sees and can touch all that the user can.
    None,
}

impl Isolation {
    /// The daemon's choice: `CRABBOX_LOCAL_ISOLATION`, else config `local.isolation`
    /// (`jail`, the default, or `none`); the jail hides the user's home, the state dir
    /// and the daemon's runtime folder, and shows `local.mounts`.
    pub fn resolve(
        state_dir: &Path,
        config: &crate::config::LocalConfig,
    ) -> Result<Isolation, ProviderError> {
        let env = std::env::var("CRABBOX_LOCAL_ISOLATION")
            .ok()
            .filter(|v| !v.is_empty());
        let (mode, from) = match (&env, &config.isolation) {
            (Some(v), _) => (v.as_str(), "CRABBOX_LOCAL_ISOLATION"),
            (None, Some(v)) => (v.as_str(), "config local.isolation"),
            (None, None) => ("jail", ""),
        };
        let invalid = |m: String| ProviderError::new(ProviderErrorKind::Invalid, m);
        match mode {
            "jail" => {
                let mut hide = vec![state_dir.to_path_buf()];
                if let Some(home) = std::env::var_os("HOME") {
                    hide.insert(0, PathBuf::from(home));
                }
                if let Some(rt) = std::env::var_os("XDG_RUNTIME_DIR") {
                    hide.push(PathBuf::from(rt));
                }
                let mut mounts = Vec::new();
                for m in &config.mounts {
                    let (path, rw) = match m.strip_suffix(":rw") {
                        Some(p) => (p, true),
                        None => (m.strip_suffix(":ro").unwrap_or(m), false),
                    };
                    let p = Path::new(path);
                    if !p.is_absolute() || !p.exists() {
                        return Err(invalid(format!(
                            "config local.mounts: {m} must be an absolute path that exists \
                             (PATH for read-only, PATH:rw for writable)"
                        )));
                    }
                    mounts.push((p.to_path_buf(), rw));
                }
                Ok(Isolation::Jail { hide, mounts })
            }
            "none" => {
                if !config.mounts.is_empty() {
                    return Err(invalid(
                        "config local.mounts needs the jail, which local.isolation: none turns \
                         off: drop one of them"
                            .into(),
                    ));
                }
                Ok(Isolation::None)
            }
            other => Err(invalid(format!(
                "{from}={other} is not jail or none: jail (the default) runs local commands \
                 in a bubblewrap jail, none runs them unjailed"
            ))),
        }
    }
}

/// The `local` provider.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    engine: Engine,
    isolation: Isolation,
    /// Processes a sandbox's commands may have at once (where cgroups can be made).
    max_processes: u64,
    /// Each sandbox's cgroup, made at its first command, removed with it.
    cgroups: std::sync::Arc<dashmap::DashMap<String, std::sync::Arc<sandbox::cgroup::Cgroup>>>,
    /// Each sandbox's agent, which starts its commands inside its jail and cgroup
    /// ([`sandbox::agent`]): started at its first command (again if it ended or the jail
    /// it was started in changed), ended at its release.
    agents: std::sync::Arc<dashmap::DashMap<String, RunningAgent>>,
}

/// An agent and the jail it was started in.
#[derive(Debug, Clone)]
struct RunningAgent {
    agent: std::sync::Arc<sandbox::agent::Agent>,
    jail: Option<sandbox::jail::Jail>,
    cgroup_procs: Vec<PathBuf>,
}

impl LocalProvider {
    /// Sandboxes live under `root` (the daemon uses `<state dir>/sandboxes`); commands
    /// are jailed, hiding the user's home and `root`'s parent.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalProvider, ProviderError> {
        LocalProvider::open_with(root, &crate::config::LocalConfig::default())
    }

    /// As [`LocalProvider::open`], with config `local:`.
    pub fn open_with(
        root: impl Into<PathBuf>,
        config: &crate::config::LocalConfig,
    ) -> Result<LocalProvider, ProviderError> {
        let root = root.into();
        let state = root
            .parent()
            .map_or_else(|| root.clone(), Path::to_path_buf);
        let isolation = Isolation::resolve(&state, config)?;
        let max_processes = match config.max_processes {
            Some(0) => {
                return Err(ProviderError::new(
                    ProviderErrorKind::Invalid,
                    "config local.max_processes: 0 would let no command start: give a number \
                     of processes (4096 by default)",
                ));
            }
            Some(n) => n,
            None => 4096,
        };
        let engine = Engine::open(root).map_err(engine_err)?;
        Ok(LocalProvider {
            engine,
            isolation,
            max_processes,
            cgroups: Default::default(),
            agents: Default::default(),
        })
    }

    /// How its commands are isolated.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
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
        // environment.network: allow_all (the default) and block work here; an allow
        // list needs a filtering network stack this provider does not have.
        let block = spec
            .options
            .get("network_block_all")
            .is_some_and(|v| v == "true");
        if spec.options.contains_key("network_allow_list") {
            return Err(ProviderError::new(
                ProviderErrorKind::Invalid,
                "environment.network.mode: cidr_allow_list is not available on the local \
                 provider (it would need a filtering user-mode network stack): use allow_all or \
                 block locally, or the daytona provider for an allow list",
            ));
        }
        if block && self.isolation == Isolation::None {
            return Err(ProviderError::new(
                ProviderErrorKind::Invalid,
                "environment.network.mode: block needs the local jail, which \
                 CRABBOX_LOCAL_ISOLATION=none turns off",
            ));
        }
        let mut meta = self
            .engine
            .create(
                &spec.name,
                &spec.name,
                spec.labels.clone(),
                BTreeMap::new(),
                EngineState::Started,
            )
            .map_err(engine_err)?;
        let memory_gb = spec
            .options
            .get("memory")
            .and_then(|v| v.parse::<u64>().ok());
        let cpus = spec
            .options
            .get("cpu")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&c| c > 0);
        if block || memory_gb.is_some() || cpus.is_some() {
            meta.network_block = block;
            meta.memory_gb = memory_gb;
            meta.cpus = cpus;
            self.engine.save(&meta).map_err(engine_err)?;
        }
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
                sandbox::archive::unpack_counted(archive, &workdir, spec.sent.counter())
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

    fn caveat(&self) -> Option<String> {
        (self.isolation == Isolation::None).then(|| {
            "local commands are not isolated (crabboxd runs with CRABBOX_LOCAL_ISOLATION=none): \
             they can read and change everything you can"
                .to_string()
        })
    }

    async fn doctor(&self, _options: &BTreeMap<String, String>) -> Vec<(String, bool, String)> {
        let jail = match &self.isolation {
            Isolation::None => (
                "local jail".to_string(),
                true,
                "off (CRABBOX_LOCAL_ISOLATION=none): local commands can read and change \
                 everything you can"
                    .to_string(),
            ),
            Isolation::Jail { .. } if sandbox::jail::jail_available() => (
                "local jail".to_string(),
                true,
                "bubblewrap: own PID namespace, your home and the daemon's folders hidden, \
                 the system read-only, network block available"
                    .to_string(),
            ),
            Isolation::Jail { .. } => (
                "local jail".to_string(),
                false,
                "bwrap is missing or cannot make namespaces here: install it (apt-get install \
                 bubblewrap), or run crabboxd with CRABBOX_LOCAL_ISOLATION=none (unjailed)"
                    .to_string(),
            ),
        };
        vec![
            ("provider local".to_string(), true, "ready".to_string()),
            jail,
            if sandbox::cgroup::available() {
                (
                    "local resources".to_string(),
                    true,
                    format!(
                        "each sandbox in a cgroup of its own, joined by its commands: at most {} processes \
                         (local.max_processes), memory and CPU time as environment.resources.memory \
                         and cpu say",
                        self.max_processes
                    ),
                )
            } else {
                (
                    "local resources".to_string(),
                    true,
                    "not enforced: no cgroup this daemon may make (cgroup v2 delegation, or \
                     the v1 pids/memory hierarchies as root); processes and memory are \
                     unbounded"
                        .to_string(),
                )
            },
        ]
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
        // Its agent goes first, and every process of the sandbox with it.
        self.agents.remove(sandbox);
        match self.cgroups.remove(sandbox) {
            // Removed once its processes are gone.
            Some((_, cgroup)) => drop(tokio::task::spawn_blocking(move || drop(cgroup))),
            // Made by an earlier daemon, if any.
            None => {
                let name = sandbox.to_string();
                drop(tokio::task::spawn_blocking(move || {
                    sandbox::cgroup::remove_named(&name)
                }));
            }
        }
        let engine = self.engine.clone();
        let sandbox = sandbox.to_string();
        blocking(move || engine.delete(&sandbox).map_err(engine_err)).await
    }
}

impl LocalProvider {
    /// The sandbox's agent, started now when it has none (or its agent ended, or was
    /// started in another jail: the sandbox's network setting changed).
    fn agent(
        &self,
        program: &Path,
        sandbox: &str,
        jail: Option<&sandbox::jail::Jail>,
        cgroup: Option<&sandbox::cgroup::Cgroup>,
        cgroup_procs: &[PathBuf],
    ) -> std::io::Result<std::sync::Arc<sandbox::agent::Agent>> {
        let entry = self.agents.entry(sandbox.to_string());
        let live = match &entry {
            dashmap::Entry::Occupied(e) if e.get().agent.is_alive() => {
                if e.get().jail.as_ref() == jail && e.get().cgroup_procs == cgroup_procs {
                    return Ok(e.get().agent.clone());
                }
                true
            }
            _ => false,
        };
        // Jailed, with no agent of this daemon alive in the sandbox, whatever its cgroup
        // still holds is left from a jail that is gone: the commands of an agent that died
        // (already told as failed), or bubblewrap's pid-1 child of a jail whose bubblewrap
        // was killed between its clone and its word to go (a daemon killed as it started
        // the agent), which waits for that word forever. Nothing of the user's outlives a
        // jail's PID namespace, so all of it goes before the new agent starts. (Unjailed,
        // a job that left its command's group is the user's own: it is left alone.)
        if jail.is_some()
            && !live
            && let Some(c) = cgroup
        {
            c.end_processes();
        }
        let dir = self.engine.dir(sandbox);
        let agent = sandbox::agent::Agent::spawn(
            program,
            &sandbox::agent::AgentSpec {
                jail,
                cgroup_procs,
                dir: &dir,
            },
        )?;
        let running = RunningAgent {
            agent: agent.clone(),
            jail: jail.cloned(),
            cgroup_procs: cgroup_procs.to_vec(),
        };
        entry.insert(running);
        Ok(agent)
    }

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
            // A file where the working folder (or one above it) would be: the caller's.
            if e.kind() == std::io::ErrorKind::AlreadyExists
                || e.kind() == std::io::ErrorKind::NotADirectory
            {
                ProviderError::new(
                    ProviderErrorKind::Invalid,
                    format!(
                        "the working folder {} is not a folder in the sandbox (a file is in \
                         its way): pick a folder with --workdir",
                        spec.cwd
                    ),
                )
            } else {
                ProviderError::new(
                    ProviderErrorKind::Other,
                    format!("creating {}: {e}", cwd.display()),
                )
            }
        })?;
        let jail = match &self.isolation {
            Isolation::None => None,
            Isolation::Jail { hide, mounts } => {
                if !sandbox::jail::jail_available() {
                    return Err(ProviderError::new(
                        ProviderErrorKind::Provisioning,
                        "the local provider runs commands in a bubblewrap jail, and bwrap is not \
                         installed or cannot make namespaces here: install it (apt-get install \
                         bubblewrap; `crabbox doctor` checks it), or run crabboxd with \
                         CRABBOX_LOCAL_ISOLATION=none to run local commands unjailed",
                    ));
                }
                let dir = self.engine.dir(sandbox);
                Some(sandbox::jail::Jail::Local {
                    tmp: dir.join("tmp"),
                    dir,
                    hide: hide.clone(),
                    mounts: mounts.clone(),
                    block_network: meta.network_block,
                })
            }
        };
        let mut env = spec.env.clone();
        if jail.is_some() {
            // The real home is hidden: the sandbox's is the one to use.
            env.entry("HOME".into())
                .or_insert_with(|| self.engine.home(sandbox).to_string_lossy().into_owned());
        }
        // The sandbox's limits, where this machine lets the daemon make a cgroup: one per
        // sandbox, made at its first command, removed with it.
        let cgroup = match self.cgroups.get(sandbox).map(|c| c.clone()) {
            Some(c) => Some(c),
            None => {
                let limits = sandbox::cgroup::Limits {
                    pids: Some(self.max_processes),
                    memory: meta.memory_gb.map(|g| g << 30),
                    cpus: meta.cpus,
                };
                let name = sandbox.to_string();
                let made = tokio::task::spawn_blocking(move || {
                    sandbox::cgroup::Cgroup::create(&name, limits)
                })
                .await
                .ok()
                .flatten()
                .map(std::sync::Arc::new);
                if let Some(c) = &made {
                    self.cgroups.insert(sandbox.to_string(), c.clone());
                } else if meta.memory_gb.is_some() || meta.cpus.is_some() {
                    // Asked for, and not to be had: refused rather than run unbounded.
                    return Err(ProviderError::new(
                        ProviderErrorKind::Invalid,
                        "environment.resources (cpu/memory) cannot be enforced here: this \
                         machine gives the daemon no cgroup with those controllers (cgroup v2 \
                         delegation with cpu and memory, or the v1 hierarchies as root; see \
                         `crabbox doctor`). Remove resources from environment for the local \
                         provider, or use the daytona provider",
                    ));
                }
                made
            }
        };
        // The client's own descriptors, when it handed them over: only into the jail. Its
        // processes end there with the command's group (killed as its leader ends) or at
        // the latest with the sandbox's PID namespace; unjailed, a job that left the group
        // could hold the client's pipe open as long as it runs on this machine.
        let direct = match (&jail, spec.tty) {
            (Some(_), None) => spec.direct.clone(),
            _ => Default::default(),
        };
        let cgroup_procs = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
        let agent = match sandbox::agent::program() {
            Some(program) => Some(
                self.agent(
                    program,
                    sandbox,
                    jail.as_ref(),
                    cgroup.as_deref(),
                    &cgroup_procs,
                )
                .map_err(|e| {
                    ProviderError::new(
                        ProviderErrorKind::Other,
                        format!("starting the agent of sandbox {sandbox}: {e}"),
                    )
                })?,
            ),
            None => None,
        };
        let process = sandbox::ProcessSpec {
            command: spec.command.clone(),
            cwd,
            env,
            timeout: spec.timeout,
            jail,
            tty: spec.tty,
            direct,
            cgroup_procs,
            agent,
        };
        sandbox::process::run(&process, input, out, cancel)
            .await
            .map_err(|e| {
                ProviderError::new(
                    ProviderErrorKind::Other,
                    format!("the command in sandbox {sandbox}: {e}"),
                )
            })
    }
}
