//! Providers: where sandboxes come from.
//!
//! [`Provider`] is sized for Daytona: create, wait until ready, put a sync archive, exec with
//! streamed output, cancel, ssh access, release, and list owned sandboxes by labels. Every
//! operation is idempotent or safe to repeat after a crash: `release` of a sandbox that is
//! already gone succeeds.
//!
//! - [`local`]: the embedded default; sandboxes are folders on this machine.
//! - [`daytona`]: Daytona's REST control plane and toolbox.

pub mod daytona;
pub mod local;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::error::{ProviderError, ProviderErrorKind};
pub use crate::sandbox::archive::{DeltaOp, DeltaSource, FileDelta};
pub use crate::sandbox::process::{Input, PtySize};
pub use crate::sandbox::{ExecExit, ExecOutput};

/// The providers a daemon offers, by name.
pub type Providers = HashMap<String, Arc<dyn Provider>>;

/// A sandbox's state as crabbox cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxState {
    /// Being created or started.
    Creating,
    /// Up and usable.
    Started,
    /// Stopped by the provider or a user; `start` brings it back.
    Stopped,
    /// Broken for good; the reason is the provider's.
    Error(String),
    /// Being deleted or gone.
    Destroyed,
}

/// A sandbox as a provider reports it.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    pub id: String,
    pub name: String,
    pub state: SandboxState,
    pub labels: BTreeMap<String, String>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// The sandbox name, chosen before the call so a lost answer can be recovered by it.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Provider options chosen per lease (Daytona: snapshot, target, user,
    /// auto_stop_minutes).
    pub options: BTreeMap<String, String>,
}

/// A sync archive to put into a sandbox.
#[derive(Debug, Clone)]
pub struct UploadSpec {
    /// The checkout's folder in the sandbox (created if missing).
    pub workdir: String,
    /// A gzip tar of relative paths, on local disk; `None` when there is nothing to add.
    pub archive: Option<PathBuf>,
    /// Changed files sent as deltas against the version the workdir holds (their literal
    /// bytes are in the archive): put together after unpacking, then moved into place.
    pub deltas: Vec<FileDelta>,
    /// Relative paths to delete before unpacking (removed files, and changed ones so that a
    /// stale symlink is never written through).
    pub remove: Vec<String>,
    /// Empty the workdir first: the daemon has no trusted record of what it holds (first
    /// sync, full resync, or after a failed upload).
    pub clean: bool,
    /// The digest of what the workdir holds after this upload (the daemon keeps the
    /// manifest itself), kept there as `.crabbox-manifest.digest`: removed before anything
    /// changes and written once everything is in place, so the sandbox says whether it
    /// holds exactly what the daemon's record says.
    pub digest: String,
    /// Counts the archive's bytes as they reach the sandbox (progress; restarts from 0
    /// when an upload is sent again).
    pub sent: crate::sync::Sent,
}

/// Where a synced workdir keeps the digest of what it holds.
pub const DIGEST_FILE: &str = ".crabbox-manifest.digest";

/// A command to run in a sandbox.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// A shell command line (providers run it through the sandbox user's shell).
    pub command: String,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    /// Run on a pseudo-terminal of this size (output then comes back as one stream, as a
    /// terminal shows it; `TERM` is in `env`).
    pub tty: Option<PtySize>,
    /// The client's own stdout/stderr ([`crate::direct`]): a provider may give them to
    /// the command (one that runs on this machine) or write the command's output into them
    /// itself (one whose output comes to the daemon); those streams then send nothing to
    /// `out`. A provider may also ignore them.
    pub direct: crate::direct::DirectOutput,
}

/// `s` as one word for a POSIX shell (`''` for text no shell can hold: a NUL byte).
pub fn shell_quote(s: &str) -> String {
    shlex::try_quote(s).map_or_else(|_| "''".into(), |q| q.into_owned())
}

/// A sandbox port's URL ([`Provider::preview`]).
#[derive(Debug, Clone, Default)]
pub struct Preview {
    pub url: String,
    /// A secret: send it in `header` (none when the URL needs nothing, or carries it).
    pub token: Option<String>,
    pub header: Option<String>,
    /// When a signed URL stops working.
    pub expires_at_ms: Option<u64>,
}

/// What a short command of crabbox's own ended with ([`Provider::execute`]).
#[derive(Debug, Clone)]
pub struct Executed {
    pub code: i32,
    pub output: String,
}

/// SSH access to a sandbox.
#[derive(Debug, Clone)]
pub struct SshAccessInfo {
    pub host: String,
    pub port: u16,
    /// For Daytona this is the access token: a secret.
    pub user: String,
    pub expires_at_ms: u64,
}

