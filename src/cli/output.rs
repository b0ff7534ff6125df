//! Rendering for people (text) and programs (`--json`, `-o json|yaml`: one document on
//! stdout).

use std::sync::OnceLock;

use serde_json::Value;

use super::OutputFormat;

/// The format documents are printed in, chosen once by the command line.
static FORMAT: OnceLock<OutputFormat> = OnceLock::new();

/// Sets the format of [`print_json`]'s documents (the first call wins).
pub fn set_format(f: OutputFormat) {
    let _ = FORMAT.set(f);
}

fn yaml() -> bool {
    FORMAT.get() == Some(&OutputFormat::Yaml)
}

use crate::clock::rfc3339;
use crate::pb;
use crate::pb::timestamp_ms;

/// The lowercase state name of a wire lease.
pub fn state_name(l: &pb::Lease) -> &'static str {
    match pb::LeaseState::try_from(l.state).unwrap_or(pb::LeaseState::Unspecified) {
        pb::LeaseState::Pending => "pending",
        pb::LeaseState::Creating => "creating",
        pb::LeaseState::Ready => "ready",
        pb::LeaseState::Syncing => "syncing",
        pb::LeaseState::Running => "running",
        pb::LeaseState::Stopped => "stopped",
        pb::LeaseState::Releasing => "releasing",
        pb::LeaseState::Released => "released",
        pb::LeaseState::Failed => "failed",
        pb::LeaseState::Pooled => "pooled",
        pb::LeaseState::Unspecified => "unknown",
    }
}

/// SPEC's `--json` lease object (plus a few extra fields). Fields in alphabetical order:
/// the same document as a JSON map of them.
#[derive(serde::Serialize)]
pub struct LeaseOut<'a> {
    /// crabbox's bookkeeping labels on the sandbox, without `state` (the lease's state is
    /// `state`, never a stale copy).
    crabbox_labels: std::collections::BTreeMap<&'a str, &'a str>,
    created_at: String,
    expires_at: String,
    id: &'a str,
    idle_timeout_secs: u64,
    keep: bool,
    /// The user's labels.
    labels: std::collections::BTreeMap<&'a str, &'a str>,
    last_touched_at: String,
    provider: &'a str,
    reason: Option<&'a str>,
    repo_root: Option<&'a str>,
    sandbox_id: Option<&'a str>,
    sandbox_name: &'a str,
    slug: &'a str,
    state: &'static str,
    ttl_secs: u64,
    work_root: &'a str,
}

impl<'a> From<&'a pb::Lease> for LeaseOut<'a> {
    fn from(l: &'a pb::Lease) -> Self {
        let opt = |s: &'a str| (!s.is_empty()).then_some(s);
        LeaseOut {
            created_at: rfc3339(timestamp_ms(l.created_at.as_ref())),
            expires_at: rfc3339(timestamp_ms(l.expires_at.as_ref())),
            id: &l.id,
            idle_timeout_secs: l.idle_timeout_secs,
            keep: l.keep,
            labels: l
                .user_labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            crabbox_labels: l
                .labels
                .iter()
                .filter(|(k, v)| k.as_str() != "state" && l.user_labels.get(k.as_str()) != Some(*v))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            last_touched_at: rfc3339(timestamp_ms(l.last_touched_at.as_ref())),
            provider: &l.provider,
            reason: opt(&l.reason),
            repo_root: opt(&l.repo_root),
            sandbox_id: opt(&l.sandbox_id),
            sandbox_name: &l.sandbox_name,
            slug: &l.slug,
            state: state_name(l),
            ttl_secs: l.ttl_secs,
            work_root: &l.work_root,
        }
    }
}

pub fn lease_json(l: &pb::Lease) -> Value {
    serde_json::to_value(LeaseOut::from(l)).unwrap_or(Value::Null)
}

/// Prints leases as one JSON (or YAML) array, written as it is encoded (no document
/// built first).
pub fn print_leases_json(leases: &[pb::Lease]) {
    use std::io::Write;
    let out: Vec<LeaseOut<'_>> = leases.iter().map(LeaseOut::from).collect();
    let mut w = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let written = if yaml() {
        serde_yaml_ng::to_writer(&mut w, &out).map_err(std::io::Error::other)
    } else {
        serde_json::to_writer_pretty(&mut w, &out)
            .map_err(std::io::Error::other)
            .and_then(|()| writeln!(w))
    }
    .and_then(|()| w.flush());
    if let Err(e) = written {
        eprintln!("crabbox: error: writing the document: {e}");
    }
}

/// Prints one document: JSON, or YAML under `-o yaml`.
pub fn print_json(v: &Value) {
    let text = if yaml() {
        serde_yaml_ng::to_string(v)
            .map(|s| s.trim_end().to_string())
            .map_err(|e| e.to_string())
    } else {
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())
    };
    match text {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("crabbox: error: encoding the document: {e}"),
    }
}

/// `leased <id> slug=<slug> provider=<p> sandbox=<sandbox id>`.
pub fn leased_line(l: &pb::Lease) -> String {
    let sandbox = if l.sandbox_id.is_empty() {
        &l.sandbox_name
    } else {
        &l.sandbox_id
    };
    format!(
        "leased {} slug={} provider={} sandbox={}",
        l.id, l.slug, l.provider, sandbox
    )
}

/// How long until `ms`, for people ("in 29m", "expired").
pub fn until(ms: u64) -> String {
    let now = crate::clock::now_ms();
    if ms <= now {
        return "expired".into();
    }
    let secs = (ms - now) / 1000;
    format!("in {}", crate::clock::human_secs(secs.max(1)))
}

