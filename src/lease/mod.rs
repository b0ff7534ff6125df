//! Leases: the record, its lifecycle, the actor that owns each one, the work it does on
//! its sandbox, and the store that keeps them.
//!
//! - [`record`]: [`LeaseRecord`]: labels, ownership, expiry.
//! - [`state`]: `step(record, event) -> (record, effects)`: every decision.
//! - [`handle`]: the lease's protocol: [`LeaseMsg`], [`LeaseHandle`], `ask()` with a timeout.
//! - [`actor`]: carries out the effects; holds a narrow [`actor::LeaseCtx`], not the daemon.
//! - [`ops`]: provider work the actor spawns (provision, release) or lends to a run (sync,
//!   exec).
//! - [`store`]: the embedded store of leases, sync manifests and runs.

pub mod actor;
pub mod handle;
pub mod ops;
pub mod record;
pub mod state;
pub mod store;

pub use handle::{LeaseChange, LeaseHandle, LeaseMsg, Publisher, RunTarget, StateCounts};
pub use record::{LeaseRecord, owned_by};
pub use record::{LeaseState, Task};
pub use state::Phase;
