//! Configuration and the places crabbox keeps things (SPEC "Places").
//!
//! Layers, lowest first: built-in defaults, `~/.config/crabbox/config.yaml`,
//! `<repo>/crabbox.yaml`, `<repo>/.crabbox.yaml` (`CRABBOX_CONFIG` replaces that list with
//! one file); then `CRABBOX_*` environment variables; then flags (applied by the CLI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A lease's lifetime and idle timeout when nothing sets them (SPEC: ttl 90m, idle 30m).
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 60);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The deletion guard's default: a sync that would delete more than this share (percent)
/// of a lease's files stops and asks for `--force-sync-delete`.
pub const DELETE_GUARD_DEFAULT: u32 = 50;

/// A configuration problem; the message names the file or variable and what to write.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `sync:` in config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub include: Vec<String>,
    /// Refuse a sync that would delete more than this percentage of the lease's files
    /// (1 to 100; 100 turns the guard off) [default: 50].
    #[serde(default)]
    pub delete_guard: Option<u32>,
    /// Sync the repository's `.git` too, for builds that run git (`git describe`).
    #[serde(default)]
    pub git: bool,
}

/// `daytona:` in config (camelCase, as SPEC writes it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DaytonaConfig {
    pub api_url: Option<String>,
    pub snapshot: Option<String>,
    pub target: Option<String>,
    pub user: Option<String>,
    pub work_root: Option<String>,
    pub ssh_gateway_host: Option<String>,
    pub ssh_access_minutes: Option<u32>,
    /// Credentials in a config file are accepted, below the environment (never
    /// `Debug`-printed: `SecretString`).
    pub api_key: Option<secrecy::SecretString>,
    pub jwt_token: Option<secrecy::SecretString>,
    pub organization_id: Option<String>,
}

/// `environment:` in config (SPEC "Environments").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    pub image: Option<ImageConfig>,
    #[serde(default)]
    pub resources: ResourcesConfig,
    pub network: Option<NetworkConfig>,
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `environment.image`: a Dockerfile's text, or a path to one (relative to the repo root).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub dockerfile: Option<String>,
    pub path: Option<String>,
}

/// `environment.resources`: `cpu: 4`, `memory: 8GB`, `disk: 20GB`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesConfig {
    pub cpu: Option<u32>,
    pub memory: Option<serde_yaml_ng::Value>,
    pub disk: Option<serde_yaml_ng::Value>,
}

/// `environment.network`: `allow_all`, `block`, or `cidr_allow_list` with `allow`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub mode: String,
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `environment.lifecycle`: `preserve` (keep), `auto_stop` (a duration).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    pub preserve: Option<bool>,
    pub auto_stop: Option<String>,
}

/// Whole gigabytes from what people write: `8`, `"8"` (gigabytes), `"8GB"`, `"8gb"`,
/// `"8 GiB"`, `"8192MiB"`, `"1.5TB"`... (the `bytesize` crate); a size that is not a whole
/// number of gigabytes is refused saying what it is (Daytona sizes sandboxes in whole GB).
pub fn parse_gb(v: &serde_yaml_ng::Value, what: &str) -> Result<u32, ConfigError> {
    let bad = |why: String| {
        ConfigError(format!(
            "environment.resources.{what}: {why}; write a whole number of gigabytes, like 8GB"
        ))
    };
    let text = match v {
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        serde_yaml_ng::Value::String(s) => s.trim().to_string(),
        other => return Err(bad(format!("{other:?} is not a size"))),
    };
    // A bare number is gigabytes (as before); anything else has its unit.
    let gb = if let Ok(n) = text.parse::<u64>() {
        n as f64
    } else {
        let bytes = text
            .parse::<bytesize::ByteSize>()
            .map_err(|e| bad(format!("{text:?} is not a size ({e})")))?
            .as_u64() as f64;
        let decimal = bytes / 1e9;
        let binary = bytes / (1u64 << 30) as f64;
        // 8GB and 8GiB both mean 8 to a person sizing a sandbox.
        if (decimal - decimal.round()).abs() < 1e-9 {
            decimal.round()
        } else if (binary - binary.round()).abs() < 1e-9 {
            binary.round()
        } else {
            return Err(bad(format!("{text:?} is {binary:.2} GiB")));
        }
    };
    if gb < 1.0 || gb > f64::from(u32::MAX) {
        return Err(bad(format!("{text:?} is not at least 1 GB")));
    }
    Ok(gb as u32)
}

