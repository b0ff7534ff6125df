//! daytona-sim's state on disk, so that a restart (kill -9 included) loses no sandbox and
//! duplicates none: sandboxes, snapshots, SSH tokens, preview grants and sessions in
//! `<state-dir>/sim-state.json` (0600, written whole to a temporary file and renamed, at
//! once after a create and every [`SAVE_EVERY`] otherwise).
//!
//! At start the file is read back and set against the sandbox folders on disk: a sandbox
//! comes back `stopped` when it was running (its processes are gone, as after a reboot of
//! its machine), one that was being destroyed is finished off, a folder the file does not
//! know (a create cut short) comes back as a stopped sandbox, and an entry whose folder is
//! gone is dropped. A snapshot cut mid-build is in `error` and says why. Sessions come
//! back with their commands, exit codes and output (a command cut off by the restart ended
//! as killed, 137), but their shells are gone: nothing more runs in them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Sim;
use super::control::previews::Grant;
use super::control::{SimSandbox, SimSnapshot, SshToken};
use super::toolbox::SavedSession;
use crate::clock::now_ms;

/// How often changes are written when nothing forces a write.
pub const SAVE_EVERY: Duration = Duration::from_millis(100);

#[derive(Serialize, Deserialize, Default)]
struct OnDisk {
    version: u32,
    sandboxes: Vec<SimSandbox>,
    snapshots: Vec<SimSnapshot>,
    ssh_tokens: HashMap<String, SshToken>,
    previews: HashMap<String, Grant>,
    /// Sessions' metadata (their commands, exit codes and log files); written by
    /// version 1 files from this release on, absent in older ones.
    #[serde(default)]
    sessions: Vec<SavedSession>,
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("sim-state.json")
}

/// The state as JSON, from the sim's maps.
fn snapshot_of(sim: &Sim) -> Option<Vec<u8>> {
    let mut sandboxes: Vec<SimSandbox> = sim.sandboxes.lock().ok()?.values().cloned().collect();
    sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
    let mut snapshots: Vec<SimSnapshot> = sim.snapshots.lock().ok()?.values().cloned().collect();
    snapshots.sort_by(|a, b| a.id.cmp(&b.id));
    let state = OnDisk {
        version: 1,
        sandboxes,
        snapshots,
        ssh_tokens: sim.ssh_tokens.lock().ok()?.clone(),
        previews: sim.previews.lock().ok()?.clone(),
        sessions: sim.sessions.saved(),
    };
    serde_json::to_vec(&state).ok()
}

/// Writes the state now if it changed since `last`; answers what is on disk.
pub fn save(sim: &Sim, last: Option<&[u8]>) -> Option<Vec<u8>> {
    let bytes = snapshot_of(sim)?;
    if last == Some(bytes.as_slice()) {
        return Some(bytes);
    }
    let path = state_file(&sim.config.state_dir);
    match crate::files::write_private(&path, &bytes) {
        Ok(()) => Some(bytes),
        Err(e) => {
            tracing::warn!(path = %path.display(), "could not save the sim's state: {e}");
            last.map(<[u8]>::to_vec)
        }
    }
}

/// Saves every [`SAVE_EVERY`], and at once when asked through `flush` (answering once
/// written), until `shutdown`; then once more (await the handle for that last write).
pub fn spawn_saver(
    sim: Arc<Sim>,
    mut flush: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let mut waiting = Vec::new();
            tokio::select! {
                () = tokio::time::sleep(SAVE_EVERY) => {}
                Some(ack) = flush.recv() => waiting.push(ack),
                () = shutdown.cancelled() => break,
            }
            // Every flush asked meanwhile is served by this one write.
            while let Ok(ack) = flush.try_recv() {
                waiting.push(ack);
            }
            let s = sim.clone();
            let prev = last.take();
            last = tokio::task::spawn_blocking(move || save(&s, prev.as_deref()))
                .await
                .ok()
                .flatten();
            for ack in waiting {
                let _ = ack.send(());
            }
        }
        save(&sim, last.as_deref());
    })
}

