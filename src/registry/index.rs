//! The index of live leases, owned by the registry: id -> handle of the lease actor,
//! readable from any task without a trip through the registry's mailbox. Names (slug,
//! sandbox id or name, unique prefixes) are resolved here too, against the live leases and
//! then the store.

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::error::{Error, echo};
use crate::lease::store::Store;
use crate::lease::{LeaseChange, LeaseHandle, LeaseRecord, LeaseState};

/// The longest name a lease is known by (ids 16, slugs 46, sandbox names and Daytona ids
/// well under it).
pub const MAX_NAME_LEN: usize = 128;

/// What a name resolves to.
pub enum Resolved {
    /// A lease with a live actor.
    Live(LeaseHandle),
    /// A lease only the store knows (released), or whose actor just stopped.
    Stored(Box<LeaseRecord>),
}

impl Resolved {
    pub fn record(&self) -> LeaseRecord {
        match self {
            Resolved::Live(h) => h.record(),
            Resolved::Stored(r) => (**r).clone(),
        }
    }
}

/// The index of live leases and the event feed.
pub struct LeaseIndex {
    by_id: DashMap<String, LeaseHandle>,
    /// The same leases in `List`'s order, (created ms, id): neither ever changes, so a page
    /// is a range of this.
    order: std::sync::Mutex<std::collections::BTreeSet<(u64, String)>>,
    events: broadcast::Sender<LeaseChange>,
    /// Leases by state, kept by the actors' publishers.
    counts: std::sync::Arc<crate::lease::StateCounts>,
}

impl Default for LeaseIndex {
    fn default() -> Self {
        LeaseIndex {
            by_id: DashMap::new(),
            order: Default::default(),
            events: broadcast::channel(1024).0,
            counts: Default::default(),
        }
    }
}

impl LeaseIndex {
    pub fn insert(&self, id: String, handle: LeaseHandle) {
        let created = handle.state.borrow().created_at_ms;
        if let Ok(mut order) = self.order.lock() {
            order.insert((created, id.clone()));
        }
        if let Some(old) = self.by_id.insert(id.clone(), handle) {
            let was = old.state.borrow().created_at_ms;
            if was != created
                && let Ok(mut order) = self.order.lock()
            {
                order.remove(&(was, id));
            }
        }
    }

    /// A lease's creation time changed (a pooled lease taken by a fresh one): its place in
    /// `List`'s order follows.
    pub fn reorder(&self, id: &str, was: u64, now: u64) {
        if was != now
            && let Ok(mut order) = self.order.lock()
        {
            order.remove(&(was, id.to_string()));
            order.insert((now, id.to_string()));
        }
    }

    pub fn remove(&self, id: &str) {
        if let Some((_, h)) = self.by_id.remove(id)
            && let Ok(mut order) = self.order.lock()
        {
            order.remove(&(h.state.borrow().created_at_ms, id.to_string()));
        }
    }

    pub fn get(&self, id: &str) -> Option<LeaseHandle> {
        self.by_id.get(id).map(|h| h.clone())
    }

    pub fn handles(&self) -> Vec<LeaseHandle> {
        self.by_id.iter().map(|e| e.value().clone()).collect()
    }

    /// Every lease with an actor, oldest first.
    pub fn records(&self) -> Vec<LeaseRecord> {
        let mut v: Vec<LeaseRecord> = self.by_id.iter().map(|e| e.value().record()).collect();
        v.sort_by_key(|r| r.created_at_ms);
        v
    }

    /// The leases with an actor that `keep` accepts, oldest first (by creation time, then
    /// id), after `after` and at most `limit` of them, each made into what `make` makes of
    /// it in place (nothing is copied for the others, nor a record for the page's); and,
    /// when more follow, the (created ms, id) of the page's last.
    pub fn page<T>(
        &self,
        keep: impl Fn(&LeaseRecord) -> bool,
        after: Option<(u64, &str)>,
        limit: usize,
        make: impl Fn(&LeaseRecord) -> T,
    ) -> (Vec<T>, Option<(u64, String)>) {
        use std::ops::Bound;
        let Ok(order) = self.order.lock() else {
            return (Vec::new(), None);
        };
        let start = match after {
            Some((ms, id)) => Bound::Excluded((ms, id.to_string())),
            None => Bound::Unbounded,
        };
        // In order from the page's start, until one past the page (the handles' shard
        // locks are taken under this one; nothing takes them the other way round).
        let mut page = Vec::new();
        let mut last = None;
        for (_, id) in order.range((start, Bound::Unbounded)) {
            let Some(h) = self.by_id.get(id) else {
                continue;
            };
            let r = h.state.borrow();
            if keep(&r) {
                if page.len() == limit {
                    return (page, last);
                }
                page.push(make(&r));
                last = Some((r.created_at_ms, r.id.clone()));
            }
        }
        (page, None)
    }

