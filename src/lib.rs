//! crabbox: a lease coordinator for remote sandboxes.
//!
//! `crabboxd` is a per-user daemon; every sandbox lease is an actor that owns its sandbox's
//! life (create, sync, exec, ssh, release); a registry actor supervises them and is served
//! over gRPC on a Unix socket to the `crabbox` CLI.
//!
//! Module map:
//! - [`pb`]: the generated gRPC types (`proto/crabbox/v1`).
//! - [`daemon`]: `run(config, providers, socket, shutdown)`, the registry actor, the index,
//!   the gRPC services.
//! - [`lease`]: the lease record, its lifecycle state machine, the lease actor, runs.
//! - [`provider`]: the `Provider` trait and the `local` provider.
//! - [`sandbox`]: the local sandbox engine (folders + process groups), shared with
//!   `daytona-sim`.
//! - [`sim`]: `daytona-sim`, a Daytona-compatible server over the local sandbox engine.
//! - [`sync`]: which files a sync sends, their hashes, the archive.
//! - [`store`]: the redb store of leases, manifests and runs.
//! - [`config`]: layered YAML/env/flag configuration and the SPEC paths.
//! - [`cli`]: the `crabbox` command line (a gRPC client of the daemon).
//! - [`error`], [`ids`]: the error table, ids and slugs.
//! - [`logging`]: the log filter that keeps secrets out of trace output.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod error;
pub mod ids;
pub mod lease;
pub mod logging;
pub mod pb;
pub mod provider;
pub mod sandbox;
pub mod sim;
pub mod store;
pub mod sync;