impl EnvironmentConfig {
    /// The provider options this environment asks for (Daytona's). `repo_root` resolves
    /// `image.path`.
    pub fn provider_options(
        &self,
        repo_root: Option<&Path>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut o = BTreeMap::new();
        if let Some(image) = &self.image {
            let text = match (&image.dockerfile, &image.path) {
                (Some(t), None) => t.clone(),
                (None, Some(p)) => {
                    let full = match repo_root {
                        Some(root) if Path::new(p).is_relative() => root.join(p),
                        _ => PathBuf::from(p),
                    };
                    std::fs::read_to_string(&full).map_err(|e| {
                        ConfigError(format!(
                            "environment.image.path: cannot read {}: {e}",
                            full.display()
                        ))
                    })?
                }
                _ => {
                    return Err(ConfigError(
                        "environment.image: give exactly one of dockerfile (its text) or path"
                            .into(),
                    ));
                }
            };
            if text.trim().is_empty() {
                return Err(ConfigError(
                    "environment.image: the Dockerfile is empty".into(),
                ));
            }
            o.insert("dockerfile".into(), text);
        }
        if let Some(cpu) = self.resources.cpu {
            o.insert("cpu".into(), cpu.to_string());
        }
        if let Some(m) = &self.resources.memory {
            o.insert("memory".into(), parse_gb(m, "memory")?.to_string());
        }
        if let Some(d) = &self.resources.disk {
            o.insert("disk".into(), parse_gb(d, "disk")?.to_string());
        }
        if let Some(n) = &self.network {
            match n.mode.as_str() {
                "allow_all" => {}
                "block" => {
                    o.insert("network_block_all".into(), "true".into());
                }
                "cidr_allow_list" => {
                    if n.allow.is_empty() || n.allow.iter().any(|c| !looks_like_cidr(c)) {
                        return Err(ConfigError(format!(
                            "environment.network.allow: {:?} must be CIDRs like 10.0.0.0/8",
                            n.allow
                        )));
                    }
                    o.insert("network_allow_list".into(), n.allow.join(","));
                }
                other => {
                    return Err(ConfigError(format!(
                        "environment.network.mode: {other:?} is not allow_all, block or cidr_allow_list"
                    )));
                }
            }
        }
        if let Some(a) = &self.lifecycle.auto_stop {
            let d = parse_duration(a)
                .map_err(|e| ConfigError(format!("environment.lifecycle.auto_stop: {e}")))?;
            o.insert(
                "auto_stop_minutes".into(),
                d.as_secs().div_ceil(60).to_string(),
            );
        }
        Ok(o)
    }
}

/// `ADDR/BITS` with a real address and a prefix that fits it (IPv4 at most 32, IPv6 at
/// most 128).
fn looks_like_cidr(c: &str) -> bool {
    let Some((ip, bits)) = c.split_once('/') else {
        return false;
    };
    let Ok(bits) = bits.parse::<u8>() else {
        return false;
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => bits <= 32,
        Ok(std::net::IpAddr::V6(_)) => bits <= 128,
        Err(_) => false,
    }
}

/// One config file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    pub provider: Option<String>,
    pub ttl: Option<String>,
    /// Also spelled `idleTimeout` (see `ALIASES`).
    pub idle_timeout: Option<String>,
    pub keep: Option<bool>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub daytona: DaytonaConfig,
    /// An image built on demand (Daytona: a snapshot made from a Dockerfile).
    pub environment: Option<EnvironmentConfig>,
    #[serde(default)]
    pub run: RunConfig,
    /// Warm pools, kept by the daemon (read from the daemon's own config file).
    #[serde(default)]
    pub pool: Vec<PoolConfig>,
    /// Team mode: a registry shared by every daemon of a team, on PostgreSQL.
    pub team: Option<TeamConfig>,
    /// The local provider's jail (read by the daemon from its own config).
    #[serde(default)]
    pub local: LocalConfig,
}

/// `local:`: how the local provider isolates commands.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// `jail` (the default: bubblewrap) or `none` (unjailed; every run says so).
    pub isolation: Option<String>,
    /// Host paths the jail shows its commands, read-only (`PATH:rw` for writable); the
    /// user's home is otherwise hidden.
    #[serde(default)]
    pub mounts: Vec<String>,
    /// Processes a local command may have at once (a cgroup's pids limit, where the
    /// machine lets the daemon make one) [default: 4096].
    pub max_processes: Option<u64>,
}

/// `team:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// `postgres://user:password@host:5432/db?sslmode=require` (or
    /// `CRABBOX_TEAM_DATABASE_URL`). A secret: never printed with its password.
    pub database_url: Option<secrecy::SecretString>,
    /// The team's name: daemons of one team share leases, quotas and the reaper.
    pub name: Option<String>,
    /// Who this daemon's leases belong to in the team view [default: $USER].
    pub user: Option<String>,
    /// A PEM file of CA certificates to trust for the database (besides the system's).
    pub ca_file: Option<String>,
    #[serde(default)]
    pub quota: QuotaConfig,
    /// How long a daemon may be silent before the reaper releases its leases even within
    /// their expiry [default: 2h].
    pub orphan_grace: Option<String>,
    /// How often a daemon says it is alive [default: 5s].
    pub heartbeat: Option<String>,
    /// When the database cannot be reached, refuse new leases under quotas (true, the
    /// default) or make them anyway, with a warning, and mirror them later (false).
    pub required: Option<bool>,
}

