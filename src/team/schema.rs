//! The team registry's schema, made and migrated by crabboxd itself: numbered migrations
//! applied in order inside one transaction under an advisory lock, so daemons that start
//! at once apply each exactly once.

use tokio_postgres::Client;

/// The schema version this crabbox writes.
pub const VERSION: i32 = 3;

/// Each migration, by version (index + 1).
const MIGRATIONS: [&str; 3] = [
    r#"
CREATE TABLE crabbox_daemons (
    id text PRIMARY KEY,
    team text NOT NULL,
    "user" text NOT NULL,
    host text NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL
);
CREATE TABLE crabbox_leases (
    id text PRIMARY KEY,
    team text NOT NULL,
    daemon_id text NOT NULL,
    "user" text NOT NULL,
    slug text NOT NULL,
    repo_name text NOT NULL DEFAULT '',
    provider text NOT NULL,
    sandbox_id text NOT NULL DEFAULT '',
    sandbox_name text NOT NULL,
    state text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    generation bigint NOT NULL DEFAULT 1,
    reason text NOT NULL DEFAULT '',
    released_by text NOT NULL DEFAULT '',
    stopped_by text,
    stopped_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX crabbox_leases_team_state ON crabbox_leases (team, state);
CREATE INDEX crabbox_leases_daemon ON crabbox_leases (daemon_id);
"#,
    r#"
CREATE TABLE crabbox_slot_waiters (
    id bigserial PRIMARY KEY,
    team text NOT NULL,
    daemon_id text NOT NULL,
    "user" text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX crabbox_slot_waiters_team ON crabbox_slot_waiters (team, id);
"#,
    r#"
CREATE TABLE crabbox_pool_sandboxes (
    lease_id text PRIMARY KEY,
    team text NOT NULL,
    pool text NOT NULL,
    spec text NOT NULL,
    owner text NOT NULL,
    provider text NOT NULL,
    sandbox_id text NOT NULL,
    sandbox_name text NOT NULL,
    state text NOT NULL,
    claimed_by text NOT NULL DEFAULT '',
    claimed_host text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX crabbox_pool_sandboxes_spec ON crabbox_pool_sandboxes (team, spec, state, created_at);
"#,
];

/// Brings the schema to [`VERSION`]; a newer schema (a newer crabbox migrated it) is an
/// error that says so.
pub async fn migrate(client: &Client) -> Result<(), String> {
    let e = |what: &str, err: tokio_postgres::Error| format!("{what}: {err}");
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7272027);
             CREATE TABLE IF NOT EXISTS crabbox_migrations (
                 version int PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(|err| e("preparing the schema", err))?;
    let result = async {
        let row = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM crabbox_migrations",
                &[],
            )
            .await
            .map_err(|err| e("reading the schema version", err))?;
        let have: i32 = row.get(0);
        if have > VERSION {
            return Err(format!(
                "the team registry's schema is version {have}, newer than this crabbox's \
                 ({VERSION}): upgrade crabbox on this machine"
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i32 + 1;
            if version <= have {
                continue;
            }
            client
                .batch_execute(sql)
                .await
                .map_err(|err| e(&format!("migration {version}"), err))?;
            client
                .execute(
                    "INSERT INTO crabbox_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await
                .map_err(|err| e(&format!("recording migration {version}"), err))?;
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client
        .batch_execute(end)
        .await
        .map_err(|err| e("finishing the migration", err))?;
    result
}
