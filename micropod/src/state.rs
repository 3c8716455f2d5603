//! The state dir: one lock, atomic JSON documents.
//!
//! Layout of `<root>` (default `/var/lib/micropod`, created 0700):
//! - `lock`: an empty file. [`StateDir::lock`] takes an exclusive `flock(2)` on it; every
//!   read-modify-write of state happens while holding it. The kernel drops the lock when the
//!   [`StateLock`] is dropped or the process dies, even by `kill -9`, so no stale lock survives
//!   a crash. The descriptor is close-on-exec, so spawned VMMs do not inherit the lock.
//! - other lock files, for jobs that want one runner at a time without holding the state lock
//!   ([`StateDir::try_lock_file`]).
//! - `<name>`: JSON documents, each replaced atomically (temp file, fdatasync, rename; see
//!   [`StateDir::write_json`] for why the dir itself is not synced). A reader sees the old or the new document, never a torn one, and a crash leaves at
//!   worst a stale `.<name>.tmp-<pid>` behind, which readers never look at and the next write
//!   of `<name>` removes.
//!
//! - `spare/`: empty files made ahead of need ([`StateDir::make_spares`]), which shelf writes
//!   rename into place instead of creating a file (see [`Shelf::write`] for why).
//!
//! Because writes are atomic renames, status commands may read without the lock
//! ([`StateDir::read_json_unlocked`]); they just may see a state that is about to change.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
        mpsc::RecvTimeoutError,
    },
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use serde::{Serialize, de::DeserializeOwned};

/// Name of the lock file inside the state dir; not usable as a document name.
pub const LOCK_FILE: &str = "lock";

/// Size of a slot file ([`StateDir::write_slot`]): one page.
pub const SLOT_SIZE: usize = 4096;

/// Size of a hint file ([`StateDir::write_hint`]).
pub const HINT_WIDTH: usize = 32;

/// How long a command waits for the state lock before it says so.
const LOCK_WAIT_NOTICE: Duration = Duration::from_millis(250);

/// Where spare files wait to be taken ([`StateDir::make_spares`]).
pub const SPARE_DIR: &str = "spare";

/// Longest accepted document name, leaving room for the temp-file decoration within NAME_MAX.
const MAX_NAME_LEN: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid state document name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot create the state dir {path}{}", create_dir_hint(source))]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the state lock file {path}{}", io_hint(source))]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}{}", lock_hint(source))]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another micropod command has held {path} for {waited:?}; try again once it is done")]
    LockBusy { path: PathBuf, waited: Duration },
    #[error("cannot read the state file {path}{}", io_hint(source))]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot parse the state file {path}: it is corrupted or from an incompatible micropod \
         version; inspect it, or move it aside to start from scratch (what it recorded is then \
         forgotten)"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot serialize the state document for {path} (a bug in micropod)")]
    Serialize {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}{}", io_hint(source))]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush {path} to disk{}", io_hint(source))]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {from} to {path}{}", io_hint(source))]
    Rename {
        from: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}{}", io_hint(source))]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to do about the common errors; the errno text itself comes with the `#[source]`.
fn io_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            " (permission denied: run as root or choose another --state-dir)"
        }
        Some(libc::EROFS) => " (read-only file system: choose another --state-dir)",
        Some(libc::ENOSPC | libc::EDQUOT) => " (no space left on the device: free some space)",
        Some(libc::ENOTDIR) => " (a path component is not a directory: choose another --state-dir)",
        _ => "",
    }
}

fn create_dir_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        // create_dir_all reports EEXIST when the path exists but is not a directory.
        Some(libc::EEXIST) => " (it exists but is not a directory: choose another --state-dir)",
        _ => io_hint(err),
    }
}

fn lock_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::ENOLCK | libc::EOPNOTSUPP) => {
            " (the file system does not support flock: choose a --state-dir on a local file system)"
        }
        _ => io_hint(err),
    }
}

/// The state directory. Cheap to create; nothing touches the disk before [`StateDir::lock`].
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
    /// Shelf writes (of this value and its clones' shelves) that found no spare file.
    spare_misses: Arc<AtomicU32>,
    /// How long [`Self::lock`] waits for another command's lock; `None`: as long as it takes.
    lock_wait: Option<Duration>,
}

/// Proof of holding the exclusive state lock. Unlocks when dropped.
#[derive(Debug)]
#[must_use = "the state lock is released as soon as this is dropped"]
pub struct StateLock {
    /// Which dir this lock belongs to, to catch mixing up two state dirs in debug builds.
    root: PathBuf,
    _file: Flock<File>,
}

