//! Provider work on a lease's sandbox: what the actor spawns (provisioning, deleting) and
//! what it lends to a run (sync, exec) and to copies (transfer). Nothing here decides a state: the results go back
//! to the actor as messages, and [`super::state::step`] decides.

pub mod exec;
pub mod provision;
pub mod release;
pub mod sync;
pub mod transfer;
