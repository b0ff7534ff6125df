//! The local sandbox engine: a sandbox is a folder with its metadata beside it, and commands
//! run as real processes in their own process groups. The `local` provider uses it, and
//! `daytona-sim` serves Daytona's API over it.
//!
//! Layout under the engine root: `<id>/sandbox.json` (metadata, written atomically) and
//! `<id>/home/` (the sandbox's files).

pub mod agent;
pub mod archive;
pub mod cgroup;
pub mod jail;
pub mod process;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use process::{ExecExit, ExecOutput, ProcessSpec};

/// A sandbox's life as the engine tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    Creating,
    Started,
    Stopped,
    Error,
}

/// What the engine keeps about one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxMeta {
    pub id: String,
    pub name: String,
    pub state: EngineState,
    #[serde(default)]
    pub error_reason: Option<String>,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub created_at_ms: u64,
    /// The local provider's `environment.network.mode: block`: commands get a network
    /// of their own with only loopback.
    #[serde(default)]
    pub network_block: bool,
    /// The local provider's `environment.resources.memory`, in GB: its commands' limit.
    #[serde(default)]
    pub memory_gb: Option<u64>,
    /// The local provider's `environment.resources.cpu`: how many CPUs' time its commands
    /// may use together.
    #[serde(default)]
    pub cpus: Option<u64>,
}

/// Engine failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No sandbox has that id or name.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// A sandbox with that name already exists.
    #[error("a sandbox named {0} already exists")]
    NameTaken(String),
    /// A name or path is not acceptable.
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EngineError {
    let context = context.into();
    move |source| EngineError::Io { context, source }
}

/// The engine: one root folder of sandboxes.
#[derive(Debug, Clone)]
pub struct Engine {
    root: PathBuf,
}

impl Engine {
    /// Opens (creating) the engine root. Sandboxes made before names were indexed get
    /// their index entries now, once.
    pub fn open(root: impl Into<PathBuf>) -> Result<Engine, EngineError> {
        let root = root.into();
        std::fs::create_dir_all(root.join(NAMES))
            .map_err(io_err(format!("creating sandbox root {}", root.display())))?;
        let engine = Engine { root };
        let complete = engine.root.join(NAMES).join(".complete");
        if !complete.exists() {
            for meta in engine.list()? {
                engine.write_name(&meta.name, &meta.id)?;
            }
            std::fs::write(&complete, b"")
                .map_err(io_err(format!("writing {}", complete.display())))?;
        }
        Ok(engine)
    }

    /// Where the name index says which sandbox has `name` (the file holds its id).
    fn name_path(&self, name: &str) -> PathBuf {
        self.root
            .join(NAMES)
            .join(blake3::hash(name.as_bytes()).to_hex().as_str())
    }

    /// The sandbox the name index gives for `name`, if it is still that sandbox's name.
    fn by_name(&self, name: &str) -> Result<Option<SandboxMeta>, EngineError> {
        let id = match std::fs::read_to_string(self.name_path(name)) {
            Ok(id) => id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading the name index of {name}"))(e)),
        };
        if check_component(&id).is_err() {
            return Ok(None);
        }
        Ok(self.load(&id)?.filter(|m| m.name == name))
    }

    /// Points `name` at `id` in the name index; taken by another live sandbox: refused.
    fn claim_name(&self, name: &str, id: &str) -> Result<(), EngineError> {
        if let Some(other) = self.by_name(name)?
            && other.id != id
        {
            return Err(EngineError::NameTaken(name.to_string()));
        }
        self.write_name(name, id)
    }