/// An exclusive lock on a file of its own in the state dir ([`StateDir::try_lock_file`]).
/// Unlocks when dropped.
#[derive(Debug)]
#[must_use = "the lock is released as soon as this is dropped"]
pub struct FileLock {
    _file: Flock<File>,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            spare_misses: Arc::default(),
            lock_wait: None,
        }
    }

    /// [`Self::lock`] gives up after `wait` with [`StateError::LockBusy`] instead of waiting
    /// as long as another command holds the lock (for callers that must answer in time, such
    /// as a CNI plugin, whose runtime can try again).
    #[must_use]
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = Some(wait);
        self
    }

    /// Whether a shelf write of this state dir (or of a clone) had to make a file because no
    /// spare was ready: time for a refill ([`Self::make_spares`]).
    pub fn spares_ran_out(&self) -> bool {
        self.spare_misses.load(Ordering::Relaxed) > 0
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the dir (0700, parents too) if needed and takes the exclusive lock on
    /// `<root>/<lock>`, waiting as long as another holder keeps it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|source| StateError::CreateDir {
                path: self.root.clone(),
                source,
            })?;
        self.lock_existing()?.ok_or_else(|| StateError::OpenLock {
            path: self.root.join(LOCK_FILE),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }

    /// [`Self::lock`] for a dir that should exist already: `Ok(None)`, and nothing created,
    /// when it does not (for background work that must not bring back a removed state dir).
    pub fn lock_existing(&self) -> Result<Option<StateLock>, StateError> {
        let path = self.root.join(LOCK_FILE);
        let Some(file) = open_lock_file(&path)? else {
            return Ok(None);
        };
        let lock_err = |errno: Errno| StateError::Lock {
            path: path.clone(),
            source: io::Error::from(errno),
        };
        // Try first, so that a wait is announced instead of looking like a hang.
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => {
                return Ok(Some(StateLock {
                    root: self.root.clone(),
                    _file: locked,
                }));
            }
            Err((file, Errno::EWOULDBLOCK)) => file,
            Err((_, errno)) => return Err(lock_err(errno)),
        };
        if let Some(limit) = self.lock_wait {
            // Polled, since flock(2) takes no timeout; most waits are a few milliseconds.
            let started = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(2));
                file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    Ok(locked) => {
                        return Ok(Some(StateLock {
                            root: self.root.clone(),
                            _file: locked,
                        }));
                    }
                    Err((file, Errno::EWOULDBLOCK)) if started.elapsed() < limit => file,
                    Err((_, Errno::EWOULDBLOCK)) => {
                        return Err(StateError::LockBusy {
                            path,
                            waited: limit,
                        });
                    }
                    Err((_, errno)) => return Err(lock_err(errno)),
                };
            }
        }
        // Most waits are another command's few milliseconds; announce only a long one.
        let (waited, long_wait) = std::sync::mpsc::channel::<()>();
        let shown = path.clone();
        std::thread::spawn(move || {
            if long_wait.recv_timeout(LOCK_WAIT_NOTICE) == Err(RecvTimeoutError::Timeout) {
                log::info!(
                    "waiting for {}: another micropod command holds the state lock",
                    shown.display()
                );
            }
        });
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(locked) => {
                    let _ = waited.send(());
                    return Ok(Some(StateLock {
                        root: self.root.clone(),
                        _file: locked,
                    }));
                }
                // A signal interrupted the wait; keep waiting.
                Err((again, Errno::EINTR)) => file = again,
                Err((_, errno)) => return Err(lock_err(errno)),
            }
        }
    }

    /// Takes an exclusive lock of its own on `<root>/<name>` (an empty file, not a document)
    /// without waiting: `Ok(None)` if someone else holds it or the dir does not exist. For a
    /// job that needs one runner at a time, independent of the state lock.
    pub fn try_lock_file(&self, name: &str) -> Result<Option<FileLock>, StateError> {
        let path = self.doc_path(name)?;
        let Some(file) = open_lock_file(&path)? else {
            return Ok(None);
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => Ok(Some(FileLock { _file: locked })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(StateError::Lock {
                path,
                source: io::Error::from(errno),
            }),
        }
    }

    /// [`Self::try_lock_file`], waiting for the holder (`Ok(None)` only if the dir does not
    /// exist): for a command that must not run beside that job.
    pub fn lock_file(&self, name: &str) -> Result<Option<FileLock>, StateError> {
        let path = self.doc_path(name)?;
        let Some(mut file) = open_lock_file(&path)? else {
            return Ok(None);
        };
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(locked) => return Ok(Some(FileLock { _file: locked })),
                Err((again, Errno::EINTR)) => file = again,
                Err((_, errno)) => {
                    return Err(StateError::Lock {
                        path,
                        source: io::Error::from(errno),
                    });
                }
            }
        }
    }

    /// Reads `<root>/<name>` as JSON; `Ok(None)` if it does not exist.
    pub fn read_json<T: DeserializeOwned>(
        &self,
        lock: &StateLock,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        self.check_lock(lock);
        self.read_json_unlocked(name)
    }

    /// Like [`StateDir::read_json`] without the lock, for read-only commands. Safe because
    /// writers replace documents atomically; the result may be outdated a moment later.
    pub fn read_json_unlocked<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.doc_path(name)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Atomically replaces `<root>/<name>` with `value` as JSON: writes `.<name>.tmp-<pid>`,
    /// fdatasyncs it and renames it over `<name>`. Also removes temp files of `<name>` left by
    /// writers that died (under the lock, no other writer can be running).
    ///
    /// The rename is what makes the write atomic for other processes, and a killed writer
    /// leaves the old document whole. The data sync means a power cut can never leave a
    /// renamed but empty file. The directory is deliberately not synced: a power cut may then
    /// bring back the previous document, which is harmless for micropod, whose documents
    /// describe kernel objects that do not survive a reboot either (the next reconcile
    /// releases whatever is gone), and it saves a disk flush on every attach.
    pub fn write_json<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.write(lock, name, value, true)
    }

    /// [`Self::write_json`] without the data sync: still atomic for every other process and
    /// safe against a killed writer (the page cache is shared), but a power cut may lose it or
    /// leave it empty. For short-lived intent records that are rewritten with
    /// [`Self::write_json`] moments later.
    pub fn write_json_unsynced<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.write(lock, name, value, false)
    }

    fn write<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
        sync: bool,
    ) -> Result<(), StateError> {
        self.check_lock(lock);
        let path = self.doc_path(name)?;
        // Compact: documents are rewritten on every change (`jq` makes them readable).
        let mut bytes = serde_json::to_vec(value).map_err(|source| StateError::Serialize {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        self.remove_stale_temps(name);
        let tmp = self
            .root
            .join(format!(".{name}.tmp-{}", std::process::id()));
        rename_into_place(&tmp, &path, write_new(&tmp, &bytes, sync))
    }

    /// Overwrites the hint `<root>/<name>` in place with `text` (at most [`HINT_WIDTH`] - 1
    /// bytes, padded, so every write covers the last one): one `pwrite`, no temp file and no
    /// rename, which on ext4 would start writeback of the replaced file. Not atomic for other
    /// processes and never synced, so only for values that are a hint under the lock: a
    /// reader must cope with a missing or garbled one ([`Self::read_hint`] returns `None`).
    pub fn write_hint(&self, lock: &StateLock, name: &str, text: &str) -> Result<(), StateError> {
        use std::os::unix::fs::FileExt as _;
        self.check_lock(lock);
        let path = self.doc_path(name)?;
        assert!(text.len() < HINT_WIDTH, "hint {text:?} is too long");
        let mut bytes = [b' '; HINT_WIDTH];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        bytes[HINT_WIDTH - 1] = b'\n';
        let write_err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|f| f.write_all_at(&bytes, 0))
            .map_err(write_err)
    }

    /// The hint `<root>/<name>` ([`Self::write_hint`]), trimmed; `None` if absent or unreadable.
    pub fn read_hint(&self, lock: &StateLock, name: &str) -> Option<String> {
        self.check_lock(lock);
        let text = fs::read_to_string(self.doc_path(name).ok()?).ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }

    /// Puts `value` in the slot `<root>/<name>`: a file that stays, overwritten in place with
    /// one `pwrite` of [`SLOT_SIZE`] bytes (the JSON padded with spaces), for records that
    /// come and go with every command (the intents): no inode is made or freed, which on an
    /// ext4 without a journal costs a scan past every recently freed inode. A write of one
    /// page at offset 0 is one copy that a `kill -9` cannot cut, so readers under the lock see
    /// the old or the new value; unsynced, like [`Self::write_json_unsynced`]. A value too
    /// large for a slot is written as a whole new file instead.
    pub fn write_slot<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.check_lock(lock);
        let path = self.doc_path(name)?;
        let bytes = serde_json::to_vec(value).map_err(|source| StateError::Serialize {
            path: path.clone(),
            source,
        })?;
        self.fill_slot(&path, &bytes)
    }

    /// Empties the slot `<root>/<name>` ([`Self::write_slot`]).
    pub fn clear_slot(&self, lock: &StateLock, name: &str) -> Result<(), StateError> {
        self.check_lock(lock);
        let path = self.doc_path(name)?;
        if !path.exists() {
            return Ok(());
        }
        self.fill_slot(&path, b"")
    }

    /// The value in the slot `<root>/<name>`; `None` if empty or absent.
    pub fn read_slot<T: DeserializeOwned>(
        &self,
        lock: &StateLock,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        self.check_lock(lock);
        let path = self.doc_path(name)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    fn fill_slot(&self, path: &Path, json: &[u8]) -> Result<(), StateError> {
        use std::os::unix::fs::FileExt as _;
        if json.len() >= SLOT_SIZE {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let tmp = self
                .root
                .join(format!(".{name}.tmp-{}", std::process::id()));
            let _ = fs::remove_file(&tmp);
            return rename_into_place(&tmp, path, write_new(&tmp, json, false));
        }
        let mut page = vec![b' '; SLOT_SIZE];
        page[..json.len()].copy_from_slice(json);
        page[SLOT_SIZE - 1] = b'\n';
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| StateError::Write {
                path: path.to_owned(),
                source,
            })?;
        // A slot that an oversized value made longer: shrink it back to one page first (rare).
        if file.metadata().is_ok_and(|m| m.len() > SLOT_SIZE as u64) {
            file.set_len(0).map_err(|source| StateError::Write {
                path: path.to_owned(),
                source,
            })?;
        }
        file.write_all_at(&page, 0)
            .map_err(|source| StateError::Write {
                path: path.to_owned(),
                source,
            })
    }

    /// Removes `<root>/<name>`; Ok if it is already absent.
    pub fn remove(&self, lock: &StateLock, name: &str) -> Result<(), StateError> {
        if self.remove_unsynced(lock, name)? {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// [`Self::remove`] without syncing the dir (see [`Self::write_json_unsynced`]); returns
    /// whether there was something to remove.
    pub fn remove_unsynced(&self, lock: &StateLock, name: &str) -> Result<bool, StateError> {
        self.check_lock(lock);
        let path = self.doc_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Remove { path, source }),
        }
    }

    fn check_lock(&self, lock: &StateLock) {
        debug_assert_eq!(
            lock.root, self.root,
            "the StateLock belongs to another state dir"
        );
    }

    fn doc_path(&self, name: &str) -> Result<PathBuf, StateError> {
        let reason = if name.is_empty() {
            "it is empty"
        } else if name.contains('/') {
            "it contains '/'; use a plain file name"
        } else if name.starts_with('.') {
            "it starts with '.', which is reserved for temporary files"
        } else if name.contains('\0') {
            "it contains a NUL byte"
        } else if name == LOCK_FILE {
            "it is the lock file"
        } else if name.len() > MAX_NAME_LEN {
            "it is longer than 200 bytes"
        } else {
            return Ok(self.root.join(name));
        };
        Err(StateError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    }

    /// Removes `.<name>.tmp-*`. Only called under the lock, when any such file is a leftover
    /// of a writer that died between creating and renaming it.
    fn remove_stale_temps(&self, name: &str) {
        let prefix = format!(".{name}.tmp-");
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) => {
                log::warn!(
                    "cannot list {} to clean up temp files: {err}",
                    self.root.display()
                );
                return;
            }
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with(&prefix) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => log::debug!("removed stale temp file {}", path.display()),
                    Err(err) => log::warn!("cannot remove stale {}: {err}", path.display()),
                }
            }
        }
    }

    /// Makes renames and removals in the dir durable.
    fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.root)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| StateError::Sync {
                path: self.root.clone(),
                source,
            })
    }
}

