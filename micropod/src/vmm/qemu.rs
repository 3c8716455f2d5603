//! QEMU's `microvm` machine. (Being written.)

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{VmSpec, Vmm, VmmError, VmmKind};

#[derive(Debug, Default)]
pub struct Qemu;

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
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
        vmm: "qemu",
        what: "anything yet".into(),
    }
}