/// `team.quota:`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// The team's live sandboxes at most.
    pub sandboxes: Option<u32>,
    /// Each user's live sandboxes at most.
    pub per_user: Option<u32>,
}

/// Team mode, resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct TeamSettings {
    pub database_url: String,
    pub name: String,
    pub user: String,
    pub ca_file: Option<PathBuf>,
    pub quota: QuotaConfig,
    pub orphan_grace: Duration,
    pub heartbeat: Duration,
    pub required: bool,
}

impl std::fmt::Debug for TeamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamSettings")
            .field("database_url", &redact_url(&self.database_url))
            .field("name", &self.name)
            .field("user", &self.user)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

/// A database URL with its password (and any `password=` parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, "***");
            }
        }
    }
    if let Some(i) = out.find("password=") {
        let start = i + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |j| start + j);
        out.replace_range(start..end, "***");
    }
    out
}

fn resolve_team(team: Option<TeamConfig>) -> Result<Option<TeamSettings>, ConfigError> {
    let env_url = non_empty_env("CRABBOX_TEAM_DATABASE_URL");
    let Some(mut t) = team.or_else(|| env_url.as_ref().map(|_| TeamConfig::default())) else {
        return Ok(None);
    };
    if let Some(url) = env_url {
        t.database_url = Some(url.into());
    }
    let Some(url) = t
        .database_url
        .map(|u| secrecy::ExposeSecret::expose_secret(&u).to_string())
        .filter(|u| !u.is_empty())
    else {
        return Err(ConfigError(
            "config team: needs database_url (postgres://user:password@host/db), or \
             CRABBOX_TEAM_DATABASE_URL"
                .into(),
        ));
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError(format!(
            "config team.database_url {} is not a postgres:// URL",
            redact_url(&url)
        )));
    }
    let name = t.name.unwrap_or_else(|| "default".into());
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ConfigError(format!(
            "config team.name {name:?}: use 1-63 letters, digits, '-', '_' or '.'"
        )));
    }
    let user = t
        .user
        .or_else(|| non_empty_env("USER"))
        .unwrap_or_else(|| "unknown".into());
    let dur = |v: Option<String>, what: &str, default: u64| -> Result<Duration, ConfigError> {
        match v {
            Some(s) => {
                parse_duration(&s).map_err(|e| ConfigError(format!("config team.{what}: {e}")))
            }
            None => Ok(Duration::from_secs(default)),
        }
    };
    for (what, v) in [
        ("sandboxes", t.quota.sandboxes),
        ("per_user", t.quota.per_user),
    ] {
        if v == Some(0) {
            return Err(ConfigError(format!(
                "config team.quota.{what} is 0: that allows nothing; leave it out for no limit"
            )));
        }
    }
    Ok(Some(TeamSettings {
        database_url: url,
        name,
        user,
        ca_file: t.ca_file.map(|p| expand_home(&p)),
        quota: t.quota,
        orphan_grace: dur(t.orphan_grace, "orphan_grace", 2 * 3600)?,
        heartbeat: dur(t.heartbeat, "heartbeat", 5)?,
        required: t.required.unwrap_or(true),
    }))
}

/// One `pool:` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Defaults to the provider's name (then `-2`, `-3`... when taken).
    pub name: Option<String>,
    /// Defaults to the config's provider.
    pub provider: Option<String>,
    /// Started sandboxes to keep ready.
    pub size: u32,
    /// The most sandboxes the pool holds at once, ready or being made [default: size].
    pub max: Option<u32>,
    /// A pooled sandbox older than this is replaced [default: 30m].
    pub idle_ttl: Option<String>,
    /// Daytona: the sandbox's snapshot, target and user (default: `daytona:`'s).
    pub snapshot: Option<String>,
    pub target: Option<String>,
    pub user: Option<String>,
    /// Daytona: an image and resources, as `environment:` writes them.
    pub environment: Option<EnvironmentConfig>,
    /// Checkouts given in advance to pooled sandboxes, so a fresh run sends only what
    /// changed since.
    #[serde(default)]
    pub repos: Vec<String>,
}

/// A warm pool, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub name: String,
    pub provider: String,
    pub size: u32,
    pub max: u32,
    pub idle_ttl: Duration,
    /// The provider options of its sandboxes: a fresh lease asking exactly these (and this
    /// provider) takes one.
    pub options: BTreeMap<String, String>,
    pub repos: Vec<PathBuf>,
}