/// A sub-directory of the state dir holding one small document per object (an endpoint, an
/// address), so that changing one object reads and writes only its own file: the cost of a
/// change does not grow with the number of objects.
///
/// Writes are atomic renames, like [`StateDir::write_json`], but never synced: a shelf's
/// documents describe kernel objects (links, namespaces) that a power cut destroys as well, so
/// losing a change that the cut also undid is harmless, and a killed process loses nothing
/// (the page cache is shared). A document a power cut left empty or torn reads as
/// [`ShelfEntry::Unreadable`], for the caller's reconcile to drop. Names starting with '.'
/// are temp files and never listed.
#[derive(Clone, Debug)]
pub struct Shelf {
    /// The state dir's root, which the lock belongs to.
    root: PathBuf,
    dir: PathBuf,
    spare_misses: Arc<AtomicU32>,
}

/// One document of a [`Shelf`], as read.
#[derive(Debug)]
pub enum ShelfEntry<T> {
    Ok(T),
    /// Present but not parsable: written just before a power cut (see [`Shelf`]).
    Unreadable(serde_json::Error),
}

impl StateDir {
    /// How many spare files are ready (one `readdir`; 0 if there is no spare dir).
    pub fn spare_count(&self) -> usize {
        fs::read_dir(self.root.join(SPARE_DIR))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Makes empty spare files until `target` are ready, for [`Shelf::write`] to take; returns
    /// how many it made. Needs no lock: a spare is an empty file that is either taken whole
    /// (renamed away under the state lock) or still there, and its content never matters, so
    /// a maker killed at any point leaves only spares. Does nothing if the state dir is gone.
    pub fn make_spares(&self, target: usize) -> Result<usize, StateError> {
        if !self.root.is_dir() {
            return Ok(0);
        }
        let dir = self.root.join(SPARE_DIR);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(StateError::CreateDir { path: dir, source }),
        }
        let have = self.spare_count();
        let pid = std::process::id();
        let mut made = 0;
        let mut serial = 0u32;
        while have + made < target {
            let path = dir.join(format!("{pid}-{serial}"));
            serial += 1;
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => made += 1,
                // A spare of an earlier maker with our PID: take the next name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(StateError::Write { path, source }),
            }
        }
        Ok(made)
    }

    /// Removes every spare (`network down`); Ok if there are none.
    pub fn remove_spares(&self, lock: &StateLock) -> Result<(), StateError> {
        self.check_lock(lock);
        let dir = self.root.join(SPARE_DIR);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove { path: dir, source }),
        }
    }
}

