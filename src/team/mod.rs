//! Team mode: one registry on PostgreSQL for every daemon of a team (`team:` in config).
//!
//! Each daemon keeps its own store as the truth for its leases and mirrors them here, with
//! itself (id, user, host, version, heartbeat). The registry adds what no single daemon
//! can know: the team view (`crabbox list --team`), exact quotas (a create reserves its
//! row under a per-team lock, in one transaction, before anything is created), and the
//! reaper: one daemon at a time (a session advisory lock on its own connection) releases
//! the sandboxes of leases whose daemon stopped heartbeating and whose lease expired (or
//! whose daemon has been gone longer than `orphan_grace`). Every reap is fenced by the
//! row's generation, bumped by each write of the owner, and by the sandbox's ownership
//! labels; a daemon that comes back finds its reaped leases and releases them locally.
//!
//! The database being down never stops existing leases: mirror writes are redone in full
//! on reconnect. The URL's password is never printed ([`crate::config::redact_url`]).

pub mod pool;
pub mod schema;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::config::{TeamSettings, redact_url};
use crate::error::{Error, ProviderError, ProviderErrorKind};
use crate::lease::{LeaseRecord, LeaseState};
use crate::provider::Providers;

/// How a quota refusal starts (so a caller can wait for a slot instead).
pub const QUOTA_MARK: &str = "quota:";

/// Is this error a team quota's refusal?
pub fn is_quota_refusal(e: &Error) -> bool {
    matches!(e, Error::Provider(p) if p.message.starts_with(QUOTA_MARK))
}

/// How long a database call may take before the daemon goes on without it.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// A lease as the team registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamLease {
    pub id: String,
    pub slug: String,
    pub user: String,
    pub host: String,
    pub daemon_id: String,
    pub repo_name: String,
    pub provider: String,
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub state: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub generation: i64,
    pub reason: String,
    pub released_by: String,
    /// The owner daemon's last heartbeat (Unix ms).
    pub heartbeat_ms: u64,
    /// Who stopped it from another machine, and when (Unix ms; 0: nobody).
    pub stopped_by: String,
    pub stopped_at_ms: u64,
}

/// The team registry as a daemon holds it.
pub struct Team {
    pub settings: TeamSettings,
    pub daemon_id: String,
    pub host: String,
    conn: Mutex<Option<Arc<Client>>>,
    /// The reaper's own connection, holding the team's advisory lock while it leads.
    leader: Mutex<Option<Client>>,
    /// A connection of its own for quota transactions (statements of other tasks on the
    /// shared one would land inside them).
    tx_conn: Mutex<Option<Client>>,
    /// A mirror write failed: everything is written again once the database answers.
    dirty: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

fn db_err(settings: &TeamSettings, e: impl std::fmt::Display) -> Error {
    // tokio-postgres never prints the password, but a URL may end up in a message.
    let msg = e
        .to_string()
        .replace(&settings.database_url, &redact_url(&settings.database_url));
    Error::Store(format!(
        "team registry {}: {msg}",
        redact_url(&settings.database_url)
    ))
}

impl Team {
    pub fn new(settings: TeamSettings, daemon_id: String) -> Arc<Team> {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown".into());
        Arc::new(Team {
            settings,
            daemon_id,
            host,
            conn: Mutex::new(None),
            leader: Mutex::new(None),
            tx_conn: Mutex::new(None),
            dirty: AtomicBool::new(true),
            last_error: std::sync::Mutex::new(None),
        })
    }

    /// A change was missed: everything is written again at the next tick.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    /// The last connection or write failure, for `doctor`.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn note(&self, e: &Error) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }

