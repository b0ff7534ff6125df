//! The daemon's error type and the one table that maps it to gRPC statuses and CLI exit
//! codes.
//!
//! Every error carries a message a person can act on: what failed, why, what to do. The
//! kind travels to the CLI in the `crabbox-error-kind` metadata so that the exit code is
//! decided by what went wrong, not guessed from the gRPC code.

use crate::provider::ProviderError;

/// The metadata key that carries an [`ErrorKind`] from the daemon to the CLI.
pub const KIND_METADATA: &str = "crabbox-error-kind";

/// Everything the daemon can answer with instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed (bad slug, label, duration, empty command...).
    #[error("{0}")]
    InvalidArgument(String),
    /// No lease matches the name given.
    #[error("{0}")]
    NotFound(String),
    /// More than one lease matches the name given; the message lists them.
    #[error("{0}")]
    Ambiguous(String),
    /// The lease is claimed by another repository and `--reclaim` was not given.
    #[error("{0}")]
    Claimed(String),
    /// The lease is in a state where the operation cannot happen (released, failed...).
    #[error("{0}")]
    WrongState(String),
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Collecting, packing or uploading the checkout failed.
    #[error("{0}")]
    Sync(String),
    /// The store could not be read or written.
    #[error("state store: {0}")]
    Store(String),
    /// A bug or a crashed actor; the message says what to report.
    #[error("internal error: {0}")]
    Internal(String),
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
            _ => return None,
        })
    }

    /// SPEC's exit code for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Auth => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::Provisioning => 5,
            ErrorKind::Sync => 6,
            ErrorKind::Ssh => 7,
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
        use crate::provider::ProviderErrorKind as P;
        match self {
            Error::InvalidArgument(_) => (tonic::Code::InvalidArgument, ErrorKind::Usage),
            Error::NotFound(_) => (tonic::Code::NotFound, ErrorKind::NotFound),
            Error::Ambiguous(_) => (tonic::Code::InvalidArgument, ErrorKind::NotFound),
            Error::Claimed(_) => (tonic::Code::FailedPrecondition, ErrorKind::NotFound),
            Error::WrongState(_) => (tonic::Code::FailedPrecondition, ErrorKind::Internal),
            Error::Sync(_) => (tonic::Code::FailedPrecondition, ErrorKind::Sync),
            Error::Store(_) | Error::Internal(_) => (tonic::Code::Internal, ErrorKind::Internal),
            Error::Provider(p) => match p.kind {
                P::Auth => (tonic::Code::Unauthenticated, ErrorKind::Auth),
                P::Permission => (tonic::Code::PermissionDenied, ErrorKind::Auth),
                P::NotFound => (tonic::Code::NotFound, ErrorKind::NotFound),
                P::Unavailable => (tonic::Code::Unavailable, ErrorKind::Provisioning),
                P::Provisioning => (tonic::Code::FailedPrecondition, ErrorKind::Provisioning),
                P::Unsupported => (tonic::Code::Unimplemented, ErrorKind::Usage),
                P::Ssh => (tonic::Code::FailedPrecondition, ErrorKind::Ssh),
                P::Sync => (tonic::Code::FailedPrecondition, ErrorKind::Sync),
                P::Invalid => (tonic::Code::InvalidArgument, ErrorKind::Usage),
                P::Other => (tonic::Code::Internal, ErrorKind::Internal),
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

impl From<crate::lease::IllegalTransition> for Error {
    fn from(e: crate::lease::IllegalTransition) -> Self {
        Error::WrongState(e.to_string())
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
    fn kinds_survive_the_wire() {
        let cases = [
            (Error::NotFound("x".into()), 4, tonic::Code::NotFound),
            (
                Error::Ambiguous("x".into()),
                4,
                tonic::Code::InvalidArgument,
            ),
            (
                Error::Claimed("x".into()),
                4,
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::InvalidArgument("x".into()),
                2,
                tonic::Code::InvalidArgument,
            ),
            (Error::Sync("x".into()), 6, tonic::Code::FailedPrecondition),
            (Error::Internal("x".into()), 1, tonic::Code::Internal),
        ];
        for (err, exit, code) in cases {
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status_kind(&status).exit_code(), exit);
        }
        let bare = tonic::Status::new(tonic::Code::Unauthenticated, "no");
        assert_eq!(status_kind(&bare).exit_code(), 3);
    }
}