/// A source of sandboxes. Implementations must be cheap to share (`Arc<dyn Provider>`).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `local`, `daytona`...
    fn name(&self) -> &str;

    /// Where checkouts live inside the sandbox named `sandbox_name`.
    fn work_root(&self, sandbox_name: &str) -> String;

    /// Creates a sandbox; answers as soon as the provider accepted it (it may still be
    /// creating).
    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError>;

    /// The sandbox by id or name; `None` when it does not exist.
    async fn get(&self, sandbox: &str) -> Result<Option<SandboxInfo>, ProviderError>;

    /// Waits until the sandbox is started, failing on an error state or at `deadline`.
    async fn wait_ready(
        &self,
        sandbox: &str,
        deadline: Duration,
    ) -> Result<SandboxInfo, ProviderError>;

    /// Starts a stopped sandbox (answers once the start was accepted).
    async fn start(&self, sandbox: &str) -> Result<SandboxInfo, ProviderError>;

    /// Stops a started sandbox and keeps its disk (a pause); answers once it is stopped.
    /// [`Provider::start`] brings it back.
    async fn stop(&self, _sandbox: &str) -> Result<(), ProviderError> {
        Err(ProviderError::new(
            ProviderErrorKind::Other,
            format!("the {} provider cannot pause a sandbox", self.name()),
        ))
    }

    /// Replaces the sandbox's labels.
    async fn set_labels(
        &self,
        sandbox: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError>;

    /// Every sandbox whose labels contain all of `labels`.
    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxInfo>, ProviderError>;

    /// Removes `spec.remove`, then unpacks `spec.archive` into `spec.workdir`.
    async fn upload(&self, sandbox: &str, spec: &UploadSpec) -> Result<(), ProviderError>;

    /// The digest the workdir says it holds ([`UploadSpec::digest`]); `None` when it says
    /// nothing (never synced, a sync cut short, or the provider cannot tell).
    async fn synced_digest(
        &self,
        _sandbox: &str,
        _workdir: &str,
    ) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// Runs a command, sending its output as it comes; what arrives on `input` goes to its
    /// stdin (data) or its terminal (window size), and the end of `input` is the end of its
    /// stdin; without `input` it reads an empty stdin. `cancel` stops it (the whole process
    /// group). Answers with the exit once the command has ended.
    async fn exec(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError>;

    /// Runs a short command of crabbox's own (not the user's: no streams, no stdin) in
    /// `cwd` (created if missing) and answers its exit code and output (stdout, then stderr). Daytona answers
    /// it in one request (`process/execute`).
    async fn execute(
        &self,
        sandbox: &str,
        command: &str,
        cwd: &str,
        timeout: Duration,
    ) -> Result<Executed, ProviderError> {
        let (tx, mut rx) = mpsc::channel(16);
        let spec = ExecSpec {
            command: command.to_string(),
            cwd: cwd.to_string(),
            env: BTreeMap::new(),
            timeout: Some(timeout),
            tty: None,
            direct: Default::default(),
        };
        let collect = async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(o) = rx.recv().await {
                match o {
                    ExecOutput::Stdout(b) => out.extend_from_slice(&b),
                    ExecOutput::Stderr(b) => err.extend_from_slice(&b),
                }
            }
            out.extend_from_slice(&err);
            String::from_utf8_lossy(&out).into_owned()
        };
        let (exit, output) = tokio::join!(
            self.exec(sandbox, &spec, None, tx, CancellationToken::new()),
            collect
        );
        Ok(Executed {
            code: exit?.code,
            output,
        })
    }

    /// Streams the file at `path` (absolute, in the sandbox) into `out`, in chunks;
    /// answers its size.
    async fn read_file(
        &self,
        _sandbox: &str,
        path: &str,
        _out: mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, ProviderError> {
        Err(ProviderError::new(
            ProviderErrorKind::Invalid,
            format!(
                "the {} provider cannot read {path} from a sandbox",
                self.name()
            ),
        ))
    }

    /// Writes the local file `local` to `path` (absolute, in the sandbox), replacing it.
    async fn write_file(
        &self,
        _sandbox: &str,
        path: &str,
        _local: &std::path::Path,
    ) -> Result<(), ProviderError> {
        Err(ProviderError::new(
            ProviderErrorKind::Invalid,
            format!(
                "the {} provider cannot write {path} into a sandbox",
                self.name()
            ),
        ))
    }

    /// A URL for `port` served in the sandbox. With `signed`, a URL that carries its own
    /// access for that long; else the URL and, where access is needed, the token to send
    /// in [`Preview::header`].
    async fn preview(
        &self,
        _sandbox: &str,
        port: u16,
        _signed: Option<Duration>,
    ) -> Result<Preview, ProviderError> {
        Err(ProviderError::new(
            ProviderErrorKind::Invalid,
            format!("the {} provider has no previews (port {port})", self.name()),
        ))
    }

    /// Mints SSH access for `minutes`.
    async fn ssh_access(&self, sandbox: &str, minutes: u32)
    -> Result<SshAccessInfo, ProviderError>;

    /// Deletes the sandbox. A sandbox that is already gone is a success.
    async fn release(&self, sandbox: &str) -> Result<(), ProviderError>;

    /// Can this provider be used at all (credentials present and usable)? Checked before a
    /// lease is created, so that a setup problem is reported as such.
    fn check_ready(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// What every run on this provider is told (a setup that weakens a promise).
    fn caveat(&self) -> Option<String> {
        None
    }

    /// Checks the provider's setup: `(check, ok, detail)` lines for `crabbox doctor`.
    async fn doctor(&self, _options: &BTreeMap<String, String>) -> Vec<(String, bool, String)> {
        vec![(format!("provider {}", self.name()), true, "ready".into())]
    }
}
