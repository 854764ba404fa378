//! The one error type of the berth-csi library, and its one mapping to gRPC status codes.

/// Errors of the CSI driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Quota, volume cap or Nova's disk limit.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// Another operation on the same volume is in flight, or a paging token is stale.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    /// A dependency (metadata service, OpenStack) is not reachable right now.
    #[error("{0}")]
    Unavailable(String),
    /// Waiting for Cinder/Nova or for the device exceeded its bound.
    #[error("timed out: {0}")]
    Timeout(String),
    /// OpenStack answered with an error status.
    #[error("{service} answered HTTP {status}: {message}")]
    Api {
        service: &'static str,
        status: u16,
        message: String,
    },
    /// Transport-level failure talking to OpenStack.
    #[error("HTTP transport: {0}")]
    Http(#[from] reqwest::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A host command (mkfs, mount, resize2fs ...) failed.
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Internal(String),
}

/// Result alias for the driver.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Api { status, .. } => match status {
                404 => Code::NotFound,
                413 => Code::ResourceExhausted,
                400 | 409 => Code::FailedPrecondition,
                401 | 403 => Code::PermissionDenied,
                500..=599 => Code::Unavailable,
                _ => Code::Internal,
            },
            Error::Http(_) => Code::Unavailable,
            Error::Io(_) | Error::Command { .. } | Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: tonic::Status = Error::ResourceExhausted("cap".into()).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let s: tonic::Status = Error::Api {
            service: "cinder",
            status: 413,
            message: "quota".into(),
        }
        .into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("quota"));
        let s: tonic::Status = Error::Aborted("busy".into()).into();
        assert_eq!(s.code(), tonic::Code::Aborted);
    }
}