/// The largest pool the daemon keeps.
pub const MAX_POOL: u32 = 100;

fn resolve_pools(
    pools: Vec<PoolConfig>,
    provider: &str,
    daytona: &DaytonaConfig,
) -> Result<Vec<PoolSettings>, ConfigError> {
    let mut out: Vec<PoolSettings> = Vec::new();
    for (i, p) in pools.into_iter().enumerate() {
        let at = |what: &str| format!("config pool[{i}]{what}");
        let provider = p.provider.unwrap_or_else(|| provider.to_string());
        let name = match p.name {
            Some(n) => {
                let ok = !n.is_empty()
                    && n.len() <= 63
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(ConfigError(format!(
                        "{}: {n:?} is not a pool name: use 1-63 letters, digits, '-', '_' or '.'",
                        at(".name")
                    )));
                }
                if out.iter().any(|o| o.name == n) {
                    return Err(ConfigError(format!(
                        "{}: two pools are named {n:?}; give each its own name",
                        at(".name")
                    )));
                }
                n
            }
            None => {
                let mut n = provider.clone();
                let mut k = 2;
                while out.iter().any(|o| o.name == n) {
                    n = format!("{provider}-{k}");
                    k += 1;
                }
                n
            }
        };
        let max = p.max.unwrap_or(p.size);
        if max < p.size || max > MAX_POOL {
            return Err(ConfigError(format!(
                "{}: max is {max} with size {}: max must be at least size and at most {MAX_POOL}",
                at(".max"),
                p.size
            )));
        }
        let idle_ttl = match p.idle_ttl {
            Some(t) => {
                parse_duration(&t).map_err(|e| ConfigError(format!("{}: {e}", at(".idle_ttl"))))?
            }
            None => Duration::from_secs(30 * 60),
        };
        if idle_ttl < Duration::from_secs(60) || idle_ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(ConfigError(format!(
                "{}: write a duration from 1m to 30d (how long a pooled sandbox may wait)",
                at(".idle_ttl")
            )));
        }
        let mut options = BTreeMap::new();
        let daytona_only = [
            ("snapshot", p.snapshot.is_some()),
            ("target", p.target.is_some()),
            ("user", p.user.is_some()),
            ("environment", p.environment.is_some()),
        ];
        if provider == "daytona" {
            for (k, v) in [
                ("snapshot", p.snapshot.or_else(|| daytona.snapshot.clone())),
                ("target", p.target.or_else(|| daytona.target.clone())),
                ("user", p.user.or_else(|| daytona.user.clone())),
            ] {
                if let Some(v) = v {
                    options.insert(k.to_string(), v);
                }
            }
            if let Some(env) = &p.environment {
                let extra = env
                    .provider_options(None)
                    .map_err(|e| ConfigError(format!("{}: {e}", at(".environment"))))?;
                if extra.contains_key("dockerfile") && options.contains_key("snapshot") {
                    return Err(ConfigError(format!(
                        "{}: snapshot and environment.image both choose the image: keep one",
                        at("")
                    )));
                }
                options.extend(extra);
            }
        } else if let Some((key, _)) = daytona_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError(format!(
                "{}: {key} applies to daytona pools; a {provider} pool's sandboxes are made as \
                 its provider makes them (remove {key}, or set provider: daytona)",
                at("")
            )));
        }
        let mut repos = Vec::new();
        for r in p.repos {
            let path = expand_home(&r);
            if !path.is_absolute() {
                return Err(ConfigError(format!(
                    "{}: {r:?} is not an absolute path (write the repository's full path, or ~/...)",
                    at(".repos")
                )));
            }
            repos.push(path);
        }
        out.push(PoolSettings {
            name,
            provider,
            size: p.size,
            max,
            idle_ttl,
            options,
            repos,
        });
    }
    Ok(out)
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// `run:` in config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Stop a command that prints nothing for this long (`30m`); off when unset.
    pub stall_timeout: Option<String>,
}

/// The resolved settings a CLI command works with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub provider: String,
    pub ttl: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub keep: bool,
    pub labels: BTreeMap<String, String>,
    pub sync: SyncConfig,
    pub daytona: DaytonaConfig,
    pub environment: Option<EnvironmentConfig>,
    /// `run.stall_timeout`.
    pub stall_timeout: Option<Duration>,
    /// `pool:`: the warm pools (the daemon keeps them; a CLI only says when a repo's file
    /// has some, since those are not read from there).
    pub pools: Vec<PoolSettings>,
    /// `team:`: team mode (the daemon's).
    pub team: Option<TeamSettings>,
    /// `local:` (the daemon's).
    pub local: LocalConfig,
    /// Repo config files with `pool:` entries: pools are the daemon's, read from its own
    /// config, so a CLI says these are not used.
    pub ignored_pools: Vec<PathBuf>,
    /// Keys of a repo's config files that only the daemon reads (from its own config, when
    /// it starts): a CLI says they are not used from there.
    pub ignored_daemon_keys: Vec<(PathBuf, &'static str)>,
    /// The files that were read, lowest first.
    pub sources: Vec<PathBuf>,
}