    /// A new connection (TLS as the URL's sslmode says: rustls with the system's roots and
    /// the configured CA file).
    async fn connect(&self) -> Result<Client, Error> {
        let s = &self.settings;
        let mut config: tokio_postgres::Config = s
            .database_url
            .parse()
            .map_err(|e| db_err(s, format!("not a usable database URL: {e}")))?;
        // A peer that vanished without a word is noticed within seconds, on this side.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        let tls = tls(s)?;
        let (client, connection) = tokio::time::timeout(DB_TIMEOUT, config.connect(tls))
            .await
            .map_err(|_| db_err(s, "no answer within 5s"))?
            .map_err(|e| db_err(s, with_causes(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "team registry connection ended");
            }
        });
        Ok(client)
    }

    /// The shared connection, made (and the schema migrated) when there is none.
    pub async fn client(&self) -> Result<Arc<Client>, Error> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *conn = None;
        let client = self.connect().await.inspect_err(|e| self.note(e))?;
        schema::migrate(&client)
            .await
            .map_err(|e| db_err(&self.settings, e))
            .inspect_err(|e| self.note(e))?;
        let client = Arc::new(client);
        *conn = Some(client.clone());
        // Whatever was written while there was no connection is written again.
        self.dirty.store(true, Ordering::SeqCst);
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
        Ok(client)
    }

    /// Joins the team's queue for a slot; answers the ticket.
    pub async fn enqueue(&self) -> Result<i64, Error> {
        let c = self.client().await?;
        let row = self
            .timed(c.query_one(
                "INSERT INTO crabbox_slot_waiters (team, daemon_id, \"user\")
                 VALUES ($1, $2, $3) RETURNING id",
                &[&self.settings.name, &self.daemon_id, &self.settings.user],
            ))
            .await?;
        Ok(row.get(0))
    }

    /// Says the ticket's waiter is still there (waiters not seen for 10 s lose their turn).
    pub async fn still_waiting(&self, ticket: i64) -> Result<(), Error> {
        let c = self.client().await?;
        self.timed(c.execute(
            "UPDATE crabbox_slot_waiters SET seen_at = now() WHERE id = $1",
            &[&ticket],
        ))
        .await
        .map(|_| ())
    }

    /// Leaves the queue.
    pub async fn dequeue(&self, ticket: i64) {
        if let Ok(c) = self.client().await {
            let _ = self
                .timed(c.execute("DELETE FROM crabbox_slot_waiters WHERE id = $1", &[&ticket]))
                .await;
        }
    }

    async fn timed<T>(
        &self,
        what: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        let r = tokio::time::timeout(DB_TIMEOUT, what)
            .await
            .map_err(|_| db_err(&self.settings, "no answer within 5s"))?
            .map_err(|e| db_err(&self.settings, e));
        if let Err(e) = &r {
            self.note(e);
        }
        r
    }

    /// Says this daemon is alive.
    pub async fn heartbeat(&self) -> Result<(), Error> {
        let c = self.client().await?;
        self.timed(c.execute(
            "INSERT INTO crabbox_daemons (id, team, \"user\", host, version, started_at, heartbeat_at)
             VALUES ($1, $2, $3, $4, $5, now(), now())
             ON CONFLICT (id) DO UPDATE SET team = $2, \"user\" = $3, host = $4, version = $5,
               heartbeat_at = now()",
            &[
                &self.daemon_id,
                &self.settings.name,
                &self.settings.user,
                &self.host,
                &env!("CARGO_PKG_VERSION"),
            ],
        ))
        .await
        .map(|_| ())
    }

    /// Reserves a slot for a new lease: under the team's lock, counts the team's live
    /// leases (and this user's) against the quotas and, when they allow it, inserts the
    /// lease's row, in one transaction. Refused: nothing is created, and the message names
    /// the quota and who holds the slots. Without quotas, a database that cannot be reached
    /// does not stop the create (the row is written once it answers).
    pub async fn reserve(&self, record: &LeaseRecord, ticket: Option<i64>) -> Result<(), Error> {
        let quota = self.settings.quota;
        // Without quotas (or with `required: false`) an unreachable database does not stop
        // the create: the row is written once it answers.
        let limited =
            (quota.sandboxes.is_some() || quota.per_user.is_some()) && self.settings.required;
        // The shared connection first: it makes the schema, and says whether the
        // database answers at all.
        let reachable = self.client().await;
        let mut tx_conn = self.tx_conn.lock().await;
        let conn = match reachable {
            Ok(_) => match tx_conn.as_ref() {
                Some(c) if !c.is_closed() => Ok(()),
                _ => self.connect().await.map(|c| *tx_conn = Some(c)),
            },
            Err(e) => Err(e),
        };
        let c = match (conn, tx_conn.as_mut()) {
            (Ok(()), Some(c)) => c,
            (Err(e), _) if !limited => {
                tracing::warn!(error = %e, "team registry unreachable; the lease is mirrored when it answers");
                self.dirty.store(true, Ordering::SeqCst);
                return Ok(());
            }
            (Err(e), _) => {
                return Err(Error::Provider(ProviderError::new(
                    ProviderErrorKind::Provisioning,
                    format!(
                        "{e}; leases under the team's quotas cannot be made until it answers \
                         (existing leases keep working; team.required: false makes them \
                         anyway, unchecked)"
                    ),
                )));
            }
            (Ok(()), None) => return Err(Error::Internal("no quota connection".into())),
        };
        let s = &self.settings;
        let r = tokio::time::timeout(DB_TIMEOUT, async {
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('crabbox-quota:' || $1))",
                &[&s.name],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT \"user\", count(*) FROM crabbox_leases
                     WHERE team = $1 AND state NOT IN ('released', 'failed')
                     GROUP BY \"user\" ORDER BY 2 DESC, 1",
                    &[&s.name],
                )
                .await?;
            let held: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            // Those waiting for a slot (`--wait-for-slot`) come first, in their order: only
            // the head of the queue may take a freed slot. Waiters not seen lately are gone.
            let head: Option<i64> = tx
                .query_one(
                    "SELECT min(id) FROM crabbox_slot_waiters
                     WHERE team = $1 AND seen_at > now() - interval '10 seconds'",
                    &[&s.name],
                )
                .await?
                .get(0);
            if let Some(head) = head
                && ticket != Some(head)
            {
                let ahead: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM crabbox_slot_waiters
                         WHERE team = $1 AND seen_at > now() - interval '10 seconds'
                           AND id < coalesce($2, 9223372036854775807)",
                        &[&s.name, &ticket],
                    )
                    .await?
                    .get(0);
                return Ok(Err(format!(
                    "{QUOTA_MARK} {ahead} lease(s) of team {} wait for a slot before this one \
                     (--wait-for-slot queues, first come first served)",
                    s.name
                )));
            }
            let total: i64 = held.iter().map(|h| h.1).sum();
            let mine = held.iter().find(|h| h.0 == s.user).map_or(0, |h| h.1);
            let who = || {
                held.iter()
                    .map(|(u, n)| format!("{u} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if let Some(max) = quota.sandboxes
                && total >= i64::from(max)
            {
                return Ok(Err(format!(
                    "{QUOTA_MARK} team {}'s quota of {max} sandboxes is used ({}); stop one \
                     (`crabbox list --team`), wait with --wait-for-slot, or ask for a larger \
                     team.quota.sandboxes",
                    s.name,
                    who()
                )));
            }
            if let Some(max) = quota.per_user
                && mine >= i64::from(max)
            {
                return Ok(Err(format!(
                    "{QUOTA_MARK} {}'s quota of {max} sandboxes in team {} is used (team: {}); \
                     stop one of yours (`crabbox list --team --user {}`) or wait with \
                     --wait-for-slot",
                    s.user,
                    s.name,
                    who(),
                    s.user
                )));
            }
            upsert(&tx, self, record).await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
        .await
        .map_err(|_| db_err(s, "no answer within 5s"))?
        .map_err(|e: tokio_postgres::Error| db_err(s, e));
        if r.is_err() {
            // A broken connection is made again next time.
            *tx_conn = None;
        }
        r?.map_err(|msg| Error::Provider(ProviderError::new(ProviderErrorKind::Provisioning, msg)))
    }

    /// Mirrors one lease's change. A failure is remembered: everything is written again
    /// once the database answers.
    pub async fn mirror(&self, r: &LeaseRecord) {
        let done = match self.client().await {
            Ok(c) => self.timed(upsert(c.as_ref(), self, r)).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            tracing::debug!(lease = %r.id, error = %e, "team mirror write deferred");
            self.dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Writes every lease of this daemon again when a write was missed (or at start): the
    /// local ones as they are, and this daemon's rows the store no longer has as released.
    pub async fn resync(&self, records: &[LeaseRecord]) -> Result<(), Error> {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let done = async {
            let c = self.client().await?;
            for r in records {
                self.timed(upsert(c.as_ref(), self, r)).await?;
            }
            let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
            self.timed(c.execute(
                "UPDATE crabbox_leases SET state = 'released', generation = generation + 1,
                   reason = 'no longer held by its daemon', updated_at = now()
                 WHERE daemon_id = $1 AND state <> 'released' AND NOT (id = ANY($2))",
                &[&self.daemon_id, &ids],
            ))
            .await?;
            Ok::<(), Error>(())
        }
        .await;
        if done.is_err() {
            self.dirty.store(true, Ordering::SeqCst);
        }
        done
    }

    /// Leases of this daemon that the reaper released while it was away: (id, reason).
    pub async fn reaped(&self, live: &[String]) -> Result<Vec<(String, String)>, Error> {
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let rows = self
            .timed(c.query(
                "SELECT id, reason FROM crabbox_leases
                 WHERE daemon_id = $1 AND released_by <> '' AND id = ANY($2)",
                &[&self.daemon_id, &live],
            ))
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The team's leases (not released), oldest first; one user's with `user`.
    pub async fn list(&self, user: Option<&str>, all: bool) -> Result<Vec<TeamLease>, Error> {
        let c = self.client().await?;
        let rows = self
            .timed(c.query(
                &format!(
                    "{SELECT_LEASES} WHERE l.team = $1 AND ($2::text IS NULL OR l.\"user\" = $2)
                       AND ($3 OR l.state <> 'released')
                     ORDER BY l.created_at, l.id"
                ),
                &[&self.settings.name, &user, &all],
            ))
            .await?;
        Ok(rows.iter().map(team_lease).collect())
    }

    /// A team lease by id, slug or sandbox name (a unique prefix of an id or slug works).
    pub async fn find(&self, name: &str) -> Result<Option<TeamLease>, Error> {
        let c = self.client().await?;
        let rows = self
            .timed(c.query(
                &format!(
                    "{SELECT_LEASES} WHERE l.team = $1 AND (l.id = $2 OR l.slug = $2
                       OR l.sandbox_name = $2 OR l.sandbox_id = $2
                       OR l.id LIKE $2 || '%' OR l.slug LIKE $2 || '%')
                     ORDER BY l.state = 'released', l.created_at DESC LIMIT 2"
                ),
                &[&self.settings.name, &name],
            ))
            .await?;
        Ok(rows.first().map(team_lease))
    }

    /// Leads the reaper when no other daemon does: a session advisory lock on a
    /// connection of its own, held as long as that connection lives.
    pub async fn lead(&self) -> bool {
        let mut leader = self.leader.lock().await;
        if let Some(c) = leader.as_ref()
            && !c.is_closed()
        {
            return true;
        }
        *leader = None;
        let Ok(c) = self.connect().await else {
            return false;
        };
        let won = tokio::time::timeout(
            DB_TIMEOUT,
            c.query_one(
                "SELECT pg_try_advisory_lock(hashtext('crabbox-reaper:' || $1))",
                &[&self.settings.name],
            ),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|row| row.get::<_, bool>(0));
        if won {
            // And on the server's side: the lock goes with a leader that vanished.
            let _ = c
                .batch_execute(
                    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;
                     SET tcp_keepalives_count = 3",
                )
                .await;
            tracing::info!(team = %self.settings.name, "this daemon leads the team's reaper");
            *leader = Some(c);
        }
        won
    }

    /// Does this daemon lead the reaper now?
    pub async fn is_leader(&self) -> bool {
        self.leader
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| !c.is_closed())
    }

    /// One pass of the reaper (when leading): the team's leases whose daemon has been
    /// silent for `stale` and that expired (or whose daemon has been silent past
    /// `orphan_grace`) are released, each fenced by its generation and its sandbox's
    /// ownership labels. Local sandboxes live on their own machine and are left to it.
    /// Answers how many sandboxes were deleted.
    pub async fn reap(&self, providers: &Providers, stale: Duration) -> Result<usize, Error> {
        if !self.is_leader().await {
            return Ok(0);
        }
        let c = self.client().await?;
        let grace = self.settings.orphan_grace.as_secs_f64();
        let rows = self
            .timed(c.query(
                "SELECT l.id, l.generation, l.provider, l.sandbox_id, l.sandbox_name,
                        l.daemon_id, d.host, l.expires_at < now()
                 FROM crabbox_leases l JOIN crabbox_daemons d ON d.id = l.daemon_id
                 WHERE l.team = $1 AND l.state NOT IN ('released') AND l.released_by = ''
                   AND l.provider <> 'local' AND l.daemon_id <> $2
                   AND d.heartbeat_at < now() - make_interval(secs => $3)
                   AND (l.expires_at < now() OR d.heartbeat_at < now() - make_interval(secs => $4))",
                &[&self.settings.name, &self.daemon_id, &stale.as_secs_f64(), &grace],
            ))
            .await?;
        let mut deleted = 0;
        for row in rows {
            let target = Fenced {
                id: row.get(0),
                generation: row.get(1),
                provider: row.get(2),
                sandbox_id: row.get(3),
                sandbox_name: row.get(4),
                owner: row.get(5),
            };
            let owner_host: String = row.get(6);
            let expired: bool = row.get(7);
            let reason = format!(
                "released by the team reaper on {} {} while {owner_host} was offline",
                self.host,
                if expired {
                    "after its expiry"
                } else {
                    "after its daemon's orphan grace"
                }
            );
            match self.release_row(&c, &target, &reason, providers).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %target.id, error = %e, "team reaper could not release a lease");
                }
            }
        }
        Ok(deleted)
    }

    /// Releases one team lease from this daemon: the row is fenced (only at the
    /// generation seen, only once), then the sandbox is deleted when it carries the
    /// lease's ownership labels (a sandbox that does not is never touched), then the row
    /// says released with `reason`; its own daemon releases it locally when it next looks.
    /// Answers whether a sandbox was deleted. A failed delete gives the row back.
    async fn release_row(
        &self,
        c: &Client,
        t: &Fenced,
        reason: &str,
        providers: &Providers,
    ) -> Result<bool, Error> {
        let p = providers.get(&t.provider).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "lease {} is on provider {}, which this daemon does not have",
                t.id, t.provider
            ))
        })?;
        let fenced = self
            .timed(c.execute(
                "UPDATE crabbox_leases SET state = 'releasing', released_by = $3,
                   reason = $4, generation = generation + 1, updated_at = now()
                 WHERE id = $1 AND generation = $2 AND released_by = ''",
                &[&t.id, &t.generation, &self.host, &reason],
            ))
            .await?;
        if fenced != 1 {
            return Ok(false);
        }
        let name = if t.sandbox_id.is_empty() {
            &t.sandbox_name
        } else {
            &t.sandbox_id
        };
        let mut deleted = false;
        let outcome = match p.get(name).await {
            Ok(Some(sb)) => {
                let ours = crate::lease::record::owned_by(&sb.labels, &t.owner)
                    && sb.labels.get("lease") == Some(&t.id);
                if ours {
                    match p.release(&sb.id).await {
                        Ok(()) => {
                            deleted = true;
                            Ok(())
                        }
                        Err(e) if e.is_not_found() => Ok(()),
                        Err(e) => Err(e.to_string()),
                    }
                } else {
                    tracing::warn!(lease = %t.id, sandbox = %sb.name,
                        "the sandbox does not carry the team lease's ownership labels; not touching it");
                    Ok(())
                }
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(lease = %t.id, %reason, "team lease released");
                self.timed(c.execute(
                    "UPDATE crabbox_leases SET state = 'released', generation = generation + 1,
                       updated_at = now() WHERE id = $1",
                    &[&t.id],
                ))
                .await?;
                Ok(deleted)
            }
            Err(e) => {
                self.timed(c.execute(
                    "UPDATE crabbox_leases SET released_by = '', generation = generation + 1
                     WHERE id = $1",
                    &[&t.id],
                ))
                .await?;
                Err(Error::Provider(ProviderError::new(
                    ProviderErrorKind::Other,
                    format!("deleting the sandbox of team lease {}: {e}", t.id),
                )))
            }
        }
    }

    /// Stops a lease another daemon holds (`crabbox stop --force` from any machine):
    /// released as the reaper would, with who stopped it and when recorded.
    pub async fn stop_remote(
        &self,
        lease: &TeamLease,
        providers: &Providers,
    ) -> Result<TeamLease, Error> {
        if lease.provider == "local" {
            return Err(Error::InvalidArgument(format!(
                "lease {} is a local sandbox on {}: stop it there",
                lease.slug, lease.host
            )));
        }
        let c = self.client().await?;
        let reason = format!("stopped by {} on {}", self.settings.user, self.host);
        let target = Fenced {
            id: lease.id.clone(),
            generation: lease.generation,
            provider: lease.provider.clone(),
            sandbox_id: lease.sandbox_id.clone(),
            sandbox_name: lease.sandbox_name.clone(),
            owner: lease.daemon_id.clone(),
        };
        self.release_row(&c, &target, &reason, providers).await?;
        self.timed(c.execute(
            "UPDATE crabbox_leases SET stopped_by = $2, stopped_at = now() WHERE id = $1",
            &[&lease.id, &self.settings.user],
        ))
        .await?;
        self.find(&lease.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("team lease {} vanished", lease.id)))
    }

    /// Facts for `doctor`: (check, ok, detail).
    pub async fn doctor(&self) -> Vec<(String, bool, String)> {
        let mut out = Vec::new();
        let url = redact_url(&self.settings.database_url);
        match self.client().await {
            Ok(c) => {
                out.push((
                    "team registry".into(),
                    true,
                    format!(
                        "team {} at {url} as {}",
                        self.settings.name, self.settings.user
                    ),
                ));
                if let Ok(row) = self
                    .timed(c.query_one(
                        "SELECT (SELECT max(version) FROM crabbox_migrations),
                                extract(epoch FROM now())::float8",
                        &[],
                    ))
                    .await
                {
                    let version: Option<i32> = row.get(0);
                    let db_now: f64 = row.get(1);
                    let skew = (db_now - crate::clock::now_ms() as f64 / 1000.0).abs();
                    out.push((
                        "team schema".into(),
                        version == Some(schema::VERSION),
                        format!("version {version:?} (this crabbox: {})", schema::VERSION),
                    ));
                    out.push((
                        "team clock".into(),
                        skew < 5.0,
                        format!("{skew:.1}s from the database's clock"),
                    ));
                }
                out.push((
                    "team reaper".into(),
                    true,
                    if self.is_leader().await {
                        "this daemon leads it".into()
                    } else {
                        "another daemon leads it (or none yet)".into()
                    },
                ));
            }
            Err(e) => out.push(("team registry".into(), false, e.to_string())),
        }
        out
    }
}

