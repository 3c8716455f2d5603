//! Network namespaces: create named ones (as `ip netns add` does, under `/run/netns`), open
//! existing ones by path, and run code inside one.
//!
//! Entering a namespace is per thread (`setns(2)`), so [`NetNs::run`] runs the closure on a
//! scoped thread: the caller's thread never changes namespace, and sockets created inside keep
//! the namespace they were created in. [`NetNs::run_here`] enters and leaves on the calling
//! thread instead, for a short closure that must not pay for a thread (a netlink socket).

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    thread,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
    sys::statfs::{NSFS_MAGIC, fstatfs},
};

/// Where named namespaces live, shared with iproute2.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid namespace name {name:?}: use 1-64 characters from [A-Za-z0-9_.-]")]
    InvalidName { name: String },
    #[error("cannot create {NETNS_RUN_DIR} (are you root?)")]
    CreateRunDir(#[source] io::Error),
    #[error("cannot make {NETNS_RUN_DIR} a shared mount point (are you root?)")]
    PrepareRunDir(#[source] nix::Error),
    #[error("network namespace {path} already exists")]
    Exists { path: PathBuf },
    #[error("cannot create the mount point {path}")]
    CreateMountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a network namespace (needs CAP_SYS_ADMIN)")]
    Unshare(#[source] nix::Error),
    #[error("cannot bind-mount the new namespace on {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a network namespace (expected a file like /run/netns/NAME or /proc/PID/ns/net)"
    )]
    NotANetns { path: PathBuf },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot unmount network namespace {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot remove {path}")]
    RemoveMountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread to enter {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Device and inode of a namespace file: equal for two paths iff they name the same namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// An open network namespace. Holding the file keeps the namespace alive.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
    /// Named namespaces created by [`NetNs::create`] own their mount under `/run/netns`.
    owned_mount: bool,
}

impl NetNs {
    /// Creates a named network namespace at `/run/netns/NAME`, like `ip netns add NAME`.
    /// Its loopback is down, as in any new namespace.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        validate_name(name)?;
        prepare_run_dir()?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        // create_new: refuse to reuse a name someone else holds.
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => NetnsError::Exists { path: path.clone() },
                _ => NetnsError::CreateMountPoint {
                    path: path.clone(),
                    source,
                },
            })?;
        let mounted = thread::scope(|s| {
            s.spawn(|| -> Result<(), NetnsError> {
                // This thread alone moves to the new namespace and ends right after.
                unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare)?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|source| NetnsError::Mount {
                    path: path.clone(),
                    source,
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        if let Err(err) = mounted {
            // Best effort: the mount point is empty and ours.
            let _ = fs::remove_file(&path);
            return Err(err);
        }
        match File::open(&path) {
            Ok(file) => Ok(Self {
                path,
                file,
                owned_mount: true,
            }),
            Err(source) => {
                // Best effort: undo the mount we just made so nothing is left half-made.
                let _ = umount2(&path, MntFlags::MNT_DETACH);
                let _ = fs::remove_file(&path);
                Err(NetnsError::Open { path, source })
            }
        }
    }

    /// Opens an existing network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`, …) and
    /// checks that it is one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        if !is_netns(&file) {
            return Err(NetnsError::NotANetns { path });
        }
        Ok(Self {
            path,
            file,
            owned_mount: false,
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's identity: the nsfs device and inode, the same for every file that
    /// refers to it (what `ip netns identify` compares).
    pub fn id(&self) -> Result<NetnsId, NetnsError> {
        let meta = self.file.metadata().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        Ok(NetnsId {
            dev: std::os::unix::fs::MetadataExt::dev(&meta),
            ino: std::os::unix::fs::MetadataExt::ino(&meta),
        })
    }

    /// Runs `f` on the calling thread inside this namespace, then puts the thread back in its
    /// own: the cost of two `setns` instead of a thread's (a clone, a stack, a join: 0.3-0.5 ms
    /// here, a tenth of an attach). `f` must not block or yield to other work on this thread
    /// (an `.await`), which would run in this namespace too. Should the thread fail to go
    /// back, the process aborts: going on would act on the wrong namespace.
    pub fn run_here<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let own = Self::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        // Back on every path, a panic in `f` included.
        struct Back(NetNs);
        impl Drop for Back {
            fn drop(&mut self) {
                if let Err(e) = setns(self.0.file.as_fd(), CloneFlags::CLONE_NEWNET) {
                    log::error!(
                        "cannot return to network namespace {}: {e}; aborting rather than act on another namespace",
                        self.0.path.display()
                    );
                    std::process::abort();
                }
            }
        }
        let _back = Back(own);
        Ok(f())
    }

    /// Runs `f` on a thread inside this namespace and returns its result. Panics in `f` are
    /// propagated.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        thread::scope(|s| {
            let handle = thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, || {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetnsError::Enter {
                            path: self.path.clone(),
                            source,
                        }
                    })?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Spawn {
                    path: self.path.clone(),
                    source,
                })?;
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Removes a namespace made by [`NetNs::create`]: unmounts and deletes `/run/netns/NAME`.
    /// The namespace itself goes away when the last process and file holding it let go; its
    /// links are then deleted by the kernel (veth peers in other namespaces with them).
    /// A namespace opened with [`NetNs::open`] is just closed.
    pub fn remove(self) -> Result<(), NetnsError> {
        if !self.owned_mount {
            return Ok(());
        }
        let Self { path, file, .. } = self;
        drop(file);
        umount2(&path, MntFlags::MNT_DETACH).map_err(|source| NetnsError::Unmount {
            path: path.clone(),
            source,
        })?;
        fs::remove_file(&path).map_err(|source| NetnsError::RemoveMountPoint { path, source })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn validate_name(name: &str) -> Result<(), NetnsError> {
    let ok = (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NetnsError::InvalidName { name: name.into() })
    }
}

/// Makes `/run/netns` a shared mount point, as iproute2 does, so namespace mounts made here
/// are visible to every mount namespace that shares `/run`.
fn prepare_run_dir() -> Result<(), NetnsError> {
    fs::create_dir_all(NETNS_RUN_DIR).map_err(NetnsError::CreateRunDir)?;
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first.
        Err(nix::Error::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(NetnsError::PrepareRunDir)?;
            make_shared().map_err(NetnsError::PrepareRunDir)
        }
        Err(e) => Err(NetnsError::PrepareRunDir(e)),
    }
}

fn is_netns(file: &File) -> bool {
    if !fstatfs(file).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC) {
        return false;
    }
    crate::sys::ns_type(file.as_fd()).is_ok_and(|ns_type| ns_type == libc::CLONE_NEWNET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b", "with space", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["mp-1", "lab.host_2", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn regular_files_are_not_netns() {
        let err = NetNs::open("/proc/self/status").unwrap_err();
        assert!(matches!(err, NetnsError::NotANetns { .. }), "{err}");
    }

    #[test]
    fn missing_path_is_an_open_error() {
        let err = NetNs::open("/nonexistent/netns").unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
    }

    #[test]
    fn own_namespace_opens() {
        // Reading our own namespace needs no privilege.
        NetNs::current().unwrap();
    }
}