impl Settings {
    /// Built-in defaults only, for commands that go on when the config cannot be read.
    pub fn fallback() -> Settings {
        Settings {
            provider: "local".into(),
            ttl: None,
            idle_timeout: None,
            keep: false,
            labels: BTreeMap::new(),
            sync: SyncConfig::default(),
            daytona: DaytonaConfig::default(),
            environment: None,
            stall_timeout: None,
            pools: Vec::new(),
            team: None,
            local: LocalConfig::default(),
            ignored_pools: Vec::new(),
            ignored_daemon_keys: Vec::new(),
            sources: Vec::new(),
        }
    }
}

/// Spellings a config file may use for a key, besides its own: they are renamed before the
/// layers are merged, so `idle_timeout` in one file and `idleTimeout` in another are one key.
const ALIASES: [(&str, &str); 1] = [("idleTimeout", "idle_timeout")];

/// Renames the aliased top-level keys of one file to their own names; a file that spells
/// one key both ways is refused.
fn normalize_aliases(value: &mut serde_yaml_ng::Value, path: &Path) -> Result<(), ConfigError> {
    let serde_yaml_ng::Value::Mapping(map) = value else {
        return Ok(());
    };
    for (alias, key) in ALIASES {
        if let Some(v) = map.remove(alias) {
            if map.contains_key(key) {
                return Err(ConfigError(format!(
                    "config {}: both {key} and {alias} are set; keep one",
                    path.display()
                )));
            }
            map.insert(serde_yaml_ng::Value::String(key.into()), v);
        }
    }
    Ok(())
}

/// The providers crabbox knows.
pub const PROVIDERS: [&str; 2] = ["local", "daytona"];

/// The daemon's socket: `$CRABBOX_SOCKET`, else `$XDG_RUNTIME_DIR/crabbox/crabboxd.sock`,
/// else `/tmp/crabbox-<uid>/crabboxd.sock`.
pub fn socket_path() -> PathBuf {
    if let Some(p) = non_empty_env("CRABBOX_SOCKET") {
        return PathBuf::from(p);
    }
    if let Some(dir) = non_empty_env("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("crabbox").join("crabboxd.sock");
    }
    PathBuf::from(format!("/tmp/crabbox-{}", nix::unistd::getuid())).join("crabboxd.sock")
}

/// The state dir: `$CRABBOX_STATE_DIR`, else `$XDG_STATE_HOME/crabbox`, else
/// `~/.local/state/crabbox`.
pub fn state_dir() -> PathBuf {
    if let Some(p) = non_empty_env("CRABBOX_STATE_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = non_empty_env("XDG_STATE_HOME") {
        return Path::new(&p).join("crabbox");
    }
    home().join(".local/state/crabbox")
}

fn home() -> PathBuf {
    non_empty_env("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The longest duration any flag, variable or config key takes.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `90s`, `30m`, `2h`, `1h30m`. Zero, garbage and more than a year are refused with
/// the forms that work.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        // timeout(1) takes a bare number as seconds; crabbox asks for the unit.
        return Err(format!(
            "invalid duration {s:?}: a bare number has no unit; write {t}s for seconds (or {t}m, {t}h)"
        ));
    }
    let d = humantime::parse_duration(t).map_err(|_| {
        format!("invalid duration {s:?}: use a number with a unit, like 90s, 30m, 2h or 1h30m")
    })?;
    if d.is_zero() {
        return Err(format!(
            "invalid duration {s:?}: it must be longer than zero"
        ));
    }
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {s:?}: at most {}",
            crate::clock::human_secs(MAX_DURATION.as_secs())
        ));
    }
    Ok(d)
}

/// The config files to read for a repo, lowest first, and whether each must exist.
pub fn config_files(repo_root: Option<&Path>) -> Vec<(PathBuf, bool)> {
    if let Some(one) = non_empty_env("CRABBOX_CONFIG") {
        return vec![(PathBuf::from(one), true)];
    }
    let config_home = non_empty_env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"));
    let mut files = vec![(config_home.join("crabbox/config.yaml"), false)];
    if let Some(root) = repo_root {
        files.push((root.join("crabbox.yaml"), false));
        files.push((root.join(".crabbox.yaml"), false));
    }
    files
}

