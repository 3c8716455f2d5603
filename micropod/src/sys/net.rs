//! Network ioctls and socket options: the tun device, interface lookup, namespaces, `poll`.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
    time::Duration,
};

use nix::errno::Errno;

/// `struct ifreq`: an interface name, then the `ifr_ifru` union, of which the calls here use
/// the first member's bytes only: `ifr_flags` (a `short`) for the tun ioctls, `ifr_ifindex`
/// (an `int`) for `SIOCGIFINDEX`. The kernel copies the whole struct in and out, so the union
/// keeps its full size (and C's alignment).
#[repr(C, align(8))]
pub(crate) struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    ifru: [u8; IFRU_SIZE],
}

/// `ifr_ifru`'s size: its largest member, `struct ifmap`, takes 24 bytes on 64-bit Linux.
const IFRU_SIZE: usize = 24;

const _: () = assert!(
    size_of::<IfReq>() == 40 && size_of::<IfReq>() == size_of::<libc::ifreq>(),
    "the kernel's struct ifreq is 40 bytes on x86_64"
);

impl IfReq {
    /// A zeroed request for the interface `name`; `None` unless `name` fits with its NUL
    /// terminator (at most `IFNAMSIZ - 1` bytes) and holds no NUL itself.
    #[must_use]
    pub(crate) fn new(name: &str) -> Option<Self> {
        if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return None;
        }
        let mut ifr = Self {
            name: [0; libc::IFNAMSIZ],
            ifru: [0; IFRU_SIZE],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        Some(ifr)
    }

    /// `ifr_name`, NUL-terminated.
    #[cfg(test)]
    pub(crate) fn name(&self) -> &[u8; libc::IFNAMSIZ] {
        &self.name
    }

    /// `ifr_flags`.
    #[must_use]
    pub(crate) fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.ifru[0], self.ifru[1]])
    }

    pub(crate) fn set_flags(&mut self, flags: libc::c_short) {
        self.ifru[..size_of::<libc::c_short>()].copy_from_slice(&flags.to_ne_bytes());
    }

    /// `ifr_ifindex`.
    fn index(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.ifru[0], self.ifru[1], self.ifru[2], self.ifru[3]])
    }
}

/// `TUNSETIFF`: creates or attaches to the tun device named in `ifr`, with its flags.
pub(crate) fn tun_set_iff(tun: BorrowedFd<'_>, ifr: &mut IfReq) -> Result<(), Errno> {
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a live, exclusively
    // borrowed `IfReq` of exactly that size and layout, and `tun` is open while borrowed.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut *ifr) };
    Errno::result(ret).map(drop)
}

/// `TUNGETIFF`: the name and flags of the device `tun` is attached to, into `ifr`.
pub(crate) fn tun_get_iff(tun: BorrowedFd<'_>, ifr: &mut IfReq) -> Result<(), Errno> {
    // SAFETY: as in `tun_set_iff`: TUNGETIFF writes one `struct ifreq` into `ifr`.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNGETIFF, &raw mut *ifr) };
    Errno::result(ret).map(drop)
}

/// `TUNSETPERSIST`: whether the attached device outlives its last descriptor.
pub(crate) fn tun_set_persist(tun: BorrowedFd<'_>, on: bool) -> Result<(), Errno> {
    // SAFETY: TUNSETPERSIST takes its argument by value and touches no memory of ours.
    let ret = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(on),
        )
    };
    Errno::result(ret).map(drop)
}

/// `TUNSETOWNER`: the uid that may attach to the device without `CAP_NET_ADMIN`.
pub(crate) fn tun_set_owner(tun: BorrowedFd<'_>, uid: u32) -> Result<(), Errno> {
    // SAFETY: TUNSETOWNER takes the uid by value and touches no memory of ours.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, libc::c_ulong::from(uid)) };
    Errno::result(ret).map(drop)
}

/// A UDP socket of the calling thread's network namespace, for interface ioctls.
pub(crate) fn inet_dgram_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; a non-negative result is a new descriptor that
    // nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SIOCGIFINDEX` on `sock`: the index of the interface named in `ifr` (`ENODEV` if none).
pub(crate) fn if_index(sock: BorrowedFd<'_>, ifr: &mut IfReq) -> io::Result<libc::c_int> {
    // SAFETY: SIOCGIFINDEX reads the NUL-terminated name from and writes an int into a
    // struct ifreq; `ifr` has ifreq's size and layout, is exclusively borrowed and outlives
    // the call, and `sock` is open while borrowed.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFINDEX, &raw mut *ifr) };
    if rc == 0 {
        Ok(ifr.index())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_RCVTIMEO`: receives on `socket` fail with `EAGAIN` after `timeout`.
pub(crate) fn set_receive_timeout(socket: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        // The field types, not their names (musl's `libc` marks those as changing).
        tv_sec: timeout
            .as_secs()
            .try_into()
            .unwrap_or_else(|_| i32::MAX.into()),
        tv_usec: timeout.subsec_micros().into(),
    };
    let len = libc::socklen_t::try_from(size_of::<libc::timeval>()).expect("timeval is small");
    // SAFETY: the descriptor is the socket's own and stays open for the call (`socket` is
    // borrowed); `tv` is a live `timeval` and `len` its exact size, which SO_RCVTIMEO expects.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

/// `SIOCGIFINDEX` from `<linux/sockios.h>`, typed as `ioctl` takes it here (`libc` has it as
/// `unsigned long`, musl's `ioctl` an `int`).
const SIOCGIFINDEX: libc::Ioctl = 0x8933;

/// The `CLONE_NEW*` type of the namespace `ns` refers to (an nsfs file).
pub(crate) fn ns_type(ns: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which `ns` keeps open.
    let ret = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_NSTYPE) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// One `poll` for `POLLIN` on `fd`, waiting at most `timeout_ms` (negative: forever);
/// `Ok(false)` on timeout. `POLLERR`/`POLLHUP` count as ready. `EINTR` is returned as is.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: libc::c_int) -> Result<bool, Errno> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call (count 1), and `fd` is
    // open while borrowed.
    let ret = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    Errno::result(ret).map(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_members_sit_at_the_start_of_the_union() {
        let mut ifr = IfReq::new("lo").unwrap();
        ifr.set_flags(-0x7fff);
        assert_eq!(ifr.flags(), -0x7fff);
        ifr.ifru[..4].copy_from_slice(&7i32.to_ne_bytes());
        assert_eq!(ifr.index(), 7);
        assert!(IfReq::new("sixteen-chars-xx").is_none());
        assert!(IfReq::new("a\0b").is_none());
    }
}
