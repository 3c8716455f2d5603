//! The plugin's errors and their codes: the spec's well-known ones, and micropod's own from 100.

use crate::{
    ipam::IpamError,
    network::{AttachError, InputError, NetworkError, UpError},
    state::StateError,
};

/// Codes of micropod's own (the spec leaves 100 and up to plugins).
pub mod codes {
    /// A step of micropod's failed; the message says which.
    pub const FAILED: u32 = 100;
    /// The attachment, or an interface of its name in the sandbox, exists already.
    pub const EXISTS: u32 = 101;
    /// No address is left in the subnet (or the configuration's range).
    pub const NO_ADDRESS: u32 = 102;
    /// The network is up with settings other than the configuration's.
    pub const OTHER_SETTINGS: u32 = 103;
    /// The plugin lacks CAP_NET_ADMIN.
    pub const NOT_PRIVILEGED: u32 = 104;
    /// CHECK found the attachment not as ADD made it.
    pub const CHECK_FAILED: u32 = 105;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI version {version}: micropod supports 0.4.0, 1.0.0 and 1.1.0")]
    IncompatibleVersion { version: String },
    #[error("unsupported field {field:?}: {why}")]
    UnsupportedField { field: String, why: String },
    #[error(
        "no attachment of container {container_id} with interface {ifname} on network {network}"
    )]
    UnknownContainer {
        container_id: String,
        ifname: String,
        network: String,
    },
    #[error("invalid environment: {var} {why}")]
    Env { var: &'static str, why: String },
    #[error("cannot read the network configuration from stdin")]
    Io(#[source] std::io::Error),
    #[error("cannot decode the network configuration (JSON)")]
    Decode(#[source] serde_json::Error),
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("the network cannot take new containers: {reason}")]
    Unavailable { reason: String },
    #[error(
        "the network cannot take new containers, and existing ones may have limited connectivity: {reason}"
    )]
    Degraded { reason: String },
    #[error(
        "container {container_id} already has interface {ifname} on network {network} ({ip}); DEL it first"
    )]
    AttachmentExists {
        container_id: String,
        ifname: String,
        network: String,
        ip: std::net::Ipv4Addr,
    },
    #[error("the attachment is not as ADD made it: {}", .problems.join("; "))]
    Check { problems: Vec<String> },
    #[error("GC left {} problem(s): {}", .problems.len(), .problems.join("; "))]
    Gc { problems: Vec<String> },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Network(#[from] NetworkError),
}

impl CniError {
    /// The spec's error code for this error.
    #[must_use]
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion { .. } => 1,
            Self::UnsupportedField { .. } => 2,
            Self::UnknownContainer { .. } => 3,
            Self::Env { .. } => 4,
            Self::Io(_) => 5,
            Self::Decode(_) => 6,
            Self::Config(_) => 7,
            Self::Unavailable { .. } => 50,
            Self::Degraded { .. } => 51,
            Self::AttachmentExists { .. } => codes::EXISTS,
            Self::Check { .. } => codes::CHECK_FAILED,
            Self::Runtime(_) | Self::Gc { .. } => codes::FAILED,
            Self::Network(e) => network_code(e),
        }
    }

    /// The causes below the message, for the spec's `details`.
    #[must_use]
    pub fn details(&self) -> Option<String> {
        let mut out = Vec::new();
        let mut cur = std::error::Error::source(self);
        if matches!(self, Self::Network(_)) {
            // Transparent: its own message is this one's.
            cur = cur.and_then(std::error::Error::source);
        }
        while let Some(e) = cur {
            out.push(e.to_string());
            cur = e.source();
        }
        (!out.is_empty()).then(|| out.join(": "))
    }
}

fn network_code(e: &NetworkError) -> u32 {
    match e {
        NetworkError::NotPrivileged => codes::NOT_PRIVILEGED,
        NetworkError::Input(
            InputError::EndpointNetns { .. }
            | InputError::HostNetns { .. }
            | InputError::InvalidIfname(_),
        ) => 4,
        NetworkError::Input(_) => 7,
        NetworkError::Attach(
            AttachError::IfnameTaken { .. } | AttachError::DuplicateEndpoint { .. },
        ) => codes::EXISTS,
        NetworkError::Attach(AttachError::Allocate { source, .. })
            if matches!(
                **source,
                IpamError::Exhausted { .. } | IpamError::RangeExhausted { .. }
            ) =>
        {
            codes::NO_ADDRESS
        }
        NetworkError::Attach(AttachError::Allocate { .. }) => 7,
        NetworkError::Up(UpError::OtherSettings { .. }) => codes::OTHER_SETTINGS,
        NetworkError::State(StateError::LockBusy { .. }) => 11,
        _ => codes::FAILED,
    }
}
