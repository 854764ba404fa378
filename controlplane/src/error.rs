//! The one error type of the berth-controlplane library.

/// Errors of the control plane (tunnel server, node lifecycle, OpenStack simulator).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The OpenStack simulator's storage backend (sparse files, loop devices, by-id links).
    #[error("simulator backend: {0}")]
    Backend(String),
    /// A tunnel stream or agent connection failed.
    #[error("tunnel: {0}")]
    Tunnel(String),
    /// No connected agent serves the requested destination.
    #[error("{0}")]
    NoAgent(String),
    /// The agent refused or failed the dial (DIAL_RSP error).
    #[error("dial failed: {0}")]
    Dial(String),
    /// gRPC transport (serving the tunnel / node API).
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Node lifecycle (unknown node, invalid request).
    #[error("lifecycle: {0}")]
    Lifecycle(String),
    /// HTTP status/admin client.
    #[error("http: {0}")]
    Http(String),
    /// The registry's store (etcd or in memory) is unreachable or refused the request; nothing
    /// was written, the caller may retry.
    #[error("registry store unavailable: {0}")]
    Store(String),
    /// A stored value this binary cannot read (unknown schema version or corrupt JSON).
    #[error("registry store holds {key} that this binary cannot read: {reason}")]
    Schema { key: String, reason: String },
}

/// Result alias for the control plane.
pub type Result<T, E = Error> = std::result::Result<T, E>;
