//! The errors of every layer and the one table that maps them to gRPC statuses and CLI
//! exit codes.
//!
//! Every error carries a message a person can act on: what failed, why, what to do. The
//! kind travels to the CLI in the `crabbox-error-kind` metadata so that the exit code is
//! decided by what went wrong, not guessed from the gRPC code. This module is a leaf: it
//! knows no lease, provider or daemon, only what the table needs.

/// The metadata key that carries an [`ErrorKind`] from the daemon to the CLI.
pub const KIND_METADATA: &str = "crabbox-error-kind";

/// Exit codes (SPEC "CLI"): the remote command's own, else these. Commands that run a
/// command of the user's (`run`, `ssh`) follow docker's convention instead: the command's
/// own code passes through, and crabbox's own failures are [`exit::CRABBOX`] (125).
pub mod exit {
    pub const OK: i32 = 0;
    pub const INTERNAL: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const AUTH: i32 = 3;
    pub const NOT_FOUND: i32 = 4;
    pub const PROVISIONING: i32 = 5;
    pub const SYNC: i32 = 6;
    /// SSH, or a lease that is not ready for what was asked.
    pub const SSH: i32 = 7;
    /// `run --require-artifact`: the command succeeded but a required artifact is
    /// missing (a failed command's own code wins).
    pub const MISSING_ARTIFACT: i32 = 122;
    /// `--timeout` reached (as `timeout(1)` reports it).
    pub const TIMED_OUT: i32 = 124;
    /// Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    pub const INTERRUPTED: i32 = 130;
    /// The output's reader went away (`crabbox run -- yes | head -1`): what the command
    /// itself would have met writing into that pipe, SIGPIPE (128 + 13), as shells report it.
    pub const BROKEN_PIPE: i32 = 141;
    /// `run`/`ssh`: crabbox itself failed (the kind is in the error line and in JSON), as
    /// docker reports its own failures; 126 (cannot execute) and 127 (not found) come
    /// from the sandbox's shell, 124 is `--timeout`, 130 an interrupt.
    pub const CRABBOX: i32 = 125;

    /// The kind's name of one of SPEC's codes (1-7), for error lines and JSON.
    pub fn kind_name(code: i32) -> &'static str {
        match code {
            USAGE => "usage",
            AUTH => "auth",
            NOT_FOUND => "not_found",
            PROVISIONING => "provisioning",
            SYNC => "sync",
            SSH => "ssh",
            TIMED_OUT => "timeout",
            MISSING_ARTIFACT => "artifact",
            INTERRUPTED => "interrupted",
            _ => "internal",
        }
    }
}

/// What a provider failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderErrorKind {
    /// Credentials missing or refused.
    Auth,
    /// Credentials valid but lacking a permission.
    Permission,
    /// The sandbox (or snapshot) does not exist.
    NotFound,
    /// The provider cannot be reached or is overloaded; retrying later may work.
    Unavailable,
    /// The sandbox could not be created or started (error state, build failure, deadline).
    Provisioning,
    /// The provider cannot do this at all (ssh on `local`).
    Unsupported,
    /// SSH access could not be minted or used.
    Ssh,
    /// Uploading or unpacking the checkout failed.
    Sync,
    /// The request was refused as malformed.
    Invalid,
    /// Anything else.
    Other,
}

/// A provider failure, with a message fit to show a person (never a secret).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    pub message: String,
}

impl ProviderError {
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            message: message.into(),
        }
    }

    /// Does the sandbox (or what was asked for) not exist?
    pub fn is_not_found(&self) -> bool {
        self.kind == ProviderErrorKind::NotFound
    }
}

/// Everything the daemon can answer with instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed (bad slug, label, duration, empty command...).
    #[error("{0}")]
    InvalidArgument(String),
    /// No lease matches the name given (or the repo claims none).
    #[error("{0}")]
    NotFound(String),
    /// More than one lease matches `name`; `matches` describes each.
    #[error("{} matches {} leases: {}; name one by its id", echo(name), matches.len(), matches.join(", "))]
    Ambiguous { name: String, matches: Vec<String> },
    /// The lease is claimed by another repository and `--reclaim` was not given.
    #[error(
        "lease {lease} is claimed by {by}, not {repo}; pass --reclaim to take it for this repo"
    )]
    Claimed {
        /// `slug (id)`.
        lease: String,
        by: String,
        repo: String,
    },
    /// The lease cannot take the operation in its state: still being created, stopped
    /// while asked to run, failed, being released or released.
    #[error("lease {lease} is {state}{}; {hint}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    NotUsable {
        /// Its slug.
        lease: String,
        /// Its state's name.
        state: &'static str,
        /// Why it failed or was released, when it did.
        reason: Option<String>,
        /// What to do about it.
        hint: String,
    },
    /// The daemon is stopping and could not finish the request.
    #[error("{0}")]
    ShuttingDown(String),
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Collecting, packing or uploading the checkout failed.
    #[error("{0}")]
    Sync(String),
    /// The store could not be read or written; nothing that depended on the write was done.
    #[error("state store: {0}")]
    Store(String),
    /// A bug or a crashed actor; the message says what to report.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How much of a client's input an error message repeats.