    /// How many leases with an actor are in each state, in O(1): kept as they move.
    pub fn count_by_state(&self) -> Vec<(&'static str, u64)> {
        self.counts.snapshot()
    }

    /// The counts a lease actor's [`crate::lease::Publisher`] keeps.
    pub fn counts(&self) -> std::sync::Arc<crate::lease::StateCounts> {
        self.counts.clone()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Tells `Watch` subscribers of a change made outside an actor (a new lease).
    pub fn publish(&self, lease: LeaseRecord, message: impl Into<String>) {
        // No subscriber is fine.
        let _ = self.events.send(LeaseChange {
            lease,
            message: message.into(),
        });
    }

    /// The event feed's sending end, for lease actors.
    pub fn feed(&self) -> broadcast::Sender<LeaseChange> {
        self.events.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LeaseChange> {
        self.events.subscribe()
    }

    /// Is `slug` the slug of a live lease?
    pub fn slug_taken(&self, slug: &str) -> bool {
        self.by_id.iter().any(|e| {
            e.value().state.borrow().slug == slug && e.value().state.borrow().state.is_live()
        })
    }

    /// The live lease claimed by `repo_root`, if any.
    pub fn claimed_by(&self, repo_root: &str) -> Option<LeaseHandle> {
        self.by_id
            .iter()
            .filter(|e| {
                let r = e.value().state.borrow();
                r.state.is_live() && r.repo_root.as_deref() == Some(repo_root)
            })
            .map(|e| e.value().clone())
            .max_by_key(|h| h.state.borrow().created_at_ms)
    }

    /// Resolves a name: an id, slug, sandbox id or sandbox name, else a unique prefix of an
    /// id or slug. Live leases are preferred over released ones with the same name.
    pub fn resolve(&self, name: &str, store: &Store) -> Result<Resolved, Error> {
        let name = name.trim();
        if name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "lease name {} is too long: ids, slugs and sandbox names are at most \
                 {MAX_NAME_LEN} characters (see `crabbox list`)",
                echo(name)
            )));
        }
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "no lease named: give an id, slug or sandbox name (see `crabbox list`)".into(),
            ));
        }
        if let Some(h) = self.get(name) {
            return Ok(resolved(h));
        }
        let (live, mut gone): (Vec<LeaseRecord>, Vec<LeaseRecord>) =
            self.records().into_iter().partition(|r| r.state.is_live());
        gone.extend(
            store
                .all_leases()?
                .into_iter()
                .filter(|r| self.get(&r.id).is_none()),
        );
        let exact = |r: &LeaseRecord| {
            r.id == name
                || r.slug == name
                || r.sandbox_name == name
                || r.sandbox_id.as_deref() == Some(name)
        };
        let prefix = |r: &LeaseRecord| r.id.starts_with(name) || r.slug.starts_with(name);
        for (matches, is_exact) in [
            (&exact as &dyn Fn(&LeaseRecord) -> bool, true),
            (&prefix, false),
        ] {
            let live_hits: Vec<&LeaseRecord> = live.iter().filter(|r| matches(r)).collect();
            match live_hits.as_slice() {
                [one] => {
                    if let Some(h) = self.get(&one.id) {
                        return Ok(resolved(h));
                    }
                }
                [] => {}
                many => return Err(ambiguous(name, many)),
            }
            // A slug is unique among live leases only (SPEC "Leases"): released leases may
            // share one, and their exact name means the newest of them, as a shell's history
            // would. A prefix that matches several stays ambiguous.
            let gone_hits: Vec<&LeaseRecord> = gone.iter().filter(|r| matches(r)).collect();
            if gone_hits.len() > 1 && !is_exact {
                return Err(ambiguous(name, &gone_hits));
            }
            if let Some(r) = gone_hits.iter().max_by_key(|r| r.created_at_ms) {
                return Ok(match self.get(&r.id) {
                    Some(h) => resolved(h),
                    None => Resolved::Stored(Box::new((*r).clone())),
                });
            }
        }
        Err(Error::NotFound(format!(
            "no lease named {}: see `crabbox list --all` for the leases this daemon knows",
            echo(name)
        )))
    }
}

/// A handle whose lease was released (its actor stopping) is only a record now.
fn resolved(h: LeaseHandle) -> Resolved {
    let r = h.record();
    if r.state == LeaseState::Released {
        Resolved::Stored(Box::new(r))
    } else {
        Resolved::Live(h)
    }
}

fn ambiguous(name: &str, hits: &[&LeaseRecord]) -> Error {
    let list: Vec<String> = hits
        .iter()
        .map(|r| format!("{} ({}, {})", r.id, r.slug, r.state))
        .collect();
    Error::Ambiguous {
        name: name.to_string(),
        matches: list,
    }
}
