//! Resource limits for a sandbox's commands, where this machine lets the daemon set them:
//! a cgroup per sandbox, joined by each of its commands (v2 under the daemon's own cgroup
//! when it is delegated, else the v1 `pids` and `memory` hierarchies when they are
//! writable, as for root), with a process limit, a memory limit and a CPU quota. Elsewhere [`Cgroup::create`] answers `None` and the
//! caller says that limits are not enforced.

use std::path::{Path, PathBuf};

/// What a command may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Processes (and threads) at once.
    pub pids: Option<u64>,
    /// Bytes of memory.
    pub memory: Option<u64>,
    /// CPUs' worth of time, per scheduling period, for all its processes together.
    pub cpus: Option<u64>,
}

/// The CPU scheduling period a quota is measured in (the kernel's default), in µs.
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroups of one command: their folders, removed when dropped (once empty).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

/// This process's path in a hierarchy (`0::` for v2, or the named v1 controller).
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        names
            .split(',')
            .any(|n| n == controller)
            .then(|| path.to_string())
    })
}

/// A sandbox's cgroup folder name.
fn leaf(name: &str) -> String {
    format!("crabbox-{name}")
}

/// Makes a cgroup folder, or takes the one already there.
fn make_dir(dir: &Path) -> Option<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Some(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(()),
        Err(_) => None,
    }
}

/// Where cgroup `leaf` is in `controller`'s v1 hierarchy ("": the v2 one), under this
/// process's own cgroup there.
fn dir_in(controller: &str, leaf: &str) -> Option<PathBuf> {
    let own = own_path(controller)?;
    Some(
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(own.trim_start_matches('/'))
            .join(leaf),
    )
}

/// Where `crabbox-<name>` would be, in every hierarchy this process could use.
fn places(name: &str) -> Vec<PathBuf> {
    let leaf = leaf(name);
    ["pids", "memory", "cpu", ""]
        .into_iter()
        .filter_map(|c| dir_in(c, &leaf))
        .collect()
}

/// Removes the cgroup of sandbox `name` wherever it is (made by an earlier daemon, which
/// stopped before the sandbox was released), once it is empty.
pub fn remove_named(name: &str) {
    drop(Cgroup {
        dirs: places(name).into_iter().filter(|d| d.is_dir()).collect(),
    });
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value)
}

impl Cgroup {
    /// The cgroup `crabbox-<name>` with `limits`, when the machine allows one. One left
    /// by an earlier daemon (it stopped before the sandbox was released) is taken over,
    /// so a sandbox never has more than one and [`remove_named`] finds it.
    pub fn create(name: &str, limits: Limits) -> Option<Cgroup> {
        if limits == Limits::default() {
            return None;
        }
        let leaf = leaf(name);
        Cgroup::v1(&leaf, limits).or_else(|| Cgroup::v2(&leaf, limits))
    }

    fn v1(leaf: &str, limits: Limits) -> Option<Cgroup> {
        let mut made = Cgroup { dirs: Vec::new() };
        let cpu = limits.cpus.map(|c| {
            vec![
                ("cpu.cfs_period_us", CPU_PERIOD_US),
                ("cpu.cfs_quota_us", c * CPU_PERIOD_US),
            ]
        });
        for (controller, writes) in [
            ("pids", limits.pids.map(|p| vec![("pids.max", p)])),
            (
                "memory",
                limits.memory.map(|m| vec![("memory.limit_in_bytes", m)]),
            ),
            ("cpu", cpu),
        ] {
            let Some(writes) = writes else { continue };
            let dir = dir_in(controller, leaf)?;
            make_dir(&dir)?;
            made.dirs.push(dir.clone());
            for (file, value) in writes {
                write(&dir, file, &value.to_string()).ok()?;
            }
        }
        (!made.dirs.is_empty()).then_some(made)
    }

    fn v2(leaf: &str, limits: Limits) -> Option<Cgroup> {
        if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return None;
        }
        let dir = dir_in("", leaf)?;
        make_dir(&dir)?;
        let made = Cgroup {
            dirs: vec![dir.clone()],
        };
        if let Some(p) = limits.pids {
            write(&dir, "pids.max", &p.to_string()).ok()?;
        }
        if let Some(m) = limits.memory {
            write(&dir, "memory.max", &m.to_string()).ok()?;
        }
        if let Some(cpus) = limits.cpus {
            write(
                &dir,
                "cpu.max",
                &format!("{} {CPU_PERIOD_US}", cpus * CPU_PERIOD_US),
            )
            .ok()?;
        }
        Some(made)
    }

    /// The files a process writes its pid into to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Ends every process in it now (the cgroup stays).
    pub fn end_processes(&self) {
        for d in &self.dirs {
            kill_all(d);
        }
    }

    /// Its processes right now (of the first hierarchy).
    pub fn current_pids(&self) -> Option<u64> {
        let dir = self.dirs.first()?;
        std::fs::read_to_string(dir.join("pids.current"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }
}

/// Ends every process still in the cgroup at `dir`: what a sandbox leaves at its release
/// (a jail's init that outlived its bubblewrap, a job that left its command's group).
fn kill_all(dir: &Path) {
    // cgroup v2 (5.14+) does it in one write.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // ESRCH: it has just ended.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            kill_all(d);
            // Empty once its processes are gone.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Can this machine give a command its own limits?
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Cgroup::create(
            &format!("probe-{:08x}", rand::random::<u32>()),
            Limits {
                pids: Some(1_000_000),
                memory: None,
                cpus: None,
            },
        )
        .is_some()
    })
}
