//! The two `/dev/kvm` ioctls the QEMU driver's KVM probe needs.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

/// `_IO(KVMIO, 0x00)` and `_IO(KVMIO, 0x01)` from `<linux/kvm.h>`.
// `libc::Ioctl`: the request's type differs between glibc (unsigned long) and musl (int).
const KVM_GET_API_VERSION: libc::Ioctl = 0xAE00;
const KVM_CREATE_VM: libc::Ioctl = 0xAE01;

/// `KVM_GET_API_VERSION` on an open `/dev/kvm`.
pub(crate) fn kvm_api_version(kvm: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; `kvm` is open
    // while borrowed.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(version)
    }
}

/// `KVM_CREATE_VM` (default machine type) on an open `/dev/kvm`: the new VM's descriptor.
pub(crate) fn kvm_create_vm(kvm: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: KVM_CREATE_VM takes the machine type by value (0: default) and returns a new fd
    // or -1; it touches no memory of ours.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `vm` is a descriptor the ioctl just returned to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(vm) })
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::AsFd as _};

    use super::*;

    #[test]
    fn probe_ioctls_where_kvm_opens() {
        // Without (access to) /dev/kvm there is nothing to probe.
        let Ok(kvm) = File::options().read(true).write(true).open("/dev/kvm") else {
            return;
        };
        assert_eq!(kvm_api_version(kvm.as_fd()).unwrap(), 12);
        // An OwnedFd: dropping it closes the VM.
        drop(kvm_create_vm(kvm.as_fd()).unwrap());
    }
}