/// Reads the state back into a fresh sim (see the module's notes). Answers what it did,
/// for the log.
pub fn load(sim: &Sim) -> Result<String, String> {
    let path = state_file(&sim.config.state_dir);
    let state: OnDisk = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                let aside = path.with_extension(format!("json.damaged-{}", now_ms()));
                let _ = std::fs::rename(&path, &aside);
                tracing::warn!(
                    "{} could not be read ({e}); set aside as {}: sandboxes are taken from \
                     their folders",
                    path.display(),
                    aside.display()
                );
                OnDisk::default()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnDisk::default(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let on_disk = sim
        .engine
        .list()
        .map_err(|e| format!("listing the sandbox folders: {e}"))?;
    let mut sandboxes = HashMap::new();
    let (mut stopped, mut dropped, mut adopted, mut finished) = (0, 0, 0, 0);
    for mut sb in state.sandboxes {
        if !on_disk.iter().any(|m| m.id == sb.id) {
            dropped += 1;
            continue;
        }
        match sb.state.as_str() {
            "destroying" | "destroyed" => {
                let _ = sim.engine.delete(&sb.id);
                finished += 1;
                continue;
            }
            "stopped" | "archived" | "error" | "build_failed" => {}
            "pending_build" | "building_snapshot" => {
                sb.state = "build_failed".into();
                sb.error_reason = Some(
                    "daytona-sim restarted during the build: delete the sandbox and create it \
                     again"
                        .into(),
                );
                stopped += 1;
            }
            _ => {
                sb.state = "stopped".into();
                sb.desired_state = "stopped".into();
                stopped += 1;
            }
        }
        sb.procs = CancellationToken::new();
        sandboxes.insert(sb.id.clone(), sb);
    }
    for meta in on_disk {
        if sandboxes.contains_key(&meta.id) || meta.name.ends_with(".destroying") {
            if meta.name.ends_with(".destroying") && !sandboxes.contains_key(&meta.id) {
                let _ = sim.engine.delete(&meta.id);
                finished += 1;
            }
            continue;
        }
        sandboxes.insert(meta.id.clone(), SimSandbox::adopted(sim, &meta));
        adopted += 1;
    }
    let mut snapshots = HashMap::new();
    for mut s in state.snapshots {
        if !s.settled() {
            s.state = "error".into();
            s.error_reason = Some(
                "daytona-sim restarted while this snapshot was building: delete it and create \
                 it again"
                    .into(),
            );
        }
        snapshots.insert(s.id.clone(), s);
    }
    let now = now_ms();
    let tokens: HashMap<String, SshToken> = state
        .ssh_tokens
        .into_iter()
        .filter(|(_, t)| t.expires_ms > now && sandboxes.contains_key(&t.sandbox_id))
        .collect();
    let previews: HashMap<String, Grant> = state
        .previews
        .into_iter()
        .filter(|(_, g)| {
            g.expires_ms.is_none_or(|e| e > now) && sandboxes.contains_key(&g.sandbox_id)
        })
        .collect();
    let sessions: Vec<SavedSession> = state
        .sessions
        .into_iter()
        .filter(|s| sandboxes.contains_key(&s.sandbox))
        .collect();
    let sessions = sim
        .sessions
        .restore(sessions, &sim.config.state_dir.join("logs"));
    let kept = sandboxes.len();
    let lock = |what: &str| format!("the sim's {what} lock is poisoned");
    *sim.sandboxes.lock().map_err(|_| lock("sandboxes"))? = sandboxes;
    sim.snapshots
        .lock()
        .map_err(|_| lock("snapshots"))?
        .extend(snapshots);
    *sim.ssh_tokens.lock().map_err(|_| lock("ssh tokens"))? = tokens;
    *sim.previews.lock().map_err(|_| lock("previews"))? = previews;
    Ok(format!(
        "{kept} sandboxes back ({stopped} were running and are stopped, {adopted} found only \
         as folders), {finished} deletions finished, {dropped} entries without a folder dropped, \
         {sessions} sessions kept (their shells ended)"
    ))
}
