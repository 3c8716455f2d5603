//! Process identity that survives pid reuse: a pid plus its start time from `/proc/<pid>/stat`.
//!
//! Records outlive the processes they name (a supervisor killed with `kill -9`, a host under
//! pid pressure), so a bare pid could later name an unrelated process. A [`ProcessRef`] only
//! matches the process that had that pid when it was recorded, and signals go through a pidfd
//! opened before the start time is checked, so they cannot reach a newcomer either.

use std::{io, os::fd::AsFd as _};

use serde::{Deserialize, Serialize};

use crate::sys;

/// One process: its pid and its start time (clock ticks after boot, field 22 of `stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub start_time: u64,
}

/// What `/proc/<pid>/stat` says about a process.
struct Stat {
    state: u8,
    start_time: u64,
}

fn stat(pid: u32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // `pid (comm) state ...`: comm may contain spaces and parentheses, so split after the
    // last ')'. Fields after it start at field 3 (state); starttime is field 22.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other(format!("malformed /proc/{pid}/stat")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let bad = || io::Error::other(format!("malformed /proc/{pid}/stat"));
    let state = fields
        .first()
        .and_then(|s| s.bytes().next())
        .ok_or_else(bad)?;
    let start_time = fields
        .get(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Stat { state, start_time })
}

impl ProcessRef {
    /// The process that has `pid` now.
    pub fn of(pid: u32) -> io::Result<Self> {
        Ok(Self {
            pid,
            start_time: stat(pid)?.start_time,
        })
    }

    /// This process.
    pub fn current() -> io::Result<Self> {
        Self::of(std::process::id())
    }

    /// Whether this very process still runs. A zombie (exited, not yet reaped by its parent)
    /// counts as gone: it runs nothing and holds nothing but its pid.
    pub fn is_alive(&self) -> bool {
        stat(self.pid)
            .is_ok_and(|s| s.start_time == self.start_time && !matches!(s.state, b'Z' | b'X'))
    }

    /// Sends `signal` to this process if it still runs; returns whether it did.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<bool> {
        let pid = libc::pid_t::try_from(self.pid).map_err(io::Error::other)?;
        let pidfd = match sys::pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
            Err(err) => return Err(err),
        };
        // The pidfd pins the process it was opened for; if that is still ours, the signal
        // can only reach it.
        if !self.is_alive() {
            return Ok(false);
        }
        match sys::pidfd_send_signal(pidfd.as_fd(), signal) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(err) => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn tracks_a_child_through_exit_and_reaping() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let me = ProcessRef::of(child.id()).unwrap();
        assert!(me.is_alive());
        // Another start time is another process.
        let impostor = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
        assert!(!impostor.signal(libc::SIGKILL).unwrap(), "never signalled");
        assert!(
            me.is_alive(),
            "the impostor's signal did not reach the child"
        );

        assert!(me.signal(libc::SIGKILL).unwrap());
        // Killed but not reaped: a zombie, which counts as gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while me.is_alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "SIGKILL not delivered"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!me.is_alive());
        assert!(!me.signal(libc::SIGKILL).unwrap());
    }

    #[test]
    fn current_process() {
        let me = ProcessRef::current().unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.is_alive());
        assert!(ProcessRef::of(u32::MAX).is_err());
    }
}
