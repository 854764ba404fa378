//! The plugin's one error type, and its one mapping to CNI error codes.

/// CNI error codes this plugin returns (SPEC.md "Error codes"; 100+ are Berth's own).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Berth: the agent refused or failed the request.
    pub const AGENT_ERROR: u32 = 100;
    /// Berth: `CNI_IFNAME` already exists in the pod's network namespace.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// Berth: the node's pod CIDR has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 102;
    /// Berth: CHECK found the attachment different from what ADD set up.
    pub const CHECK_FAILED: u32 = 103;
}

/// Everything that can go wrong in the plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("incompatible CNI version {version:?}: berth supports {supported}")]
    IncompatibleVersion { version: String, supported: String },
    #[error("unsupported field {key}={value}: {why}")]
    UnsupportedField {
        key: String,
        value: String,
        why: String,
    },
    #[error("unknown container {0}")]
    UnknownContainer(String),
    #[error("invalid environment variables: {0}")]
    InvalidEnv(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("cannot decode network configuration on stdin: {0}")]
    Decode(String),
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error("berth-agent is not reachable at {socket}: {reason}; try again later")]
    AgentUnreachable { socket: String, reason: String },
    /// A transient condition the runtime's retry resolves (e.g. the address allocated for this
    /// ADD was reclaimed while the ADD stalled).
    #[error("{0}; try again")]
    Retry(String),
    #[error("berth-agent is not available at {socket}: {reason}")]
    NotAvailable { socket: String, reason: String },
    #[error("berth-agent: {0}")]
    Agent(String),
    #[error("interface {ifname} already exists in network namespace {netns}")]
    InterfaceExists { ifname: String, netns: String },
    #[error("no free pod address: {0}")]
    Exhausted(String),
    #[error("check failed: {0}")]
    CheckFailed(String),
}

impl Error {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Error::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            Error::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            Error::UnknownContainer(_) => code::UNKNOWN_CONTAINER,
            Error::InvalidEnv(_) => code::INVALID_ENV,
            Error::Io { .. } => code::IO_FAILURE,
            Error::Decode(_) => code::DECODE_FAILURE,
            Error::InvalidConfig(_) => code::INVALID_CONFIG,
            Error::AgentUnreachable { .. } | Error::Retry(_) => code::TRY_AGAIN_LATER,
            Error::NotAvailable { .. } => code::NOT_AVAILABLE,
            Error::Agent(_) => code::AGENT_ERROR,
            Error::InterfaceExists { .. } => code::INTERFACE_EXISTS,
            Error::Exhausted(_) => code::ADDRESSES_EXHAUSTED,
            Error::CheckFailed(_) => code::CHECK_FAILED,
        }
    }

    /// Short message for the error JSON's `msg`.
    pub fn msg(&self) -> &'static str {
        match self {
            Error::IncompatibleVersion { .. } => "incompatible CNI version",
            Error::UnsupportedField { .. } => "unsupported field",
            Error::UnknownContainer(_) => "unknown container",
            Error::InvalidEnv(_) => "invalid environment variables",
            Error::Io { .. } => "I/O failure",
            Error::Decode(_) => "failed to decode network configuration",
            Error::InvalidConfig(_) => "invalid network configuration",
            Error::AgentUnreachable { .. } | Error::Retry(_) => "try again later",
            Error::NotAvailable { .. } => "plugin not available",
            Error::Agent(_) => "berth-agent error",
            Error::InterfaceExists { .. } => "interface already exists",
            Error::Exhausted(_) => "pod addresses exhausted",
            Error::CheckFailed(_) => "check failed",
        }
    }

    /// Helper for I/O errors with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The error JSON the runtime reads from stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.msg(),
            "details": self.to_string(),
        })
    }
}

/// Result alias for the plugin.
pub type Result<T, E = Error> = std::result::Result<T, E>;
