//! `crabbox config`: the effective configuration, each value with where it came from
//! (a flag, an environment variable, a config file, or the built-in default), secrets
//! redacted, as `git config --show-origin` does.

use serde_json::json;

use super::Ctx;
use crate::cli::output::print_json;
use crate::cli::{Cli, CliError, exit};
use crate::config::redact_url;

/// A key present in a config file's YAML (dotted path; `idleTimeout` counts for
/// `idle_timeout`).
fn in_file(doc: &serde_yaml_ng::Value, key: &str) -> bool {
    let mut v = doc;
    for part in key.split('.') {
        let next = v.get(part).or_else(|| {
            (part == "idle_timeout")
                .then(|| v.get("idleTimeout"))
                .flatten()
        });
        match next {
            Some(n) => v = n,
            None => return false,
        }
    }
    true
}

fn set_env(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Which of the config's values were given as flags.
pub(super) struct Flags {
    pub provider: bool,
    pub snapshot: bool,
    pub target: bool,
    pub user: bool,
}

impl Flags {
    pub(super) fn of(cli: &Cli) -> Flags {
        Flags {
            provider: cli.provider.is_some(),
            snapshot: cli.daytona.daytona_snapshot.is_some(),
            target: cli.daytona.daytona_target.is_some(),
            user: cli.daytona.daytona_user.is_some(),
        }
    }
}

pub(super) fn show(ctx: &Ctx, cli: &Flags) -> Result<i32, CliError> {
    let s = &ctx.settings;
    let docs: Vec<(String, serde_yaml_ng::Value)> = s
        .sources
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            Some((
                p.display().to_string(),
                serde_yaml_ng::from_str(&text).ok()?,
            ))
        })
        .collect();
    let file_of = |key: &str| -> Option<String> {
        docs.iter()
            .rev()
            .find(|(_, d)| in_file(d, key))
            .map(|(p, _)| p.clone())
    };
    let dur = |d: Option<std::time::Duration>| d.map(|d| crate::clock::human_secs(d.as_secs()));
    let secret = |v: &Option<secrecy::SecretString>| v.as_ref().map(|_| "*** (set)".to_string());
    let d = &s.daytona;
    let flag = |given: bool, name: &str| given.then(|| format!("flag {name}"));
    // (key, value, env var, flag origin)
    type Row<'a> = (&'a str, Option<String>, Option<&'a str>, Option<String>);
    let rows: Vec<Row<'_>> = vec![
        (
            "provider",
            Some(s.provider.clone()),
            Some("CRABBOX_PROVIDER"),
            flag(cli.provider, "--provider"),
        ),
        // Unset, a lease gets the daemon's built-in defaults (SPEC: 90m, idle 30m).
        (
            "ttl",
            dur(s.ttl.or(Some(crate::config::DEFAULT_TTL))),
            Some("CRABBOX_TTL"),
            None,
        ),
        (
            "idle_timeout",
            dur(s.idle_timeout.or(Some(crate::config::DEFAULT_IDLE_TIMEOUT))),
            Some("CRABBOX_IDLE_TIMEOUT"),
            None,
        ),
        ("keep", Some(s.keep.to_string()), None, None),
        (
            "labels",
            (!s.labels.is_empty()).then(|| format!("{:?}", s.labels)),
            None,
            None,
        ),
        (
            "sync.exclude",
            (!s.sync.exclude.is_empty()).then(|| s.sync.exclude.join(", ")),
            None,
            None,
        ),
        (
            "sync.include",
            (!s.sync.include.is_empty()).then(|| s.sync.include.join(", ")),
            None,
            None,
        ),
        (
            "sync.delete_guard",
            Some(format!(
                "{}%",
                s.sync
                    .delete_guard
                    .unwrap_or(crate::config::DELETE_GUARD_DEFAULT)
            )),
            None,
            None,
        ),
        ("sync.git", Some(s.sync.git.to_string()), None, None),
        (
            "run.stall_timeout",
            Some(dur(s.stall_timeout).unwrap_or_else(|| "none".into())),
            None,
            None,
        ),
        (
            "daytona.snapshot",
            d.snapshot.clone(),
            Some("CRABBOX_DAYTONA_SNAPSHOT"),
            flag(cli.snapshot, "--daytona-snapshot"),
        ),
        (
            "daytona.target",
            d.target.clone(),
            Some("CRABBOX_DAYTONA_TARGET"),
            flag(cli.target, "--daytona-target"),
        ),
        (
            "daytona.user",
            d.user.clone(),
            Some("CRABBOX_DAYTONA_USER"),
            flag(cli.user, "--daytona-user"),
        ),
        (
            "daytona.apiUrl",
            d.api_url.clone(),
            Some("CRABBOX_DAYTONA_API_URL"),
            None,
        ),
        (
            "daytona.workRoot",
            d.work_root.clone(),
            Some("CRABBOX_DAYTONA_WORK_ROOT"),
            None,
        ),
        (
            "daytona.sshGatewayHost",
            d.ssh_gateway_host.clone(),
            Some("CRABBOX_DAYTONA_SSH_GATEWAY_HOST"),
            None,
        ),
        (
            "daytona.sshAccessMinutes",
            d.ssh_access_minutes.map(|m| m.to_string()),
            Some("CRABBOX_DAYTONA_SSH_ACCESS_MINUTES"),
            None,
        ),
        ("daytona.apiKey", secret(&d.api_key), None, None),
        ("daytona.jwtToken", secret(&d.jwt_token), None, None),
        (
            "environment",
            s.environment.as_ref().map(|_| "set".to_string()),
            None,
            None,
        ),
        (
            "pool",
            (!s.pools.is_empty()).then(|| {
                s.pools
                    .iter()
                    .map(|p| format!("{} (size {})", p.name, p.size))
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
            None,
            None,
        ),
        (
            "team.database_url",
            s.team.as_ref().map(|t| redact_url(&t.database_url)),
            Some("CRABBOX_TEAM_DATABASE_URL"),
            None,
        ),
        (
            "team.name",
            s.team.as_ref().map(|t| t.name.clone()),
            None,
            None,
        ),
        (
            "team.user",
            s.team.as_ref().map(|t| t.user.clone()),
            None,
            None,
        ),
    ];
    let mut out = Vec::new();
    for (key, value, env, by_flag) in rows {
        let origin = by_flag
            .or_else(|| env.filter(|e| set_env(e)).map(|e| format!("env {e}")))
            .or_else(|| file_of(key).map(|f| format!("file {f}")))
            .unwrap_or_else(|| "default".into());
        out.push((key, value, origin));
    }
    if ctx.json {
        print_json(&json!(
            out.iter()
                .map(|(k, v, o)| json!({"key": k, "value": v, "origin": o}))
                .collect::<Vec<_>>()
        ));
    } else {
        for (k, v, o) in &out {
            println!(
                "{k:<26} {:<40} {o}",
                v.clone().unwrap_or_else(|| "(unset)".into())
            );
        }
        if let Some(e) = &ctx.config_error {
            println!("\nthe config could not be used: {e}");
        }
    }
    Ok(if ctx.config_error.is_some() {
        exit::USAGE
    } else {
        exit::OK
    })
}
