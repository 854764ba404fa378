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
}

/// Result alias for the control plane.
pub type Result<T, E = Error> = std::result::Result<T, E>;
