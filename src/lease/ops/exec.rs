//! Running a command in a lease's sandbox, with its output streamed as it comes.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, ProviderError};
use crate::lease::handle::RunTarget;
use crate::provider::{ExecExit, ExecOutput, ExecSpec, Input};

/// A command running in a sandbox. Dropping it cancels the command (the whole process
/// group), so a run whose client left cannot leave it behind.
pub struct Execution {
    /// The command's output, in order, until it ends.
    pub output: mpsc::Receiver<ExecOutput>,
    cancel: CancellationToken,
    task: JoinHandle<Result<ExecExit, ProviderError>>,
    _cancel_on_drop: DropGuard,
}

impl Execution {
    /// Starts `spec` on the target's sandbox, its stdin (or terminal) fed from `input` when
    /// given. It stops when the lease is released too.
    pub fn start(
        target: &RunTarget,
        spec: ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
    ) -> Execution {
        let (out_tx, output) = mpsc::channel(64);
        let cancel = target.cancel.child_token();
        let provider = target.provider.clone();
        let sandbox = target.sandbox.clone();
        let task_cancel = cancel.clone();
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            provider
                .exec(&sandbox, &spec, input, out_tx, task_cancel)
                .await
        }));
        Execution {
            output,
            _cancel_on_drop: cancel.clone().drop_guard(),
            cancel,
            task,
        }
    }

    /// Stops the command (the whole process group).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Waits for the command's exit, once its output has been read to the end.
    pub async fn wait(mut self) -> Result<ExecExit, Error> {
        let exit = (&mut self.task)
            .await
            .map_err(|e| Error::Internal(format!("exec task: {e}")))??;
        Ok(exit)
    }
}