/// A table of leases; `wide` adds when each was made and last used, its idle timeout,
/// --keep, its labels and its work root.
pub fn lease_table(leases: &[pb::Lease], wide: bool) -> String {
    if wide {
        return wide_lease_table(leases);
    }
    let mut rows = vec![[
        "ID".to_string(),
        "SLUG".into(),
        "PROVIDER".into(),
        "STATE".into(),
        "SANDBOX".into(),
        "EXPIRES".into(),
        "REPO".into(),
    ]];
    for l in leases {
        let live = !matches!(state_name(l), "released");
        rows.push([
            l.id.clone(),
            l.slug.clone(),
            l.provider.clone(),
            state_name(l).into(),
            if l.sandbox_id.is_empty() {
                l.sandbox_name.clone()
            } else {
                l.sandbox_id.clone()
            },
            if live {
                until(timestamp_ms(l.expires_at.as_ref()))
            } else {
                "-".into()
            },
            if l.repo_root.is_empty() {
                "-".into()
            } else {
                l.repo_root.clone()
            },
        ]);
    }
    table(&rows)
}

fn wide_lease_table(leases: &[pb::Lease]) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "SLUG".into(),
        "PROVIDER".into(),
        "STATE".into(),
        "SANDBOX".into(),
        "CREATED".into(),
        "LAST USED".into(),
        "EXPIRES".into(),
        "IDLE".into(),
        "KEEP".into(),
        "LABELS".into(),
        "WORK ROOT".into(),
        "REPO".into(),
    ]];
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for l in leases {
        let live = !matches!(state_name(l), "released");
        let mut labels: Vec<String> = l
            .user_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        rows.push([
            l.id.clone(),
            l.slug.clone(),
            l.provider.clone(),
            state_name(l).into(),
            dash(if l.sandbox_id.is_empty() {
                &l.sandbox_name
            } else {
                &l.sandbox_id
            }),
            rfc3339(timestamp_ms(l.created_at.as_ref())),
            rfc3339(timestamp_ms(l.last_touched_at.as_ref())),
            if live {
                until(timestamp_ms(l.expires_at.as_ref()))
            } else {
                "-".into()
            },
            crate::clock::human_secs(l.idle_timeout_secs),
            if l.keep { "yes".into() } else { "no".into() },
            dash(&labels.join(",")),
            dash(&l.work_root),
            dash(&l.repo_root),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns separated by two spaces.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == N {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Several lines describing one lease.
pub fn lease_details(l: &pb::Lease) -> String {
    let mut s = format!(
        "id:         {}\nslug:       {}\nprovider:   {}\nstate:      {}\n",
        l.id,
        l.slug,
        l.provider,
        state_name(l)
    );
    if !l.reason.is_empty() {
        s.push_str(&format!("reason:     {}\n", l.reason));
    }
    s.push_str(&format!(
        "sandbox:    {} ({})\nrepo:       {}\ncreated:    {}\nexpires:    {} ({})\nkeep:       {}\nwork root:  {}\n",
        if l.sandbox_id.is_empty() { "-" } else { &l.sandbox_id },
        l.sandbox_name,
        if l.repo_root.is_empty() { "-" } else { &l.repo_root },
        rfc3339(timestamp_ms(l.created_at.as_ref())),
        rfc3339(timestamp_ms(l.expires_at.as_ref())),
        until(timestamp_ms(l.expires_at.as_ref())),
        l.keep,
        l.work_root,
    ));
    s
}

/// One team lease as JSON (`status` of another machine's lease).
pub fn team_lease_json(l: &pb::TeamLease) {
    print_json(&team_lease_value(l));
}

fn team_lease_value(l: &pb::TeamLease) -> Value {
    let ms = |t: &Option<prost_types::Timestamp>| timestamp_ms(t.as_ref());
    serde_json::json!({
                    "id": l.id,
                    "slug": l.slug,
                    "user": l.user,
                    "host": l.host,
                    "daemon_id": l.daemon_id,
                    "repo_name": l.repo_name,
                    "provider": l.provider,
                    "sandbox_id": l.sandbox_id,
                    "sandbox_name": l.sandbox_name,
                    "state": l.state,
                    "created_at": rfc3339(ms(&l.created_at)),
                    "expires_at": rfc3339(ms(&l.expires_at)),
                    "generation": l.generation,
                    "reason": (!l.reason.is_empty()).then_some(&l.reason),
                    "released_by": (!l.released_by.is_empty()).then_some(&l.released_by),
                    "heartbeat_at": l.heartbeat_at.as_ref().map(|_| rfc3339(ms(&l.heartbeat_at))),
                    "stopped_by": (!l.stopped_by.is_empty()).then_some(&l.stopped_by),
                    "stopped_at": l.stopped_at.as_ref().map(|_| rfc3339(ms(&l.stopped_at))),
    })
}

/// `list --team`: a table, or a JSON array.
pub fn team_leases(json: bool, team: &str, leases: &[pb::TeamLease]) {
    let ms = |t: &Option<prost_types::Timestamp>| timestamp_ms(t.as_ref());
    if json {
        print_json(&Value::Array(leases.iter().map(team_lease_value).collect()));
        return;
    }
    if leases.is_empty() {
        println!("no leases in team {team}");
        return;
    }
    println!(
        "{:<18} {:<22} {:<12} {:<16} {:<10} {:<9} {:<16} EXPIRES",
        "ID", "SLUG", "USER", "HOST", "PROVIDER", "STATE", "REPO"
    );
    for l in leases {
        println!(
            "{:<18} {:<22} {:<12} {:<16} {:<10} {:<9} {:<16} {}",
            l.id,
            l.slug,
            l.user,
            l.host,
            l.provider,
            l.state,
            l.repo_name,
            until(ms(&l.expires_at))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&[["a".to_string(), "bb".into()], ["ccc".into(), "d".into()]]);
        assert_eq!(t, "a    bb\nccc  d\n");
    }
}