async fn upsert(
    c: &impl tokio_postgres::GenericClient,
    team: &Team,
    r: &LeaseRecord,
) -> Result<u64, tokio_postgres::Error> {
    let repo_name = r
        .repo_root
        .as_deref()
        .and_then(|p| std::path::Path::new(p).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let created = ms_to_secs(r.created_at_ms);
    let expires = ms_to_secs(r.expires_at_ms());
    // A row the reaper released stays released: the owner learns it from there.
    c.execute(
        "INSERT INTO crabbox_leases (id, team, daemon_id, \"user\", slug, repo_name, provider,
           sandbox_id, sandbox_name, state, created_at, expires_at, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, to_timestamp($11), to_timestamp($12), $13)
         ON CONFLICT (id) DO UPDATE SET slug = $5, repo_name = $6, sandbox_id = $8,
           sandbox_name = $9, state = $10, created_at = to_timestamp($11),
           expires_at = to_timestamp($12), reason = $13,
           generation = crabbox_leases.generation + 1, updated_at = now()
         WHERE crabbox_leases.released_by = '' AND crabbox_leases.daemon_id = $3",
        &[
            &r.id,
            &team.settings.name,
            &team.daemon_id,
            &team.settings.user,
            &r.slug,
            &repo_name,
            &r.provider,
            &r.sandbox_id.clone().unwrap_or_default(),
            &r.sandbox_name,
            &r.state.as_str(),
            &created,
            &expires,
            &r.reason.clone().unwrap_or_default(),
        ],
    )
    .await
}

