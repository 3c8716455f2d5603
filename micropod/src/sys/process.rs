//! Processes: pidfds, what a child does between fork and exec, random bytes.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::Command,
};

/// `pidfd_open(pid, 0)`: a descriptor that keeps naming this very process (`ESRCH` if none).
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(pidfd, signal, NULL, 0)`, as `kill(2)` would send it (`ESRCH` once
/// the process is gone).
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes the pidfd (open while borrowed), the signal number, a
    // null siginfo (the kernel fills one in as for kill(2)) and flags 0; it touches no
    // memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Restores the default action of `SIGPIPE` (end the process), which the Rust runtime sets to
/// ignore: a command whose output is piped into `head` then ends quietly when the reader goes,
/// like any Unix tool, instead of panicking in `println!`. Not for servers, for which a peer
/// closing a socket is an error to handle, not a reason to die.
pub(crate) fn die_on_sigpipe() {
    // SAFETY: sets a signal disposition to SIG_DFL (no handler runs our code); called at the
    // start of `main`, before any thread that could race on dispositions exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Makes `cmd`'s child call `setsid` before exec: a session (and process group) of its own,
/// without a controlling terminal.
pub(crate) fn setsid_on_exec(cmd: &mut Command) {
    // SAFETY: the hook runs in the forked child before exec; setsid is async-signal-safe and
    // touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd`'s child get `SIGKILL` when its parent dies (`PR_SET_PDEATHSIG`), and refuse to
/// exec, failing the spawn with `parent_gone`, if its parent is no longer `parent` (the
/// caller's pid, read before the fork: the parent died before the prctl took effect).
pub(crate) fn kill_on_parent_death(
    cmd: &mut Command,
    parent: libc::pid_t,
    parent_gone: &'static str,
) {
    // SAFETY: the hook runs in the forked child before exec; prctl and getppid are
    // async-signal-safe syscalls and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other(parent_gone));
            }
            Ok(())
        });
    }
}

/// `getrandom(buf, 0)`: how many bytes of `buf` it filled from the kernel's entropy pool.
pub(crate) fn getrandom(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`, which we borrow
    // exclusively.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one of the two 32-bit halves of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, in two [`CapData`].
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// This thread's effective capability set (`capget`; cheaper than reading
/// `/proc/self/status`, which every command did before its first netlink request).
pub(crate) fn effective_capabilities() -> io::Result<u64> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `header` and `data` are the structs capget(2) takes for version 3 (two data
    // elements), live for the call; the kernel writes only into them.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[1].effective) << 32 | u64::from(data[0].effective))
}

#[cfg(test)]
mod tests {
    #[test]
    fn capget_reads_the_effective_set_proc_shows() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let shown = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(super::effective_capabilities().unwrap(), shown);
    }
}