const ECHO_MAX: usize = 120;

/// `s` quoted for an error message, cut to a readable length: a message carries what a
/// person needs to recognise their input, never an unbounded copy of it (a long enough
/// one would break the gRPC status it travels in).
pub fn echo(s: &str) -> String {
    if s.len() <= ECHO_MAX {
        return format!("{s:?}");
    }
    let mut end = ECHO_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// What kind of failure, as the CLI's exit codes see it (SPEC "CLI").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Internal,
    Usage,
    Auth,
    NotFound,
    Provisioning,
    Sync,
    Ssh,
    /// The lease is not in a state to do what was asked.
    NotReady,
}

impl ErrorKind {
    /// The wire name (in [`KIND_METADATA`]).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal",
            ErrorKind::Usage => "usage",
            ErrorKind::Auth => "auth",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Provisioning => "provisioning",
            ErrorKind::Sync => "sync",
            ErrorKind::Ssh => "ssh",
            ErrorKind::NotReady => "not_ready",
        }
    }

    /// What to do about a failure of this kind, in general (the message says what
    /// failed and, where it knows, what to do about this one).
    pub fn hint(self) -> &'static str {
        match self {
            ErrorKind::Internal => {
                "a fault of crabbox's own: `crabbox daemon logs` has the daemon's side; \
                 please report it with that"
            }
            ErrorKind::Usage => "`crabbox <command> --help` shows what the command takes",
            ErrorKind::Auth => {
                "check the provider's credentials (DAYTONA_API_KEY for daytona) where the \
                 daemon reads them; `crabbox doctor` checks them"
            }
            ErrorKind::NotFound => "`crabbox list --all` shows the leases the daemon knows",
            ErrorKind::Provisioning => {
                "the provider could not make or start the sandbox: `crabbox doctor` checks \
                 it, `crabbox daemon logs` has its answer; try again"
            }
            ErrorKind::Sync => {
                "the checkout could not be synced: `crabbox sync-plan` shows what would be \
                 sent; run again, or with --no-sync"
            }
            ErrorKind::Ssh => {
                "`crabbox doctor` checks that ssh is installed and the lease reachable"
            }
            ErrorKind::NotReady => {
                "the lease is busy or not started yet: `crabbox status` shows its state; \
                 try again when it is ready"
            }
        }
    }

    /// Parses a wire name; unknown names are `None` so old CLIs tolerate new kinds.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        Some(match s {
            "internal" => ErrorKind::Internal,
            "usage" => ErrorKind::Usage,
            "auth" => ErrorKind::Auth,
            "not_found" => ErrorKind::NotFound,
            "provisioning" => ErrorKind::Provisioning,
            "sync" => ErrorKind::Sync,
            "ssh" => ErrorKind::Ssh,
            "not_ready" => ErrorKind::NotReady,
            _ => return None,
        })
    }

    /// SPEC's exit code for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal => exit::INTERNAL,
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::Auth => exit::AUTH,
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::Provisioning => exit::PROVISIONING,
            ErrorKind::Sync => exit::SYNC,
            ErrorKind::Ssh | ErrorKind::NotReady => exit::SSH,
        }
    }

    /// The kind a bare gRPC code suggests, for statuses without our metadata.
    pub fn from_code(code: tonic::Code) -> ErrorKind {
        match code {
            tonic::Code::InvalidArgument => ErrorKind::Usage,
            tonic::Code::NotFound => ErrorKind::NotFound,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => ErrorKind::Auth,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => ErrorKind::Provisioning,
            _ => ErrorKind::Internal,
        }
    }
}