/// A team lease as a fenced release sees it.
struct Fenced {
    id: String,
    generation: i64,
    provider: String,
    sandbox_id: String,
    sandbox_name: String,
    owner: String,
}

const SELECT_LEASES: &str = "SELECT l.id, l.slug, l.\"user\", coalesce(d.host, ''), l.daemon_id,
    l.repo_name, l.provider, l.sandbox_id, l.sandbox_name, l.state,
    (extract(epoch FROM l.created_at) * 1000)::int8, (extract(epoch FROM l.expires_at) * 1000)::int8,
    l.generation, l.reason, l.released_by,
    coalesce((extract(epoch FROM d.heartbeat_at) * 1000)::int8, 0),
    coalesce(l.stopped_by, ''), coalesce((extract(epoch FROM l.stopped_at) * 1000)::int8, 0)
  FROM crabbox_leases l LEFT JOIN crabbox_daemons d ON d.id = l.daemon_id";

fn team_lease(r: &tokio_postgres::Row) -> TeamLease {
    let ms = |i: usize| r.get::<_, i64>(i).max(0) as u64;
    TeamLease {
        id: r.get(0),
        slug: r.get(1),
        user: r.get(2),
        host: r.get(3),
        daemon_id: r.get(4),
        repo_name: r.get(5),
        provider: r.get(6),
        sandbox_id: r.get(7),
        sandbox_name: r.get(8),
        state: r.get(9),
        created_at_ms: ms(10),
        expires_at_ms: ms(11),
        generation: r.get(12),
        reason: r.get(13),
        released_by: r.get(14),
        heartbeat_ms: ms(15),
        stopped_by: r.get(16),
        stopped_at_ms: ms(17),
    }
}

/// An error with the causes behind it ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn ms_to_secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The TLS connector: rustls with the system's roots and the configured CA file.
fn tls(s: &TeamSettings) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &s.ca_file {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "team.ca_file {}: {e}; give a PEM file of CA certificates",
                    path.display()
                ))
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| Error::InvalidArgument(format!("team.ca_file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "team.ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give \
                 the CA that signed the database's certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                Error::InvalidArgument(format!("team.ca_file {}: {e}", path.display()))
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Internal(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The live local leases (the ones the reaper may have released while this daemon was
/// away), by id.
pub fn live_ids(records: &[LeaseRecord]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.state.is_live() || r.state == LeaseState::Releasing)
        .map(|r| r.id.clone())
        .collect()
}
