//! The part of Firecracker's API micropod uses: request bodies as Firecracker's published
//! Swagger document names them (`tests/firecracker_api.rs` checks every request against it),
//! and the requests that configure, start and stop one VM.
//!
//! Firecracker rejects unknown fields, so the bodies carry only fields the schema defines;
//! optional ones are left out when micropod has nothing to say (Firecracker's defaults apply).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The drive id of the root disk (`PUT /drives/{drive_id}`).
pub const ROOT_DRIVE_ID: &str = "rootfs";
/// The interface id of the VM's one NIC (`PUT /network-interfaces/{iface_id}`).
pub const IFACE_ID: &str = "eth0";
/// `MachineConfiguration.vcpu_count` bounds; Firecracker also wants 1 or an even number.
pub const MAX_VCPUS: u8 = 32;
/// The instance state `GET /` reports once `InstanceStart` succeeded.
pub const STATE_RUNNING: &str = "Running";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
        }
    }
}

/// One API call. Displays as `PUT /boot-source`, which is how errors name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

impl Request {
    pub fn get(path: impl Into<String>) -> Self {
        Self {
            method: Method::Get,
            path: path.into(),
            body: None,
        }
    }

    pub fn put(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self {
            method: Method::Put,
            path: path.into(),
            // The bodies are structs of strings, integers, booleans and unit enums, which
            // always serialize.
            body: Some(serde_json::to_value(body).expect("API bodies always serialize")),
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method.as_str(), self.path)
    }
}

/// `BootSource`.
#[derive(Debug, Serialize)]
pub struct BootSource<'a> {
    pub kernel_image_path: &'a str,
    pub boot_args: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<&'a str>,
}

/// `Drive`, as a virtio-block device backed by a host file.
#[derive(Debug, Serialize)]
pub struct Drive<'a> {
    pub drive_id: &'a str,
    pub path_on_host: &'a str,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

/// `NetworkInterface`.
#[derive(Debug, Serialize)]
pub struct NetworkInterface<'a> {
    pub iface_id: &'a str,
    pub host_dev_name: &'a str,
    pub guest_mac: String,
}

/// `MachineConfiguration`. SMT, dirty page tracking, huge pages and CPU templates keep
/// Firecracker's defaults (off, off, none, none).
#[derive(Debug, Serialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
}

/// `InstanceActionInfo.action_type`.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum ActionType {
    InstanceStart,
    /// x86_64 only: Firecracker presses Ctrl+Alt+Del on the emulated i8042 keyboard controller.
    SendCtrlAltDel,
}

/// `InstanceActionInfo`.
#[derive(Debug, Serialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `InstanceInfo`, the answer to `GET /`.
#[derive(Debug, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: String,
    pub vmm_version: String,
}

/// `Error`, the body of every error answer.
#[derive(Debug, Deserialize)]
pub struct ApiError {
    pub fault_message: String,
}

/// `PUT /actions` with `action`.
pub fn action(action_type: ActionType) -> Request {
    Request::put("/actions", &InstanceActionInfo { action_type })
}