    fn write_name(&self, name: &str, id: &str) -> Result<(), EngineError> {
        let path = self.name_path(name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, id).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Drops `name` from the index if it still points at `id`.
    fn forget_name(&self, name: &str, id: &str) {
        let path = self.name_path(name);
        if std::fs::read_to_string(&path).is_ok_and(|have| have == id) {
            let _ = std::fs::remove_file(&path);
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sandbox's own folder (its files live in `home/` below it).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// The folder that holds the sandbox's files.
    pub fn home(&self, id: &str) -> PathBuf {
        self.dir(id).join("home")
    }

    /// Creates a sandbox with this id and name. Names and ids are unique.
    pub fn create(
        &self,
        id: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        env: BTreeMap<String, String>,
        state: EngineState,
    ) -> Result<SandboxMeta, EngineError> {
        check_component(id)?;
        if self.load(id)?.is_some() {
            return Err(EngineError::NameTaken(name.to_string()));
        }
        // The name first: a crash after it leaves an entry that points at nothing, which
        // counts as free.
        self.claim_name(name, id)?;
        let dir = self.dir(id);
        std::fs::create_dir_all(dir.join("home"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let meta = SandboxMeta {
            id: id.to_string(),
            name: name.to_string(),
            state,
            error_reason: None,
            labels,
            env,
            created_at_ms: crate::clock::now_ms(),
            network_block: false,
            memory_gb: None,
            cpus: None,
        };
        self.save(&meta)?;
        Ok(meta)
    }

    /// Writes the metadata atomically (temp file + rename).
    pub fn save(&self, meta: &SandboxMeta) -> Result<(), EngineError> {
        let dir = self.dir(&meta.id);
        let tmp = dir.join(".sandbox.json.tmp");
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| EngineError::Invalid(format!("encoding sandbox metadata: {e}")))?;
        std::fs::write(&tmp, json).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join("sandbox.json"))
            .map_err(io_err(format!("saving metadata of {}", meta.id)))
    }

    fn load(&self, id: &str) -> Result<Option<SandboxMeta>, EngineError> {
        let path = self.dir(id).join("sandbox.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                EngineError::Invalid(format!("corrupt sandbox metadata {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    /// A sandbox by id or name.
    pub fn find(&self, id_or_name: &str) -> Result<Option<SandboxMeta>, EngineError> {
        if check_component(id_or_name).is_ok()
            && let Some(meta) = self.load(id_or_name)?
        {
            return Ok(Some(meta));
        }
        self.by_name(id_or_name)
    }

    /// A sandbox by id or name, or [`EngineError::NotFound`].
    pub fn get(&self, id_or_name: &str) -> Result<SandboxMeta, EngineError> {
        self.find(id_or_name)?
            .ok_or_else(|| EngineError::NotFound(id_or_name.to_string()))
    }

    /// Every sandbox, oldest first.
    pub fn list(&self) -> Result<Vec<SandboxMeta>, EngineError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root)
            .map_err(io_err(format!("listing {}", self.root.display())))?;
        for entry in entries.flatten() {
            if let Some(id) = entry.file_name().to_str()
                && !id.starts_with('.')
                && let Some(meta) = self.load(id)?
            {
                out.push(meta);
            }
        }
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(out)
    }

    /// Changes a sandbox's metadata with `f` and saves it.
    pub fn update(
        &self,
        id_or_name: &str,
        f: impl FnOnce(&mut SandboxMeta),
    ) -> Result<SandboxMeta, EngineError> {
        let mut meta = self.get(id_or_name)?;
        let old_name = meta.name.clone();
        f(&mut meta);
        if meta.name != old_name {
            self.claim_name(&meta.name, &meta.id)?;
        }
        self.save(&meta)?;
        if meta.name != old_name {
            self.forget_name(&old_name, &meta.id);
        }
        Ok(meta)
    }

    /// Deletes a sandbox's folder. Its metadata goes first, so a crash halfway leaves no
    /// sandbox that looks alive. Gone already is fine.
    pub fn delete(&self, id_or_name: &str) -> Result<(), EngineError> {
        let Some(meta) = self.find(id_or_name)? else {
            return Ok(());
        };
        let dir = self.dir(&meta.id);
        match std::fs::remove_file(dir.join("sandbox.json")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("deleting {}", dir.display()))(e)),
        }
        self.forget_name(&meta.name, &meta.id);
        archive::remove_tree(&dir).map_err(io_err(format!("deleting {}", dir.display())))
    }
}

/// The name index's folder under the engine root (`<blake3 of the name>` -> id).
const NAMES: &str = ".names";

/// A single path component: no separators, no `.`/`..`, not empty.
fn check_component(s: &str) -> Result<(), EngineError> {
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        return Err(EngineError::Invalid(format!("invalid sandbox id {s:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_find_update_delete() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(tmp.path().join("sb")).expect("open");
        let labels = BTreeMap::from([("a".to_string(), "1".to_string())]);
        let m = engine
            .create(
                "id1",
                "name-one",
                labels,
                BTreeMap::new(),
                EngineState::Started,
            )
            .expect("create");
        assert_eq!(engine.get("name-one").expect("by name").id, "id1");
        assert_eq!(engine.get("id1").expect("by id").name, "name-one");
        assert!(matches!(
            engine.create(
                "id2",
                "name-one",
                BTreeMap::new(),
                BTreeMap::new(),
                EngineState::Started
            ),
            Err(EngineError::NameTaken(_))
        ));
        engine
            .update("id1", |m| m.state = EngineState::Stopped)
            .expect("update");
        assert_eq!(engine.get("id1").expect("get").state, EngineState::Stopped);
        assert!(engine.home(&m.id).is_dir());
        engine.delete("name-one").expect("delete");
        assert!(engine.find("id1").expect("find").is_none());
        engine.delete("id1").expect("delete twice is fine");
        assert!(matches!(engine.get("id1"), Err(EngineError::NotFound(_))));
        assert!(engine.find("../x").expect("find").is_none());
        // The name is free again.
        engine
            .create(
                "id3",
                "name-one",
                BTreeMap::new(),
                BTreeMap::new(),
                EngineState::Started,
            )
            .expect("name reused");
    }

    #[test]
    fn names_follow_renames_and_survive_a_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("sb");
        let engine = Engine::open(&root).expect("open");
        engine
            .create(
                "id1",
                "a",
                BTreeMap::new(),
                BTreeMap::new(),
                EngineState::Started,
            )
            .expect("create");
        engine.update("a", |m| m.name = "b".into()).expect("rename");
        assert!(engine.find("a").expect("find").is_none());
        assert_eq!(engine.get("b").expect("by new name").id, "id1");
        engine
            .create(
                "id2",
                "a",
                BTreeMap::new(),
                BTreeMap::new(),
                EngineState::Started,
            )
            .expect("the old name is free");
        // An engine from before the index: rebuilt at open.
        std::fs::remove_dir_all(root.join(NAMES)).expect("rm index");
        let engine = Engine::open(&root).expect("reopen");
        assert_eq!(engine.get("b").expect("b").id, "id1");
        assert_eq!(engine.get("a").expect("a").id, "id2");
    }
}