impl Error {
    /// The gRPC code and the exit-code kind: the one table.
    pub fn code_and_kind(&self) -> (tonic::Code, ErrorKind) {
        use ProviderErrorKind as P;
        use tonic::Code as C;
        match self {
            Error::InvalidArgument(_) => (C::InvalidArgument, ErrorKind::Usage),
            Error::NotFound(_) => (C::NotFound, ErrorKind::NotFound),
            Error::Ambiguous { .. } => (C::InvalidArgument, ErrorKind::NotFound),
            Error::Claimed { .. } => (C::FailedPrecondition, ErrorKind::NotFound),
            Error::NotUsable { .. } => (C::FailedPrecondition, ErrorKind::NotReady),
            Error::ShuttingDown(_) => (C::Unavailable, ErrorKind::Internal),
            Error::Sync(_) => (C::FailedPrecondition, ErrorKind::Sync),
            Error::Store(_) | Error::Internal(_) => (C::Internal, ErrorKind::Internal),
            Error::Provider(p) => match p.kind {
                P::Auth => (C::Unauthenticated, ErrorKind::Auth),
                P::Permission => (C::PermissionDenied, ErrorKind::Auth),
                P::NotFound => (C::NotFound, ErrorKind::NotFound),
                P::Unavailable => (C::Unavailable, ErrorKind::Provisioning),
                P::Provisioning => (C::FailedPrecondition, ErrorKind::Provisioning),
                P::Unsupported => (C::Unimplemented, ErrorKind::Usage),
                P::Ssh => (C::FailedPrecondition, ErrorKind::Ssh),
                P::Sync => (C::FailedPrecondition, ErrorKind::Sync),
                P::Invalid => (C::InvalidArgument, ErrorKind::Usage),
                P::Other => (C::Internal, ErrorKind::Internal),
            },
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let (code, kind) = e.code_and_kind();
        let mut status = tonic::Status::new(code, e.to_string());
        if let Ok(v) = kind.as_str().parse() {
            status.metadata_mut().insert(KIND_METADATA, v);
        }
        status
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Store(e.to_string())
    }
}

/// The exit-code kind of a status as the CLI receives it.
pub fn status_kind(status: &tonic::Status) -> ErrorKind {
    status
        .metadata()
        .get(KIND_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse)
        .unwrap_or_else(|| ErrorKind::from_code(status.code()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_exits_are_128_plus_the_signal_as_shells_report_them() {
        assert_eq!(exit::INTERRUPTED, 128 + nix::libc::SIGINT);
        assert_eq!(exit::BROKEN_PIPE, 128 + nix::libc::SIGPIPE);
    }

    #[test]
    fn kinds_survive_the_wire() {
        let not_usable = Error::NotUsable {
            lease: "swift-crab".into(),
            state: "creating",
            reason: None,
            hint: "wait with `crabbox status swift-crab --wait`".into(),
        };
        let cases = [
            (Error::NotFound("x".into()), 4, tonic::Code::NotFound),
            (
                Error::Ambiguous {
                    name: "x".into(),
                    matches: vec!["a".into(), "b".into()],
                },
                4,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::Claimed {
                    lease: "x".into(),
                    by: "/a".into(),
                    repo: "/b".into(),
                },
                4,
                tonic::Code::FailedPrecondition,
            ),
            (not_usable, 7, tonic::Code::FailedPrecondition),
            (
                Error::InvalidArgument("x".into()),
                2,
                tonic::Code::InvalidArgument,
            ),
            (Error::Sync("x".into()), 6, tonic::Code::FailedPrecondition),
            (Error::Store("x".into()), 1, tonic::Code::Internal),
            (Error::Internal("x".into()), 1, tonic::Code::Internal),
            (
                Error::Provider(ProviderError::new(ProviderErrorKind::Auth, "x")),
                3,
                tonic::Code::Unauthenticated,
            ),
        ];
        for (err, exit, code) in cases {
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status_kind(&status).exit_code(), exit);
        }
        let bare = tonic::Status::new(tonic::Code::Unauthenticated, "no");
        assert_eq!(status_kind(&bare).exit_code(), 3);
    }

    #[test]
    fn echoed_input_is_bounded() {
        assert_eq!(echo("swift-crab"), "\"swift-crab\"");
        let long = "é".repeat(10_000);
        let e = echo(&long);
        assert!(e.len() < 200 && e.ends_with("(20000 bytes)"), "{e}");
    }

    #[test]
    fn messages_are_built_from_the_fields() {
        let e = Error::NotUsable {
            lease: "swift-crab".into(),
            state: "failed",
            reason: Some("provisioning failed: quota".into()),
            hint: "run again to get a new one".into(),
        };
        assert_eq!(
            e.to_string(),
            "lease swift-crab is failed (provisioning failed: quota); run again to get a new one"
        );
        let e = Error::Ambiguous {
            name: "dup".into(),
            matches: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "\"dup\" matches 2 leases: a, b; name one by its id"
        );
    }
}