/// Reads and merges the config files, then applies `CRABBOX_*` environment variables.
pub fn load(repo_root: Option<&Path>) -> Result<Settings, ConfigError> {
    let mut merged = serde_yaml_ng::Value::Mapping(Default::default());
    let mut sources = Vec::new();
    let mut ignored_pools = Vec::new();
    let mut ignored_daemon_keys = Vec::new();
    for (path, required) in config_files(repo_root) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
            Err(e) => {
                return Err(ConfigError(format!(
                    "cannot read config {}: {e}{}",
                    path.display(),
                    if required {
                        " (named by CRABBOX_CONFIG)"
                    } else {
                        ""
                    }
                )));
            }
        };
        let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| {
            ConfigError(format!("config {} is not valid YAML: {e}", path.display()))
        })?;
        normalize_aliases(&mut value, &path)?;
        if value.is_null() {
            continue;
        }
        // Check this file alone, so the error names it.
        let alone = serde_yaml_ng::from_value::<FileConfig>(value.clone())
            .map_err(|e| ConfigError(format!("config {}: {e}", path.display())))?;
        let in_repo = repo_root.is_some_and(|root| path.starts_with(root));
        if !alone.pool.is_empty() && in_repo {
            ignored_pools.push(path.clone());
        }
        if in_repo {
            let d = &alone.daytona;
            for (key, set) in [
                ("daytona.apiUrl", d.api_url.is_some()),
                ("daytona.workRoot", d.work_root.is_some()),
                ("daytona.sshGatewayHost", d.ssh_gateway_host.is_some()),
                ("daytona.sshAccessMinutes", d.ssh_access_minutes.is_some()),
                ("daytona.apiKey", d.api_key.is_some()),
                ("daytona.jwtToken", d.jwt_token.is_some()),
                ("daytona.organizationId", d.organization_id.is_some()),
                ("team", alone.team.is_some()),
                ("local", alone.local != LocalConfig::default()),
            ] {
                if set {
                    ignored_daemon_keys.push((path.clone(), key));
                }
            }
        }
        merge(&mut merged, value);
        sources.push(path);
    }
    let file: FileConfig =
        serde_yaml_ng::from_value(merged).map_err(|e| ConfigError(format!("config: {e}")))?;
    let mut s = from_file(file, sources)?;
    s.ignored_pools = ignored_pools;
    s.ignored_daemon_keys = ignored_daemon_keys;
    Ok(s)
}

fn from_file(file: FileConfig, sources: Vec<PathBuf>) -> Result<Settings, ConfigError> {
    let dur = |v: Option<String>, what: &str| -> Result<Option<Duration>, ConfigError> {
        v.map(|s| parse_duration(&s).map_err(|e| ConfigError(format!("{what}: {e}"))))
            .transpose()
    };
    let mut s = Settings {
        provider: file.provider.unwrap_or_else(|| "local".into()),
        ttl: dur(file.ttl, "config ttl")?,
        idle_timeout: dur(file.idle_timeout, "config idle_timeout")?,
        keep: file.keep.unwrap_or(false),
        labels: file.labels,
        sync: {
            if let Some(p) = file.sync.delete_guard
                && !(1..=100).contains(&p)
            {
                return Err(ConfigError(format!(
                    "config sync.delete_guard is {p}: write a percentage from 1 to 100 (the \
                     largest share of a lease's files one sync may delete; 100 turns the \
                     guard off)"
                )));
            }
            file.sync
        },
        daytona: file.daytona,
        environment: file.environment,
        stall_timeout: dur(file.run.stall_timeout, "config run.stall_timeout")?,
        pools: Vec::new(),
        team: None,
        local: file.local,
        ignored_pools: Vec::new(),
        ignored_daemon_keys: Vec::new(),
        sources,
    };
    if let Some(p) = non_empty_env("CRABBOX_PROVIDER") {
        s.provider = p;
    }
    if let Some(v) = non_empty_env("CRABBOX_TTL") {
        s.ttl = Some(parse_duration(&v).map_err(|e| ConfigError(format!("CRABBOX_TTL: {e}")))?);
    }
    if let Some(v) = non_empty_env("CRABBOX_IDLE_TIMEOUT") {
        s.idle_timeout = Some(
            parse_duration(&v).map_err(|e| ConfigError(format!("CRABBOX_IDLE_TIMEOUT: {e}")))?,
        );
    }
    let d = &mut s.daytona;
    for (key, slot) in [
        ("CRABBOX_DAYTONA_API_URL", &mut d.api_url),
        ("CRABBOX_DAYTONA_SNAPSHOT", &mut d.snapshot),
        ("CRABBOX_DAYTONA_TARGET", &mut d.target),
        ("CRABBOX_DAYTONA_USER", &mut d.user),
        ("CRABBOX_DAYTONA_WORK_ROOT", &mut d.work_root),
        ("CRABBOX_DAYTONA_SSH_GATEWAY_HOST", &mut d.ssh_gateway_host),
    ] {
        if let Some(v) = non_empty_env(key) {
            *slot = Some(v);
        }
    }
    if let Some(v) = non_empty_env("CRABBOX_DAYTONA_SSH_ACCESS_MINUTES") {
        d.ssh_access_minutes = Some(v.parse().map_err(|_| {
            ConfigError(format!(
                "CRABBOX_DAYTONA_SSH_ACCESS_MINUTES: {v:?} is not a whole number of minutes"
            ))
        })?);
    }
    check_provider(&s.provider)?;
    s.pools = resolve_pools(file.pool, &s.provider, &s.daytona)?;
    s.team = resolve_team(file.team)?;
    for p in &s.pools {
        check_provider(&p.provider)
            .map_err(|e| ConfigError(format!("config pool {:?}: {e}", p.name)))?;
    }
    Ok(s)
}

