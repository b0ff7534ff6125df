//! A run's artifacts (`--download`, `--artifact-glob`, `--require-artifact`): what to
//! ask for, and where each fetched entry goes when the archive arrives with the run's
//! events (before its exit).

use std::path::{Path, PathBuf};

use super::copy::{Placement, Unpacker, staged};
use crate::cli::{CliError, RunArgs, exit};
use crate::pb;

/// Where one source's entries go.
#[derive(Debug, Clone)]
enum Dest {
    /// `--download REMOTE:LOCAL`: into LOCAL if it is a folder, else named LOCAL.
    Named(PathBuf),
    /// Into the artifacts folder, under the entry's name (a glob's keep their paths).
    Folder,
}

/// What a run asks to fetch.
#[derive(Debug, Default)]
pub struct Wanted {
    /// The remote sources, in the order the daemon numbers them.
    pub sources: Vec<String>,
    dests: Vec<Dest>,
    /// Which sources must be there (`--require-artifact`).
    required: Vec<bool>,
    folder: Option<PathBuf>,
}

impl Wanted {
    pub fn from_args(args: &RunArgs) -> Result<Wanted, CliError> {
        let mut w = Wanted {
            folder: args.artifacts_dir.clone(),
            ..Wanted::default()
        };
        for d in &args.download {
            let (remote, dest) = match d.split_once(':') {
                Some((r, l)) if !l.is_empty() => (r, Dest::Named(PathBuf::from(l))),
                Some((r, _)) => (r, Dest::Folder),
                None => (d.as_str(), Dest::Folder),
            };
            if remote.is_empty() {
                return Err(CliError::usage(format!(
                    "--download {d}: name the remote path, e.g. --download target/app:./app"
                )));
            }
            w.push(remote, dest, false);
        }
        for g in &args.artifact_glob {
            if g.is_empty() {
                return Err(CliError::usage(
                    "--artifact-glob needs a glob, e.g. 'target/**/*.xml'",
                ));
            }
            w.push(g, Dest::Folder, false);
        }
        for p in &args.require_artifact {
            if p.is_empty() {
                return Err(CliError::usage("--require-artifact needs a path"));
            }
            w.push(p, Dest::Folder, true);
        }
        Ok(w)
    }

    fn push(&mut self, remote: &str, dest: Dest, required: bool) {
        self.sources.push(remote.to_string());
        self.dests.push(dest);
        self.required.push(required);
    }

    /// The artifacts folder: `--artifacts-dir`, else `./crabbox-artifacts/<lease id>`.
    fn folder(&self, lease_id: &str) -> PathBuf {
        self.folder.clone().unwrap_or_else(|| {
            Path::new("crabbox-artifacts").join(if lease_id.is_empty() { "run" } else { lease_id })
        })
    }
}

/// Artifacts being received.
pub struct Receiving {
    unpacker: Option<Unpacker>,
    placement: Placement,
    missing: Vec<String>,
    missing_required: Vec<String>,
}

/// What came back.
#[derive(Debug, Default)]
pub struct Received {
    pub files: Vec<PathBuf>,
    pub missing: Vec<String>,
    pub missing_required: Vec<String>,
}

impl Receiving {
    /// Decides where everything goes, from the archive's header.
    pub fn start(
        wanted: &Wanted,
        header: &pb::CopyHeader,
        lease_id: &str,
    ) -> Result<Receiving, CliError> {
        let folder = wanted.folder(lease_id);
        let mut moves = Vec::new();
        for e in &header.entries {
            let Some(dest) = wanted.dests.get(e.source as usize) else {
                continue;
            };
            let to = match dest {
                Dest::Named(local) if local.is_dir() => local.join(&e.name),
                Dest::Named(local) => local.clone(),
                Dest::Folder => folder.join(&e.name),
            };
            moves.push((staged(e), to));
        }
        let missing_required = header
            .missing
            .iter()
            .filter(|m| {
                wanted
                    .sources
                    .iter()
                    .zip(&wanted.required)
                    .any(|(s, req)| *req && s == *m)
            })
            .cloned()
            .collect();
        let placement = Placement { moves };
        let unpacker = if placement.moves.is_empty() {
            None
        } else {
            Some(Unpacker::start(&placement.staging_parent())?)
        };
        Ok(Receiving {
            unpacker,
            placement,
            missing: header.missing.clone(),
            missing_required,
        })
    }

    pub fn feed(&mut self, data: Vec<u8>) {
        if let Some(u) = &mut self.unpacker {
            u.feed(data);
        }
    }

    /// The archive is complete: everything is put in place.
    pub async fn finish(self) -> Result<Received, CliError> {
        if let Some(u) = self.unpacker {
            let staged = u.finish().await?;
            self.placement.commit(staged.path())?;
        }
        Ok(Received {
            files: self.placement.moves.into_iter().map(|(_, to)| to).collect(),
            missing: self.missing,
            missing_required: self.missing_required,
        })
    }
}

/// The run's exit code once its artifacts are in: a required one missing fails a run
/// whose command succeeded.
pub fn exit_code(command: i32, received: &Received) -> Result<i32, CliError> {
    if command == 0 && !received.missing_required.is_empty() {
        let mut e = CliError::new(
            exit::MISSING_ARTIFACT,
            format!(
                "the command succeeded but a required artifact is missing: {}",
                received.missing_required.join(", ")
            ),
        );
        e.kind = Some("artifact");
        return Err(e);
    }
    Ok(command)
}
