//! crabbox: a lease coordinator for remote sandboxes.
//!
//! `crabboxd` is a per-user daemon; every sandbox lease is an actor that owns its sandbox's
//! life (create, sync, exec, ssh, release); a registry actor supervises them and is served
//! over gRPC on a Unix socket to the `crabbox` CLI.
//!
//! Module map:
//! Module map, one way down (a module imports only those below it, and the leaves):
//! `bin -> cli -> pb` and `bin -> daemon -> rpc -> registry -> lease -> {provider, sync}
//! -> sandbox`; `sim -> sandbox` stands apart.
//! - [`cli`]: the `crabbox` command line (a gRPC client of the daemon).
//! - [`daemon`]: `run(config, providers, socket, shutdown)`: the composition root.
//! - [`rpc`]: the gRPC services; the Run and Watch use cases; wire conversions.
//! - [`registry`]: supervision of lease actors, acquire/claim, the index of live leases,
//!   the sweep (expiry, retries, reconcile, orphans).
//! - [`lease`]: the record, the lifecycle's one step function, the actor that carries out
//!   its effects, the provider work it does, and the store.
//! - [`provider`]: the `Provider` trait, `local` and `daytona`.
//! - [`sync`]: which files a sync sends, their hashes, the archive.
//! - [`sandbox`]: the local sandbox engine (folders + process groups), shared with
//!   `daytona-sim`.
//! - [`sim`]: `daytona-sim`, a Daytona-compatible server over the local sandbox engine.
//!
//! Leaves anyone may use: [`clock`] (the one wall clock), [`ids`], [`config`], [`error`]
//! (the error table), [`pb`] (the generated gRPC types and wire time), [`logging`],
//! [`relay`] (a lease's daemon-side log lines to a `crabbox -v` that asks).

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod direct;
pub mod error;
pub mod fds;
pub mod files;
pub mod ids;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod pb;
pub mod provider;
pub mod registry;
pub mod relay;
pub mod rpc;
pub mod sandbox;
pub mod sim;
pub mod sync;
pub mod team;
