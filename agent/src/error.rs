//! The one error type of the berth-agent library, and its mappings to the local protocol's codes
//! and gRPC statuses.
use berth_proto::agent::local_error::Code;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("pod CIDR {0} has no free address")]
    Exhausted(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("state file {path}: {reason}")]
    State { path: String, reason: String },
    #[error("datapath: {0}")]
    Datapath(String),
    /// The tunnel client (connection to the tunnel server, node session).
    #[error("tunnel: {0}")]
    Tunnel(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Code for the framed local protocol.
    pub fn local_code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Exhausted(_) => Code::Exhausted,
            Error::Io { .. } | Error::State { .. } | Error::Datapath(_) => Code::Internal,
            Error::Tunnel(_) => Code::Unavailable,
        }
    }

    /// gRPC status for the Agent service.
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self.local_code() {
            Code::InvalidArgument => tonic::Status::invalid_argument(msg),
            Code::NotFound => tonic::Status::not_found(msg),
            Code::Exhausted => tonic::Status::resource_exhausted(msg),
            Code::Unavailable => tonic::Status::unavailable(msg),
            Code::AlreadyExists => tonic::Status::already_exists(msg),
            Code::Internal => tonic::Status::internal(msg),
        }
    }
}

impl From<aya::EbpfError> for Error {
    fn from(e: aya::EbpfError) -> Self {
        Error::Datapath(e.to_string())
    }
}
impl From<aya::programs::ProgramError> for Error {
    fn from(e: aya::programs::ProgramError) -> Self {
        Error::Datapath(e.to_string())
    }
}
impl From<aya::maps::MapError> for Error {
    fn from(e: aya::maps::MapError) -> Self {
        Error::Datapath(e.to_string())
    }
}
impl From<aya::pin::PinError> for Error {
    fn from(e: aya::pin::PinError) -> Self {
        Error::Datapath(e.to_string())
    }
}

/// Result alias for the agent.
pub type Result<T, E = Error> = std::result::Result<T, E>;