/// Refuses a provider name crabbox does not know.
pub fn check_provider(name: &str) -> Result<(), ConfigError> {
    if PROVIDERS.contains(&name) {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "unknown provider {name:?}: use one of {}",
            PROVIDERS.join(", ")
        )))
    }
}

/// Deep-merges `over` into `base`: mappings merge key by key, everything else replaces.
fn merge(base: &mut serde_yaml_ng::Value, over: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_a_config_never_reach_its_debug_form() {
        let yaml = "daytona:\n  apiKey: dtn_secret_key_1234\n  jwtToken: eyJ.secret.jwt\n  \
                    organizationId: org\nteam:\n  database_url: postgres://u:pg_secret_pw@h/db\n  \
                    name: core\n";
        let file: FileConfig = serde_yaml_ng::from_str(yaml).expect("parses");
        let text = format!("{file:?}");
        for secret in ["dtn_secret_key_1234", "eyJ.secret.jwt", "pg_secret_pw"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("REDACTED"), "{text}");
        let team = resolve_team(file.team).expect("resolves").expect("team");
        assert!(!format!("{team:?}").contains("pg_secret_pw"));
        assert!(
            team.database_url.contains("pg_secret_pw"),
            "kept for connecting"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "abc", "10", "0s", "-5m", "100000000h", "366d"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("invalid duration"), "{e}");
        }
        let e = parse_duration("30").expect_err("bare");
        assert!(e.contains("write 30s for seconds"), "{e}");
        assert_eq!(parse_duration("365d"), Ok(MAX_DURATION));
    }

    #[test]
    fn aliases_are_one_key_across_layers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut user: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("idle_timeout: 10m\n").expect("yaml");
        let mut repo: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("idleTimeout: 7m\n").expect("yaml");
        normalize_aliases(&mut user, dir.path()).expect("user");
        normalize_aliases(&mut repo, dir.path()).expect("repo");
        merge(&mut user, repo);
        let f: FileConfig = serde_yaml_ng::from_value(user).expect("one key, the later wins");
        assert_eq!(f.idle_timeout.as_deref(), Some("7m"));
        let mut both: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("idle_timeout: 1m\nidleTimeout: 2m\n").expect("yaml");
        let e = normalize_aliases(&mut both, dir.path()).expect_err("both spellings in one file");
        assert!(e.0.contains("keep one"), "{}", e.0);
    }

    fn pools(yaml: &str) -> Result<Vec<PoolSettings>, String> {
        let f: FileConfig = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        let daytona = DaytonaConfig {
            snapshot: Some("base".into()),
            ..Default::default()
        };
        resolve_pools(f.pool, "local", &daytona).map_err(|e| e.0)
    }

    #[test]
    fn pools_resolve_with_defaults_and_refuse_what_cannot_work() {
        let p = pools(
            "pool:\n  - size: 2\n  - provider: daytona\n    size: 1\n    max: 3\n    idle_ttl: 10m\n    \
             target: eu\n    repos: [/src/app]\n  - size: 0\n",
        )
        .expect("pools");
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].name.as_str(), p[0].provider.as_str()),
            ("local", "local")
        );
        assert_eq!((p[0].size, p[0].max), (2, 2));
        assert_eq!(p[0].idle_ttl, Duration::from_secs(1800));
        assert!(p[0].options.is_empty());
        assert_eq!(p[1].name, "daytona");
        assert_eq!(p[1].idle_ttl, Duration::from_secs(600));
        assert_eq!(
            p[1].options,
            BTreeMap::from([
                ("snapshot".to_string(), "base".to_string()),
                ("target".to_string(), "eu".to_string())
            ]),
            "the daytona: defaults fill what the entry does not say"
        );
        assert_eq!(p[1].repos, vec![PathBuf::from("/src/app")]);
        assert_eq!(p[2].name, "local-2", "names stay unique");
        for (yaml, says) in [
            (
                "pool:\n  - size: 3\n    max: 2\n",
                "max must be at least size",
            ),
            ("pool:\n  - size: 1\n    max: 1000\n", "at most 100"),
            ("pool:\n  - size: 1\n    idle_ttl: 10s\n", "from 1m to 30d"),
            ("pool:\n  - size: 1\n    idle_ttl: soon\n", "idle_ttl"),
            (
                "pool:\n  - size: 1\n    snapshot: x\n",
                "snapshot applies to daytona pools",
            ),
            (
                "pool:\n  - size: 1\n    repos: [src/app]\n",
                "not an absolute path",
            ),
            (
                "pool:\n  - name: a\n    size: 1\n  - name: a\n    size: 1\n",
                "two pools are named",
            ),
            ("pool:\n  - name: \"a b\"\n    size: 1\n", "not a pool name"),
            ("pool:\n  - size: 1\n    sise: 2\n", "unknown field `sise`"),
            ("pool:\n  - max: 2\n", "missing field `size`"),
        ] {
            let e = pools(yaml).expect_err(yaml);
            assert!(e.contains(says), "{yaml}: {e}");
        }
    }

    #[test]
    fn sizes_are_what_people_write() {
        let gb = |y: &str| parse_gb(&serde_yaml_ng::from_str(y).expect("yaml"), "memory");
        for (y, want) in [
            ("8", 8),
            ("\"8\"", 8),
            ("8GB", 8),
            ("8gb", 8),
            ("8 GiB", 8),
            ("8192MiB", 8),
            ("2TB", 2000),
            ("1.5TB", 1500),
        ] {
            assert_eq!(gb(y).expect(y), want, "{y}");
        }
        for (y, says) in [
            ("512MiB", "0.50 GiB"),
            ("1.5 GB", "1.40 GiB"),
            ("0", "at least 1 GB"),
            ("lots", "not a size"),
            ("[8]", "not a size"),
        ] {
            let e = gb(y).expect_err(y).0;
            assert!(
                e.contains(says) && e.contains("whole number of gigabytes"),
                "{y}: {e}"
            );
        }
    }

    #[test]
    fn cidrs_are_parsed_for_real() {
        for good in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.168.1.1/32",
            "fd00::/8",
            "::1/128",
        ] {
            assert!(looks_like_cidr(good), "{good}");
        }
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0",
            "10.0.0/8",
            "fd00::/129",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(!looks_like_cidr(bad), "{bad}");
        }
    }

    #[test]
    fn merge_is_deep() {
        let mut a: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("sync: {exclude: [a]}\ndaytona: {snapshot: s1, user: u}\n")
                .expect("yaml");
        let b: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("daytona: {snapshot: s2}\nprovider: daytona\n").expect("yaml");
        merge(&mut a, b);
        let f: FileConfig = serde_yaml_ng::from_value(a).expect("config");
        assert_eq!(f.daytona.snapshot.as_deref(), Some("s2"));
        assert_eq!(f.daytona.user.as_deref(), Some("u"));
        assert_eq!(f.sync.exclude, vec!["a"]);
        assert_eq!(f.provider.as_deref(), Some("daytona"));
    }

    #[test]
    fn environments() {
        let env: EnvironmentConfig = serde_yaml_ng::from_str(
            "image: { dockerfile: \"FROM x:1\" }\nresources: { cpu: 4, memory: 8GB, disk: \"20GiB\" }\n\
             network: { mode: block }\nlifecycle: { auto_stop: 90m }\n",
        )
        .expect("yaml");
        let o = env.provider_options(None).expect("options");
        assert_eq!(o["dockerfile"], "FROM x:1");
        assert_eq!(
            (o["cpu"].as_str(), o["memory"].as_str(), o["disk"].as_str()),
            ("4", "8", "20")
        );
        assert_eq!(o["network_block_all"], "true");
        assert_eq!(o["auto_stop_minutes"], "90");
        for bad in [
            "image: { dockerfile: a, path: b }",
            "image: {}",
            "resources: { memory: lots }",
            "network: { mode: cidr_allow_list, allow: [\"not-a-cidr\"] }",
            "network: { mode: sometimes }",
            "lifecycle: { auto_stop: soon }",
        ] {
            let env: EnvironmentConfig = serde_yaml_ng::from_str(bad).expect("yaml");
            assert!(env.provider_options(None).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("Dockerfile"), "FROM y:2\n").expect("write");
        let env: EnvironmentConfig =
            serde_yaml_ng::from_str("image: { path: Dockerfile }").expect("yaml");
        assert_eq!(
            env.provider_options(Some(dir.path())).expect("options")["dockerfile"],
            "FROM y:2\n"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str("provder: local\n").expect("yaml");
        let e = serde_yaml_ng::from_value::<FileConfig>(v).expect_err("typo");
        assert!(e.to_string().contains("provder"), "{e}");
    }
}
