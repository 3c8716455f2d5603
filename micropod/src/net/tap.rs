//! Persistent TAP devices through the `/dev/net/tun` ioctls.
//!
//! The kernel refuses to create tun/tap devices over rtnetlink, so they are made with
//! `TUNSETIFF` + `TUNSETPERSIST` on `/dev/net/tun`. Everything else (up/down, addresses,
//! bridge ports, deletion) goes over netlink like any other link.
//!
//! A TAP is created, like any tun device, in the network namespace the calling thread was in
//! when it opened `/dev/net/tun`; use [`super::NetNs::run`] to create one elsewhere.
//!
//! VMMs re-open a persistent TAP by name with `TUNSETIFF`, and their flags then replace ours:
//! Firecracker asks for `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, QEMU for `IFF_TAP | IFF_NO_PI`
//! plus `IFF_VNET_HDR` when it can use it and `IFF_MULTI_QUEUE` only with `queues > 1`.
//! The one flag that must match on re-open is `IFF_MULTI_QUEUE`, so TAPs made here are
//! single-queue, which also means one attached file descriptor at a time.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, open},
    sys::stat::Mode,
    unistd,
};

use super::link::{IFNAME_MAX, validate_name};
use crate::sys::{self, IfReq};

/// The clone device every tun/tap is made and attached through.
pub const TUN_DEVICE: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {name:?}: 1-{IFNAME_MAX} bytes, no '/', ':', '%', NUL or whitespace")]
    InvalidName { name: String },
    #[error("cannot open {TUN_DEVICE} (is the tun module loaded? needs CAP_NET_ADMIN)")]
    OpenTun(#[source] Errno),
    #[error(
        "a network interface named {name} already exists; delete it or pick another name \
         (an existing device is never adopted)"
    )]
    Exists { name: String },
    #[error("cannot create TAP {name} (needs CAP_NET_ADMIN in its network namespace)")]
    Create {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot give TAP {name} to uid {uid}; check that the uid is valid here")]
    SetOwner {
        name: String,
        uid: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot make TAP {name} persistent")]
    SetPersist {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("no TAP named {name} in this network namespace; create it first")]
    NotFound { name: String },
    #[error(
        "{name} is not a single-queue TAP device (a TUN, a multi-queue TAP or another kind of \
         link); pick the right name"
    )]
    NotATap { name: String },
    #[error(
        "TAP {name} is already attached to another file descriptor (a single-queue TAP takes \
         one; is a VMM using it?)"
    )]
    Busy { name: String },
    #[error("cannot attach to TAP {name} (needs CAP_NET_ADMIN or to be its owner)")]
    Attach {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot read the flags of TAP {name}")]
    GetFlags {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot make TAP {name} non-persistent")]
    ClearPersist {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot write a frame to TAP {name} (EIO: the link is down; bring it up first)")]
    Send {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("TAP {name} took {written} of a {len}-byte frame")]
    ShortWrite {
        name: String,
        written: usize,
        len: usize,
    },
    #[error("cannot wait for a frame on TAP {name}")]
    Poll {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot read a frame from TAP {name}")]
    Recv {
        name: String,
        #[source]
        source: Errno,
    },
}

/// Creates a persistent TAP `name` in the calling thread's network namespace, down and
/// without addresses, owned by `owner` (a uid that may then attach without `CAP_NET_ADMIN`)
/// if given.
///
/// Fails with [`TapError::Exists`] if any link of that name exists: the kernel checks and
/// creates atomically (`IFF_TUN_EXCL`), so someone else's device is never adopted. The
/// device outlives this call until deleted (over rtnetlink, like any link, or with
/// [`make_transient`]).
pub fn create_persistent(name: &str, owner: Option<u32>) -> Result<(), TapError> {
    let mut ifr = request(name)?;
    let fd = open_tun()?;
    // IFF_VNET_HDR: what Firecracker asks for on re-open anyway; it only sets the default.
    ifr.set_flags(flags(
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL,
    ));
    sys::tun_set_iff(fd.as_fd(), &mut ifr).map_err(|source| match source {
        // EBUSY from IFF_TUN_EXCL; EEXIST if the name clashes with an altname.
        Errno::EBUSY | Errno::EEXIST => TapError::Exists { name: name.into() },
        source => TapError::Create {
            name: name.into(),
            source,
        },
    })?;
    // Persistence last: if any step fails, closing `fd` deletes the half-made device.
    if let Some(uid) = owner {
        sys::tun_set_owner(fd.as_fd(), uid).map_err(|source| TapError::SetOwner {
            name: name.into(),
            uid,
            source,
        })?;
    }
    sys::tun_set_persist(fd.as_fd(), true).map_err(|source| TapError::SetPersist {
        name: name.into(),
        source,
    })?;
    log::debug!("created persistent TAP {name}");
    Ok(())
}

/// Makes the persistent TAP `name` non-persistent, which deletes it as soon as this call lets
/// go of it. Fails with [`TapError::Busy`] while a VMM holds it.
pub fn make_transient(name: &str) -> Result<(), TapError> {
    let tap = Tap::open(name)?;
    sys::tun_set_persist(tap.as_fd(), false).map_err(|source| TapError::ClearPersist {
        name: name.into(),
        source,
    })
}

/// A file descriptor attached to an existing TAP, as a VMM holds it: raw Ethernet frames,
/// no packet-information or virtio-net header. The device stays when this is dropped.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP `name` in the calling thread's network namespace.
    /// Fails with [`TapError::NotFound`] rather than creating one, and with
    /// [`TapError::Busy`] while another fd (a VMM) is attached. As with any attach, its flags
    /// (no vnet header) replace the device's until the next one.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut ifr = request(name)?;
        let fd = open_tun()?;
        // Without IFF_TUN_EXCL, TUNSETIFF attaches to an existing device or creates one.
        ifr.set_flags(flags(libc::IFF_TAP | libc::IFF_NO_PI));
        sys::tun_set_iff(fd.as_fd(), &mut ifr).map_err(|source| match source {
            Errno::EBUSY => TapError::Busy { name: name.into() },
            Errno::EINVAL => TapError::NotATap { name: name.into() },
            source => TapError::Attach {
                name: name.into(),
                source,
            },
        })?;
        sys::tun_get_iff(fd.as_fd(), &mut ifr).map_err(|source| TapError::GetFlags {
            name: name.into(),
            source,
        })?;
        // A device we attached to is persistent (a non-persistent single-queue one would be
        // busy); one that is not was just created by us and goes away when `fd` closes.
        if ifr.flags() & flags(libc::IFF_PERSIST) == 0 {
            return Err(TapError::NotFound { name: name.into() });
        }
        Ok(Self {
            fd,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one Ethernet frame (destination MAC first, no preamble or FCS). The kernel
    /// refuses frames (`EIO`) while the link is down.
    pub fn send(&self, frame: &[u8]) -> Result<(), TapError> {
        let written = unistd::write(&self.fd, frame).map_err(|source| TapError::Send {
            name: self.name.clone(),
            source,
        })?;
        if written != frame.len() {
            return Err(TapError::ShortWrite {
                name: self.name.clone(),
                written,
                len: frame.len(),
            });
        }
        Ok(())
    }

    /// Reads one Ethernet frame into `buf`, waiting at most `timeout`; `Ok(None)` if none
    /// came. A frame longer than `buf` is truncated, so give at least MTU + 14 bytes.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<usize>, TapError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_readable(self.fd.as_fd(), left).map_err(|source| TapError::Poll {
                name: self.name.clone(),
                source,
            })? {
                return Ok(None);
            }
            match unistd::read(&self.fd, buf) {
                Ok(n) => return Ok(Some(n)),
                // The fd is non-blocking: someone else read the frame first; wait again.
                Err(Errno::EAGAIN | Errno::EINTR) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(source) => {
                    return Err(TapError::Recv {
                        name: self.name.clone(),
                        source,
                    });
                }
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn open_tun() -> Result<OwnedFd, TapError> {
    open(
        TUN_DEVICE,
        OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(TapError::OpenTun)
}

/// The `ifr_flags` value of `IFF_*` tun flags: the kernel's `short`, so `IFF_TUN_EXCL`
/// (0x8000) lands on the sign bit, as in C.
fn flags(bits: libc::c_int) -> libc::c_short {
    bits as libc::c_short
}

/// A zeroed `struct ifreq` for `name`, which must be a plain interface name: a `%` would let
/// the kernel pick the name (`tap%d`), an empty one would give `tap0`.
fn request(name: &str) -> Result<IfReq, TapError> {
    if validate_name(name).is_err() || name.contains('%') {
        return Err(TapError::InvalidName { name: name.into() });
    }
    // At most IFNAME_MAX bytes (checked above), so the name stays NUL-terminated.
    IfReq::new(name).ok_or_else(|| TapError::InvalidName { name: name.into() })
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, Errno> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so that a sub-millisecond remainder still waits instead of spinning.
        let ms = left.as_micros().div_ceil(1000);
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        match sys::poll_readable(fd, ms) {
            // POLLERR/POLLHUP count as readable: the read then reports the error.
            Ok(ready) => return Ok(ready),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_ioctl() {
        for bad in ["", "a/b", "tap%d", "sixteen-chars-xx", "a b"] {
            let err = request(bad).err();
            assert!(
                matches!(err, Some(TapError::InvalidName { .. })),
                "{bad:?}: {err:?}"
            );
        }
        let ifr = request("fifteen-chars-x").unwrap();
        assert_eq!(&ifr.name()[..15], b"fifteen-chars-x");
        assert_eq!(ifr.name()[15], 0, "name is NUL-terminated");
    }
}