impl StateDir {
    /// The shelf `<root>/<dir>`; created on its first write.
    pub fn shelf(&self, dir: &str) -> Result<Shelf, StateError> {
        Ok(Shelf {
            root: self.root.clone(),
            dir: self.doc_path(dir)?,
            spare_misses: Arc::clone(&self.spare_misses),
        })
    }
}

impl Shelf {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, name: &str) -> Result<PathBuf, StateError> {
        StateDir::new(&self.dir).doc_path(name)
    }

    /// Whether `name` is on the shelf (one `stat`).
    pub fn contains(&self, name: &str) -> Result<bool, StateError> {
        let path = self.entry_path(name)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Reads `name`; `Ok(None)` if absent. No lock needed (writes are atomic renames).
    pub fn read<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<ShelfEntry<T>>, StateError> {
        let path = self.entry_path(name)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(match serde_json::from_slice(&bytes) {
                Ok(value) => ShelfEntry::Ok(value),
                Err(e) => ShelfEntry::Unreadable(e),
            })),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// The names on the shelf, sorted (none if the shelf was never written).
    pub fn names(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StateError::Read {
                path: self.dir.clone(),
                source,
            })?;
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with('.')
            {
                names.push(name.to_owned());
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    /// Every document on the shelf with its name; one that vanished between the listing and
    /// the read (an unlocked reader racing a writer) is left out.
    pub fn read_all<T: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, ShelfEntry<T>)>, StateError> {
        let mut out = Vec::new();
        for name in self.names()? {
            if let Some(entry) = self.read(&name)? {
                out.push((name, entry));
            }
        }
        Ok(out)
    }

    /// Atomically replaces `name` with `value` (unsynced; see [`Shelf`]), through a spare
    /// file if one is ready.
    pub fn write<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.write_with(lock, name, value, true)
    }

    /// [`Self::write`] for a writer off the commands' path (the pool refill): it makes its
    /// own file and leaves the spares to the commands.
    pub fn write_off_path<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.write_with(lock, name, value, false)
    }

    fn write_with<T: Serialize>(
        &self,
        lock: &StateLock,
        name: &str,
        value: &T,
        spare: bool,
    ) -> Result<(), StateError> {
        debug_assert_eq!(
            lock.root, self.root,
            "the StateLock belongs to another state dir"
        );
        let path = self.entry_path(name)?;
        let mut bytes = serde_json::to_vec(value).map_err(|source| StateError::Serialize {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        if spare && self.write_into_spare(&path, &bytes) {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = match write_new(&tmp, &bytes, false) {
            // No shelf yet: make it (0700, like the state dir) and try once more.
            Err(StateError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                self.create_dir().map_err(|source| StateError::CreateDir {
                    path: self.dir.clone(),
                    source,
                })?;
                write_new(&tmp, &bytes, false)
            }
            // A temp of a dead writer that had our PID (we hold the lock, so no live writer
            // has it): remove it and try once more.
            Err(StateError::Write { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                let _ = fs::remove_file(&tmp);
                write_new(&tmp, &bytes, false)
            }
            other => other,
        };
        rename_into_place(&tmp, &path, result)
    }

    /// Makes the shelf's dir (0700, like the state dir) if it is not there.
    fn create_dir(&self) -> io::Result<()> {
        match DirBuilder::new().mode(0o700).create(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    /// [`Self::write`] through a spare file, if one is ready: its content, then a rename onto
    /// `path`, as atomic as a temp file's, without making a file. On this kind of machine
    /// (ext4 without a journal) making a file costs 0.3–0.6 ms, as the allocator skips every
    /// recently freed inode of the group one by one; reusing one made ahead costs 0.05 ms.
    /// False if no spare is ready or using it failed (the caller then makes a file).
    fn write_into_spare(&self, path: &Path, bytes: &[u8]) -> bool {
        use std::os::unix::fs::FileExt as _;
        let spare = fs::read_dir(self.root.join(SPARE_DIR))
            .ok()
            .and_then(|mut entries| {
                entries
                    .find_map(|e| {
                        e.ok()
                            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
                    })
                    .map(|e| e.path())
            });
        let Some(spare) = spare else {
            self.spare_misses.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let filled = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&spare)
            .and_then(|file| {
                file.write_all_at(bytes, 0)?;
                file.set_len(bytes.len() as u64)
            });
        let placed = filled.and_then(|()| match fs::rename(&spare, path) {
            // The shelf's first record: make the shelf, then place it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && spare.exists() => {
                self.create_dir()?;
                fs::rename(&spare, path)
            }
            other => other,
        });
        match placed {
            Ok(()) => true,
            Err(e) => {
                log::debug!("cannot use spare {}: {e}", spare.display());
                false
            }
        }
    }

    /// Removes `name`; returns whether it was there.
    pub fn remove(&self, lock: &StateLock, name: &str) -> Result<bool, StateError> {
        debug_assert_eq!(
            lock.root, self.root,
            "the StateLock belongs to another state dir"
        );
        let path = self.entry_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Remove { path, source }),
        }
    }

    /// Removes the temp files of writers that died (under the lock, any temp file is one).
    pub fn remove_stale_temps(&self, lock: &StateLock) {
        debug_assert_eq!(
            lock.root, self.root,
            "the StateLock belongs to another state dir"
        );
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Removes the shelf and everything on it; Ok if it does not exist.
    pub fn remove_all(&self, lock: &StateLock) -> Result<(), StateError> {
        debug_assert_eq!(
            lock.root, self.root,
            "the StateLock belongs to another state dir"
        );
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

/// Opens (creating) the lock file `path`; `Ok(None)` if its dir does not exist.
fn open_lock_file(path: &Path) -> Result<Option<File>, StateError> {
    // std opens with O_CLOEXEC: a child exec'd while we hold the lock must not keep it.
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::OpenLock {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Renames the temp file `tmp`, once `written` says it is complete, over `path`: the atomic
/// step of every write. A temp file that is not renamed is removed (best effort: the next
/// write under the lock would remove it anyway).
fn rename_into_place(
    tmp: &Path,
    path: &Path,
    written: Result<(), StateError>,
) -> Result<(), StateError> {
    let result = written.and_then(|()| {
        fs::rename(tmp, path).map_err(|source| StateError::Rename {
            from: tmp.to_owned(),
            path: path.to_owned(),
            source,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Creates `path` (which must not exist), writes `bytes` and, if `sync`, fdatasyncs it.
fn write_new(path: &Path, bytes: &[u8], sync: bool) -> Result<(), StateError> {
    let write_err = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    // create_new: never follow or reuse something already there (stale temps were removed).
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    if !sync {
        return Ok(());
    }
    file.sync_data().map_err(|source| StateError::Sync {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        env,
        net::Ipv4Addr,
        os::unix::fs::PermissionsExt,
        process::{Child, Command, Stdio},
        sync::{Barrier, atomic::AtomicBool, mpsc},
        thread,
    };

    use serde::Deserialize;

    use super::*;
    use crate::ipam::Ipam;

    /// A unique dir under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = env::temp_dir().join(format!(
                "micropod-state-test-{}-{tag}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Doc {
        name: String,
        values: Vec<u64>,
    }

    fn doc(name: &str, values: Vec<u64>) -> Doc {
        Doc {
            name: name.to_owned(),
            values,
        }
    }

    const IPAM_DOC: &str = "ipam.json";

    /// One read-modify-write of the IPAM document, as a real command would do it.
    fn allocate_one(dir: &StateDir, owner: &str) -> Ipv4Addr {
        let lock = dir.lock().unwrap();
        let mut ipam: Ipam = dir.read_json(&lock, IPAM_DOC).unwrap().unwrap_or_else(|| {
            Ipam::new(
                "10.10.0.0/24".parse().unwrap(),
                "10.10.0.1".parse().unwrap(),
            )
            .unwrap()
        });
        let ip = ipam.allocate(owner, None).unwrap();
        dir.write_json(&lock, IPAM_DOC, &ipam).unwrap();
        ip
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn shelf_writes_take_spare_files_and_the_refill_path_leaves_them() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = TempDir::new("spares");
        let dir = StateDir::new(&tmp.0);
        let lock = dir.lock().unwrap();
        let shelf = dir.shelf("things").unwrap();
        // No spares yet: the write makes its file and says the spares ran out.
        shelf.write(&lock, "a", &doc("a", vec![1])).unwrap();
        assert!(dir.spares_ran_out());

        let dir = StateDir::new(&tmp.0);
        let shelf = dir.shelf("things").unwrap();
        assert_eq!(dir.make_spares(3).unwrap(), 3);
        assert_eq!(dir.make_spares(3).unwrap(), 0, "already 3 ready");
        assert_eq!(dir.spare_count(), 3);
        let spare_inodes: BTreeSet<u64> = fs::read_dir(tmp.0.join(SPARE_DIR))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().ino())
            .collect();
        // A spare with a longer leftover content (a writer killed after filling it): the
        // record must hold exactly the new document.
        let leftover = fs::read_dir(tmp.0.join(SPARE_DIR))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        fs::write(&leftover, vec![b'x'; 500]).unwrap();

        shelf.write(&lock, "b", &doc("b", vec![2])).unwrap();
        shelf.write(&lock, "a", &doc("a", vec![3])).unwrap();
        assert_eq!(dir.spare_count(), 1);
        assert!(!dir.spares_ran_out());
        for (name, values) in [("a", vec![3]), ("b", vec![2])] {
            let path = shelf.path().join(name);
            assert!(spare_inodes.contains(&fs::metadata(&path).unwrap().ino()));
            assert_eq!(mode(&path), 0o600);
            match shelf.read::<Doc>(name).unwrap() {
                Some(ShelfEntry::Ok(got)) => assert_eq!(got, doc(name, values)),
                other => panic!("{name}: {other:?}"),
            }
        }

        // The refill's own records never take one.
        shelf
            .write_off_path(&lock, "c", &doc("c", vec![4]))
            .unwrap();
        assert_eq!(dir.spare_count(), 1);
        assert!(!spare_inodes.contains(&fs::metadata(shelf.path().join("c")).unwrap().ino()));
        assert_eq!(shelf.names().unwrap(), ["a", "b", "c"]);

        dir.remove_spares(&lock).unwrap();
        assert!(!tmp.0.join(SPARE_DIR).exists());
        dir.remove_spares(&lock).unwrap();
    }

    #[test]
    fn slots_are_overwritten_in_place_and_read_empty_when_cleared() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = TempDir::new("slot");
        let dir = StateDir::new(&tmp.0);
        let lock = dir.lock().unwrap();
        assert_eq!(dir.read_slot::<Doc>(&lock, "slot.json").unwrap(), None);
        dir.clear_slot(&lock, "slot.json").unwrap();
        let long = doc("long", (0..100).collect());
        dir.write_slot(&lock, "slot.json", &long).unwrap();
        let inode = fs::metadata(tmp.0.join("slot.json")).unwrap().ino();
        assert_eq!(
            dir.read_slot::<Doc>(&lock, "slot.json").unwrap(),
            Some(long)
        );
        // A shorter value after a longer one: the padding covers what was there.
        let short = doc("s", vec![1]);
        dir.write_slot(&lock, "slot.json", &short).unwrap();
        assert_eq!(
            dir.read_slot::<Doc>(&lock, "slot.json").unwrap(),
            Some(short)
        );
        dir.clear_slot(&lock, "slot.json").unwrap();
        assert_eq!(dir.read_slot::<Doc>(&lock, "slot.json").unwrap(), None);
        let meta = fs::metadata(tmp.0.join("slot.json")).unwrap();
        assert_eq!(
            (meta.ino(), meta.len()),
            (inode, SLOT_SIZE as u64),
            "the same file"
        );
        // Larger than a slot: a file of its own, and back to a slot afterwards.
        let huge = doc("huge", (0..2000).collect());
        dir.write_slot(&lock, "slot.json", &huge).unwrap();
        assert_eq!(
            dir.read_slot::<Doc>(&lock, "slot.json").unwrap(),
            Some(huge)
        );
        dir.write_slot(&lock, "slot.json", &doc("x", vec![]))
            .unwrap();
        assert_eq!(
            dir.read_slot::<Doc>(&lock, "slot.json").unwrap(),
            Some(doc("x", vec![]))
        );
    }

    #[test]
    fn round_trip_absent_and_remove() {
        let tmp = TempDir::new("roundtrip");
        let dir = StateDir::new(tmp.0.join("nested/state"));
        assert_eq!(dir.root(), tmp.0.join("nested/state"));
        let lock = dir.lock().unwrap();
        assert_eq!(mode(dir.root()), 0o700);
        assert_eq!(dir.read_json::<Doc>(&lock, "doc.json").unwrap(), None);

        let first = doc("first", vec![1, 2, 3]);
        dir.write_json(&lock, "doc.json", &first).unwrap();
        assert_eq!(mode(&dir.root().join("doc.json")), 0o600);
        assert_eq!(dir.read_json(&lock, "doc.json").unwrap(), Some(first));

        let second = doc("second", vec![]);
        dir.write_json(&lock, "doc.json", &second).unwrap();
        assert_eq!(dir.read_json_unlocked("doc.json").unwrap(), Some(second));

        dir.remove(&lock, "doc.json").unwrap();
        dir.remove(&lock, "doc.json").unwrap();
        assert_eq!(dir.read_json::<Doc>(&lock, "doc.json").unwrap(), None);
        // Only the lock file is left: no temp files linger after successful writes.
        let names: Vec<_> = fs::read_dir(dir.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [LOCK_FILE]);
    }

    #[test]
    fn stale_temp_files_are_ignored_then_cleaned() {
        let tmp = TempDir::new("stale");
        let dir = StateDir::new(&tmp.0);
        let lock = dir.lock().unwrap();
        dir.write_json(&lock, "doc.json", &doc("good", vec![7]))
            .unwrap();
        // What a writer killed before its rename leaves behind.
        let stale = [
            dir.root().join(".doc.json.tmp-4194301"),
            dir.root()
                .join(format!(".doc.json.tmp-{}", std::process::id())),
        ];
        for path in &stale {
            fs::write(path, b"{\"name\": \"torn").unwrap();
        }
        let other = dir.root().join(".other.json.tmp-12");
        fs::write(&other, b"{").unwrap();

        assert_eq!(
            dir.read_json(&lock, "doc.json").unwrap(),
            Some(doc("good", vec![7]))
        );
        dir.write_json(&lock, "doc.json", &doc("newer", vec![8]))
            .unwrap();
        assert_eq!(
            dir.read_json_unlocked("doc.json").unwrap(),
            Some(doc("newer", vec![8]))
        );
        for path in &stale {
            assert!(!path.exists(), "{} not cleaned up", path.display());
        }
        // Temp files of other documents are left to their own writers.
        assert!(other.exists());
    }

    #[test]
    fn invalid_names_refused() {
        let tmp = TempDir::new("names");
        let dir = StateDir::new(&tmp.0);
        let lock = dir.lock().unwrap();
        let long = "x".repeat(201);
        for name in ["", "a/b", "../escape", ".hidden", "lock", "a\0b", &long] {
            let is_invalid = |r: Result<(), StateError>| matches!(r, Err(StateError::InvalidName { name: n, .. }) if n == name);
            assert!(
                is_invalid(dir.write_json(&lock, name, &1).map(drop)),
                "{name:?}"
            );
            assert!(is_invalid(dir.read_json::<u32>(&lock, name).map(drop)));
            assert!(is_invalid(dir.read_json_unlocked::<u32>(name).map(drop)));
            assert!(is_invalid(dir.remove(&lock, name)));
        }
        // The lock file itself is intact.
        assert!(dir.root().join(LOCK_FILE).exists());
    }

    #[test]
    fn corrupted_document_is_a_parse_error() {
        let tmp = TempDir::new("corrupt");
        let dir = StateDir::new(&tmp.0);
        let lock = dir.lock().unwrap();
        fs::write(dir.root().join("doc.json"), b"{\"name\": 3").unwrap();
        let err = dir.read_json::<Doc>(&lock, "doc.json").unwrap_err();
        assert!(
            matches!(&err, StateError::Parse { path, .. } if *path == dir.root().join("doc.json")),
            "{err:?}"
        );
        assert!(err.to_string().contains("move it aside"), "{err}");

        // An IPAM document that breaks its invariants is refused the same way.
        fs::write(
            dir.root().join(IPAM_DOC),
            br#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"10.20.0.2":"a"}}"#,
        )
        .unwrap();
        let err = dir.read_json::<Ipam>(&lock, IPAM_DOC).unwrap_err();
        let StateError::Parse { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(source.to_string().contains("outside subnet"), "{source}");
    }

    #[test]
    fn unwritable_dir_says_what_to_do() {
        let tmp = TempDir::new("eacces");
        fs::create_dir_all(&tmp.0).unwrap();
        // A regular file where a parent dir should be: fails for root too, unlike permissions.
        let blocker = tmp.0.join("file");
        fs::write(&blocker, b"").unwrap();
        let err = StateDir::new(blocker.join("state")).lock().unwrap_err();
        assert!(matches!(err, StateError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("--state-dir"), "{err}");
        let err = StateDir::new(&blocker).lock().unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(io_hint(&denied).contains("run as root or choose another --state-dir"));
    }

    #[test]
    fn readers_never_see_a_partial_write() {
        let tmp = TempDir::new("atomic");
        let dir = StateDir::new(&tmp.0);
        const GENERATIONS: u64 = 40;
        // About 0.25 MB of JSON per generation: many pages, far beyond one atomic write(2).
        const LEN: usize = 30_000;
        {
            let lock = dir.lock().unwrap();
            dir.write_json(&lock, "big.json", &doc("big", vec![0; LEN]))
                .unwrap();
        }
        let done = AtomicBool::new(false);
        let reads = thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u32;
                let mut last = 0;
                while !done.load(Ordering::Acquire) {
                    let got: Doc = dir.read_json_unlocked("big.json").unwrap().unwrap();
                    assert_eq!(got.values.len(), LEN);
                    let generation = got.values[0];
                    assert!(got.values.iter().all(|v| *v == generation), "mixed doc");
                    assert!(generation >= last, "went back in time");
                    last = generation;
                    reads += 1;
                }
                reads
            });
            for generation in 1..=GENERATIONS {
                let lock = dir.lock().unwrap();
                dir.write_json(&lock, "big.json", &doc("big", vec![generation; LEN]))
                    .unwrap();
            }
            done.store(true, Ordering::Release);
            reader.join().unwrap()
        });
        assert!(reads > 0);
        let last: Doc = dir.read_json_unlocked("big.json").unwrap().unwrap();
        assert_eq!(last.values[0], GENERATIONS);
    }

    #[test]
    fn lock_excludes_other_open_file_descriptions() {
        let tmp = TempDir::new("exclusive");
        let dir = StateDir::new(&tmp.0);
        let held = dir.lock().unwrap();
        let acquired = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| {
                let _lock = StateDir::new(&tmp.0).lock().unwrap();
                acquired.store(true, Ordering::SeqCst);
            });
            thread::sleep(Duration::from_millis(200));
            assert!(!acquired.load(Ordering::SeqCst), "lock taken twice");
            drop(held);
        });
        assert!(acquired.load(Ordering::SeqCst));
    }

    #[test]
    fn file_lock_is_exclusive_and_never_creates_the_dir() {
        let tmp = TempDir::new("filelock");
        let dir = StateDir::new(tmp.0.join("state"));
        assert!(dir.try_lock_file("job.lock").unwrap().is_none());
        assert!(dir.lock_existing().unwrap().is_none());
        assert!(!dir.root().exists(), "a lock brought back a missing dir");
        drop(dir.lock().unwrap());
        let held = dir.try_lock_file("job.lock").unwrap().expect("free");
        assert!(
            dir.try_lock_file("job.lock").unwrap().is_none(),
            "taken twice"
        );
        // Independent of the state lock.
        drop(dir.lock_existing().unwrap().expect("the dir exists"));
        drop(held);
        assert!(dir.try_lock_file("job.lock").unwrap().is_some());
        assert!(dir.try_lock_file(LOCK_FILE).is_err(), "the state lock file");
    }

    #[test]
    fn threads_allocate_distinct_addresses() {
        const THREADS: usize = 32;
        let tmp = TempDir::new("threads");
        let barrier = Barrier::new(THREADS);
        let ips: Vec<(String, Ipv4Addr)> = thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|i| {
                    let (root, barrier) = (&tmp.0, &barrier);
                    s.spawn(move || {
                        // Each thread has its own StateDir and its own lock file descriptor.
                        let dir = StateDir::new(root);
                        let owner = format!("t{i}");
                        barrier.wait();
                        let ip = allocate_one(&dir, &owner);
                        (owner, ip)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let distinct: BTreeSet<_> = ips.iter().map(|(_, ip)| *ip).collect();
        assert_eq!(distinct.len(), THREADS);

        let ipam: Ipam = StateDir::new(&tmp.0)
            .read_json_unlocked(IPAM_DOC)
            .unwrap()
            .unwrap();
        assert_eq!(ipam.used() as usize, THREADS);
        for (owner, ip) in &ips {
            assert_eq!(ipam.address_of(owner), Some(*ip));
        }
        // Lowest-free allocation under a correct lock fills .2 ..= .33 exactly.
        let expected: BTreeSet<Ipv4Addr> = (2..2 + THREADS as u8)
            .map(|last| Ipv4Addr::new(10, 10, 0, last))
            .collect();
        assert_eq!(distinct, expected);
    }

    // Multi-process tests: the test binary re-runs itself with `--ignored --exact` on this
    // entry point, which is ignored in a normal test run.
    const CHILD_MODE: &str = "MICROPOD_STATE_TEST_CHILD";
    const CHILD_DIR: &str = "MICROPOD_STATE_TEST_DIR";
    const CHILD_ARG: &str = "MICROPOD_STATE_TEST_ARG";
    const CHILD_ENTRY: &str = "state::tests::child_process_entry";

    #[test]
    #[ignore = "run by the multi-process tests below, in child processes of their own"]
    fn child_process_entry() {
        let Ok(mode) = env::var(CHILD_MODE) else {
            eprintln!("{CHILD_MODE} not set: nothing to do outside a parent test");
            return;
        };
        let dir = StateDir::new(env::var(CHILD_DIR).unwrap());
        let arg = env::var(CHILD_ARG).unwrap();
        match mode.as_str() {
            // Allocate 5 addresses, one lock round each.
            "alloc" => {
                for i in 0..5 {
                    allocate_one(&dir, &format!("{arg}-{i}"));
                }
            }
            // Take the lock, signal readiness through the marker file, wait to be killed.
            "hold" => {
                let _lock = dir.lock().unwrap();
                fs::write(&arg, b"").unwrap();
                // Bounded, in case the parent dies without killing us.
                thread::sleep(Duration::from_secs(60));
            }
            other => panic!("unknown child mode {other}"),
        }
    }

    /// Kills the child if the test fails before reaping it.
    struct ChildGuard(Child);

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn_child(mode: &str, dir: &Path, arg: &str) -> ChildGuard {
        let child = Command::new(env::current_exe().unwrap())
            .args([
                CHILD_ENTRY,
                "--exact",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_MODE, mode)
            .env(CHILD_DIR, dir)
            .env(CHILD_ARG, arg)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        ChildGuard(child)
    }

    #[test]
    fn processes_allocate_distinct_addresses() {
        const PROCESSES: usize = 6;
        let tmp = TempDir::new("procs");
        let children: Vec<_> = (0..PROCESSES)
            .map(|i| spawn_child("alloc", &tmp.0, &format!("p{i}")))
            .collect();
        for mut child in children {
            assert!(child.0.wait().unwrap().success());
        }
        let ipam: Ipam = StateDir::new(&tmp.0)
            .read_json_unlocked(IPAM_DOC)
            .unwrap()
            .unwrap();
        assert_eq!(ipam.used() as usize, PROCESSES * 5);
        for i in 0..PROCESSES {
            for j in 0..5 {
                assert!(ipam.address_of(&format!("p{i}-{j}")).is_some());
            }
        }
    }

    #[test]
    fn lock_released_when_holder_is_killed() {
        let tmp = TempDir::new("kill9");
        fs::create_dir_all(&tmp.0).unwrap();
        let marker = tmp.0.join("holding");
        let mut holder = spawn_child("hold", &tmp.0, marker.to_str().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "child never took the lock");
            assert!(holder.0.try_wait().unwrap().is_none(), "child exited early");
            thread::sleep(Duration::from_millis(10));
        }

        let (tx, rx) = mpsc::channel();
        let root = tmp.0.clone();
        let waiter = thread::spawn(move || {
            let lock = StateDir::new(root).lock();
            tx.send(lock.is_ok()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "lock taken while the child holds it"
        );
        // SIGKILL: no destructor runs in the child, the kernel alone releases the flock.
        holder.0.kill().unwrap();
        holder.0.wait().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        waiter.join().unwrap();
    }
}
