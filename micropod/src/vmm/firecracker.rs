//! Firecracker, over its API socket. (Being written.)

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{VmSpec, Vmm, VmmError, VmmKind};

#[derive(Debug, Default)]
pub struct Firecracker;

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }
    fn binary(&self) -> Result<PathBuf, VmmError> {
        Err(unsupported())
    }
    fn command(&self, _binary: &Path, _spec: &VmSpec) -> Result<Command, VmmError> {
        Err(unsupported())
    }
    fn start(&self, _spec: &VmSpec, _timeout: Duration) -> Result<(), VmmError> {
        Err(unsupported())
    }
    fn request_stop(&self, _spec: &VmSpec, _timeout: Duration) -> Result<(), VmmError> {
        Err(unsupported())
    }
}

fn unsupported() -> VmmError {
    VmmError::Unsupported {
        vmm: "firecracker",
        what: "anything yet".into(),
    }
}
