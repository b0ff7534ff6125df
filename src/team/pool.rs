//! The team's shared warm pool: with team mode and a pool both configured, the reaper's
//! leader fills each pool for the whole team, every pooled sandbox is a row here, and a
//! fresh lease on any daemon claims one atomically (`FOR UPDATE SKIP LOCKED`: two daemons
//! never get the same row). A sandbox another daemon made changes hands: the claimer
//! relabels it as its own lease, and the maker, seeing its row claimed, lets its pooled
//! lease go without deleting the sandbox. The maker never deletes a pooled sandbox it
//! cannot first retire (a row already claimed is not its to delete).

use super::Team;
use crate::error::Error;
use crate::lease::LeaseRecord;

/// A pooled sandbox claimed from the team's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub lease_id: String,
    pub pool: String,
    pub owner: String,
    pub provider: String,
    pub sandbox_id: String,
    pub sandbox_name: String,
}

/// What makes pooled sandboxes interchangeable: the provider and the options a fresh
/// lease must ask (the auto-stop interval aside), as one string.
pub fn spec_key(provider: &str, options: &std::collections::BTreeMap<String, String>) -> String {
    let mut key = provider.to_string();
    for (k, v) in options {
        if k != "auto_stop_minutes" {
            key.push('\u{1f}');
            key.push_str(k);
            key.push('=');
            key.push_str(v);
        }
    }
    key
}

impl Team {
    /// A pooled lease of this daemon is ready: it joins the team's pool.
    pub async fn pool_add(&self, r: &LeaseRecord) -> Result<(), Error> {
        let Some(pool) = &r.pool else { return Ok(()) };
        let c = self.client().await?;
        self.timed(c.execute(
            "INSERT INTO crabbox_pool_sandboxes (lease_id, team, pool, spec, owner, provider,
               sandbox_id, sandbox_name, state)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'ready') ON CONFLICT (lease_id) DO NOTHING",
            &[
                &r.id,
                &self.settings.name,
                pool,
                &spec_key(&r.provider, &r.provider_options),
                &self.daemon_id,
                &r.provider,
                &r.sandbox_id.clone().unwrap_or_default(),
                &r.sandbox_name,
            ],
        ))
        .await
        .map(|_| ())
    }

    /// How many of the team's pooled sandboxes of `pool` are ready.
    pub async fn pool_ready(&self, pool: &str) -> Result<i64, Error> {
        let c = self.client().await?;
        let row = self
            .timed(c.query_one(
                "SELECT count(*) FROM crabbox_pool_sandboxes
                 WHERE team = $1 AND pool = $2 AND state = 'ready'",
                &[&self.settings.name, &pool],
            ))
            .await?;
        Ok(row.get(0))
    }

    /// Claims the team's oldest ready pooled sandbox of `spec`, atomically; `None` when
    /// there is none.
    pub async fn pool_claim(&self, spec: &str) -> Result<Option<Claimed>, Error> {
        let c = self.client().await?;
        let rows = self
            .timed(c.query(
                "UPDATE crabbox_pool_sandboxes SET state = 'claimed', claimed_by = $3,
                   claimed_host = $4
                 WHERE lease_id = (
                   SELECT lease_id FROM crabbox_pool_sandboxes
                   WHERE team = $1 AND spec = $2 AND state = 'ready'
                   ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1)
                 RETURNING lease_id, owner, provider, sandbox_id, sandbox_name, pool",
                &[&self.settings.name, &spec, &self.daemon_id, &self.host],
            ))
            .await?;
        Ok(rows.first().map(|r| Claimed {
            lease_id: r.get(0),
            owner: r.get(1),
            provider: r.get(2),
            sandbox_id: r.get(3),
            sandbox_name: r.get(4),
            pool: r.get(5),
        }))
    }

    /// Gives a claimed row back (the sandbox turned out unusable: it goes instead).
    pub async fn pool_forget(&self, lease_id: &str) -> Result<(), Error> {
        let c = self.client().await?;
        self.timed(c.execute(
            "DELETE FROM crabbox_pool_sandboxes WHERE lease_id = $1",
            &[&lease_id],
        ))
        .await
        .map(|_| ())
    }

    /// Takes a ready pooled sandbox of this daemon out of the team's pool before it is
    /// deleted (expiry, drain): `false` when another daemon claimed it first (it is that
    /// daemon's now, and must not be deleted). No row: nothing to retire.
    pub async fn pool_retire(&self, lease_id: &str) -> Result<bool, Error> {
        let c = self.client().await?;
        let rows = self
            .timed(c.query(
                "DELETE FROM crabbox_pool_sandboxes WHERE lease_id = $1 RETURNING state",
                &[&lease_id],
            ))
            .await?;
        match rows.first().map(|r| r.get::<_, String>(0)) {
            Some(state) if state == "claimed" => {
                // Put it back: the claimer's handover still needs it.
                self.timed(c.execute(
                    "INSERT INTO crabbox_pool_sandboxes (lease_id, team, pool, spec, owner,
                       provider, sandbox_id, sandbox_name, state)
                     VALUES ($1, $2, '', '', $3, '', '', '', 'claimed')
                     ON CONFLICT (lease_id) DO NOTHING",
                    &[&lease_id, &self.settings.name, &self.daemon_id],
                ))
                .await?;
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// Pooled sandboxes of this daemon that another daemon claimed: (lease id, its host).
    pub async fn pool_taken_from_me(&self) -> Result<Vec<(String, String)>, Error> {
        let c = self.client().await?;
        let rows = self
            .timed(c.query(
                "SELECT lease_id, claimed_host FROM crabbox_pool_sandboxes
                 WHERE owner = $1 AND state = 'claimed' AND claimed_by <> $1",
                &[&self.daemon_id],
            ))
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
