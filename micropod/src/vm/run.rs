//! `micropod run`: the request's checks, the endpoint, the record and the supervisor.

use std::{
    fs::{self, DirBuilder, File},
    io,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    ATTACHING_FILE, CONSOLE_LOG, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, LazyRuntime, MAX_CMDLINE,
    MAX_CPUS, MIN_MEMORY_MIB, POLL, ProcessRef, RECORD_VERSION, SUPERVISE_COMMAND, SUPERVISOR_LOG,
    VMM_LOG, VmError, VmNetwork, VmRecord, VmState, Vms, control::kill_and_wait, record,
    supervisor, vmm_name,
};
use crate::{
    net::naming::check_endpoint_name,
    network::{AttachRequest, EndpointKind},
    vmm::{self, Boot, SUN_PATH_MAX, VmSpec, VmmKind},
};

/// The longest `ip=` argument micropod can generate.
const MAX_IP_ARG: usize = "ip=255.255.255.255::255.255.255.255:255.255.255.255::eth0:off".len();
/// What the lifecycle itself puts on the kernel command line, besides `ip=`.
const CONSOLE_ARG: &str = "console=ttyS0";
const ROOTFS_ARGS: &str = "root=/dev/vda rw";
/// Room for the control socket's name in the VM dir (sun_path holds 108 bytes with the NUL).
const SOCKET_NAME_BUDGET: usize = 24;
/// How long `run` waits for the supervisor to report the VMM running.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// What `micropod run` was asked for.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Default: `vm-` and the first 8 characters of the id.
    pub name: Option<String>,
    pub kernel: PathBuf,
    pub boot: Boot,
    pub vmm: VmmKind,
    pub ip: Option<Ipv4Addr>,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Appended to the kernel command line micropod builds.
    pub cmdline: Option<String>,
}

impl RunRequest {
    /// A request with the defaults: QEMU, 1 vCPU, 256 MiB, any address, a generated name.
    pub fn new(kernel: impl Into<PathBuf>, boot: Boot) -> Self {
        Self {
            name: None,
            kernel: kernel.into(),
            boot,
            vmm: VmmKind::Qemu,
            ip: None,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            cmdline: None,
        }
    }
}

impl Vms {
    /// `micropod run`: see the module docs. Returns once the VMM runs (not once the guest
    /// has booted).
    pub fn run(&self, req: &RunRequest) -> Result<VmRecord, VmError> {
        let Checked {
            kernel,
            boot,
            fixed_args,
            extra,
        } = check_request(req)?;
        crate::network::check_privileges().map_err(VmError::Privileges)?;
        let id = new_id();
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("vm-{}", &id[..8]));
        let dir = self.state.root().join(&id);
        if dir.as_os_str().len() + 1 + SOCKET_NAME_BUDGET > SUN_PATH_MAX {
            return Err(VmError::SocketPath {
                path: dir.join(vmm::driver(req.vmm).control_socket_name()),
            });
        }

        let lock = self.state.lock()?;
        if let Err(e) = self.reconcile_locked(&lock) {
            log::warn!("cannot reconcile VM records: {e}");
        }
        if let Some(existing) = self.read(&lock, &name)? {
            return Err(VmError::NameTaken {
                name,
                state: existing.state,
            });
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| VmError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        // Before the endpoint: a `run` killed from here until its record is written leaves
        // the dir and this name, which the next reconcile releases (see `reconcile.rs`).
        if let Err(source) = fs::write(dir.join(ATTACHING_FILE), &name) {
            remove_dir(&dir);
            return Err(VmError::CreateDir {
                path: dir.join(ATTACHING_FILE),
                source,
            });
        }
        let mut rt = LazyRuntime::default();
        // "On startup, micropod ensures a persistent bridge exists": a bare host, or one just
        // rebooted, gets its network here rather than a refusal.
        match rt
            .block_on(self.network.ensure_up())
            .and_then(|r| r.map_err(|source| VmError::NetworkUp { source }))
        {
            Ok(Some(note)) => log::info!("{note}"),
            Ok(None) => {}
            Err(e) => {
                remove_dir(&dir);
                return Err(e);
            }
        }
        let attached = rt
            .block_on(self.network.attach(&AttachRequest {
                ip: req.ip,
                ..AttachRequest::new(name.clone(), EndpointKind::Tap)
            }))
            .and_then(|r| {
                r.map_err(|source| VmError::Attach {
                    name: name.clone(),
                    source,
                })
            });
        let attachment = match attached {
            Ok(a) => a,
            Err(e) => {
                remove_dir(&dir);
                return Err(e);
            }
        };
        let mut cmdline = vec![CONSOLE_ARG.to_owned(), attachment.kernel_arg.clone()];
        cmdline.extend(fixed_args);
        if !extra.is_empty() {
            cmdline.push(extra);
        }
        let rec = VmRecord {
            version: RECORD_VERSION,
            name: name.clone(),
            id,
            vmm: req.vmm,
            state: VmState::Starting,
            spec: VmSpec {
                name: name.clone(),
                kernel,
                boot,
                cpus: req.cpus,
                memory_mib: req.memory_mib,
                cmdline: cmdline.join(" "),
                tap: attachment.link.clone(),
                mac: attachment.mac,
                ip: attachment.ip,
                run_dir: dir.clone(),
                console_log: dir.join(CONSOLE_LOG),
            },
            network: VmNetwork {
                endpoint: attachment.name.clone(),
                tap: attachment.link.clone(),
                bridge: attachment.bridge.clone(),
                ip: attachment.ip,
                cidr: attachment.cidr.clone(),
                gateway: attachment.gateway,
                mac: attachment.mac,
                released: false,
                detached_at: None,
            },
            created_at: record::now(),
            started_at: None,
            creator: ProcessRef::current().map_err(|source| VmError::Process {
                what: "identify",
                pid: std::process::id(),
                source,
            })?,
            supervisor: None,
            vmm_process: None,
            stop_requested: false,
            exit: None,
        };
        if let Err(e) = self.write(&lock, &rec) {
            let mut rec = rec;
            if let Err(e) = self.release_endpoint(&mut rec, &mut rt) {
                log::warn!("{e}");
            }
            remove_dir(&dir);
            return Err(e);
        }
        let _ = fs::remove_file(dir.join(ATTACHING_FILE));
        drop(lock);

        let child = match self.spawn_supervisor(&rec) {
            Ok(child) => child,
            Err(e) => {
                self.discard(&name);
                return Err(e);
            }
        };
        self.wait_running(&rec, child)
    }

    /// `micropod --state-dir S --bpf-dir B vm-supervise NAME`, detached: a session of its own,
    /// stdio on `supervisor.log` (so it holds none of the caller's pipes).
    fn spawn_supervisor(&self, rec: &VmRecord) -> Result<Child, VmError> {
        let spawn_err = |source| VmError::SpawnSupervisor {
            exe: self.supervisor_exe.clone(),
            source,
        };
        let log = File::create(rec.dir().join(SUPERVISOR_LOG)).map_err(spawn_err)?;
        let mut cmd = Command::new(&self.supervisor_exe);
        cmd.arg("--state-dir")
            .arg(self.network.state_dir())
            .arg("--bpf-dir")
            .arg(self.network.bpf_dir())
            .arg(SUPERVISE_COMMAND)
            .arg(&rec.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log);
        crate::sys::setsid_on_exec(&mut cmd);
        cmd.spawn().map_err(spawn_err)
    }

    /// Waits for the supervisor to report the VMM running; on any failure cleans up (kills
    /// what was started, releases the endpoint, removes the record and directory).
    fn wait_running(&self, rec: &VmRecord, mut supervisor: Child) -> Result<VmRecord, VmError> {
        let name = rec.name.clone();
        let deadline = Instant::now() + RUN_TIMEOUT;
        let vmm_log = || tail(&rec.dir().join(VMM_LOG), 20);
        let failure = loop {
            let now: Option<VmRecord> = self.state.read_json_unlocked(&Self::doc(&name))?;
            match now {
                Some(now) if now.state == VmState::Running => return Ok(now),
                Some(now) if now.state == VmState::Exited => {
                    let reason = now.exit.map(|e| e.reason).unwrap_or_default();
                    let reason = reason
                        .strip_prefix(supervisor::FAILED_TO_START)
                        .map_or_else(|| reason.clone(), str::to_owned);
                    break VmError::StartFailed {
                        name: name.clone(),
                        reason,
                        log: vmm_log(),
                    };
                }
                Some(_) => {}
                None => {
                    break VmError::StartFailed {
                        name: name.clone(),
                        reason: "its record vanished (removed by another command?)".into(),
                        log: String::new(),
                    };
                }
            }
            if let Ok(Some(status)) = supervisor.try_wait() {
                // It may have recorded its last word just before exiting.
                let last: Option<VmRecord> = self.state.read_json_unlocked(&Self::doc(&name))?;
                if let Some(last) = last
                    && last.state != VmState::Starting
                {
                    continue;
                }
                break VmError::StartFailed {
                    name: name.clone(),
                    reason: format!("its supervisor exited ({status})"),
                    log: tail(&rec.dir().join(SUPERVISOR_LOG), 20),
                };
            }
            if Instant::now() >= deadline {
                // Our own child; its VMM dies with it (PR_SET_PDEATHSIG), killed below too.
                let _ = supervisor.kill();
                let _ = supervisor.wait();
                break VmError::StartTimeout {
                    name: name.clone(),
                    timeout: RUN_TIMEOUT,
                    log: vmm_log(),
                };
            }
            std::thread::sleep(POLL);
        };
        let _ = supervisor.try_wait();
        self.discard(&name);
        Err(failure)
    }

    /// Undoes a VM that failed to start: kills its VMM if one runs, releases the endpoint,
    /// removes the record and the directory. Best effort; what fails is logged and left to
    /// reconcile (the record is then kept, marked exited).
    fn discard(&self, name: &str) {
        let result = (|| -> Result<(), VmError> {
            let lock = self.state.lock()?;
            let Some(mut rec) = self.read(&lock, name)? else {
                return Ok(());
            };
            if let Some(vmm) = rec.vmm_process {
                kill_and_wait(name, &vmm)?;
            }
            if rec.state != VmState::Exited {
                rec.mark_exited(None, None, "failed to start".into());
            }
            if let Err(e) = self.release_endpoint(&mut rec, &mut LazyRuntime::default()) {
                self.write(&lock, &rec)?;
                return Err(e);
            }
            self.state.remove(&lock, &Self::doc(name))?;
            remove_dir(rec.dir());
            Ok(())
        })();
        if let Err(e) = result {
            log::warn!("while cleaning up VM {name}: {e}");
        }
    }
}

/// A request that passed every check that needs no allocation.
struct Checked {
    /// Absolute.
    kernel: PathBuf,
    /// With an absolute path.
    boot: Boot,
    /// The kernel arguments after `console=` and `ip=`: the rootfs's and the driver's.
    fixed_args: Vec<String>,
    /// `--cmdline`, trimmed.
    extra: String,
}

/// Everything `run` can refuse without allocating: name syntax, files, sizes, the VMM, the
/// command line's length.
fn check_request(req: &RunRequest) -> Result<Checked, VmError> {
    if let Some(name) = &req.name {
        check_endpoint_name("VM", name)?;
    }
    let kernel = check_file("kernel", &req.kernel, false)?;
    let boot = match &req.boot {
        Boot::Initrd(p) => Boot::Initrd(check_file("initrd", p, false)?),
        Boot::Rootfs(p) => Boot::Rootfs(check_file("rootfs", p, true)?),
    };
    if !(1..=MAX_CPUS).contains(&req.cpus) {
        return Err(VmError::Cpus { cpus: req.cpus });
    }
    let max_memory = host_memory_mib().unwrap_or(u32::MAX);
    if !(MIN_MEMORY_MIB..=max_memory).contains(&req.memory_mib) {
        return Err(VmError::Memory {
            mib: req.memory_mib,
            max: max_memory,
        });
    }
    let driver = vmm::driver(req.vmm);
    let vmm_err = |source| VmError::Vmm {
        vmm: vmm_name(req.vmm),
        source,
    };
    driver.binary().map_err(vmm_err)?;
    let mut fixed_args = Vec::new();
    if matches!(boot, Boot::Rootfs(_)) {
        fixed_args.push(ROOTFS_ARGS.to_owned());
    }
    fixed_args.extend(driver.kernel_args().map_err(vmm_err)?);
    let extra = req.cmdline.as_deref().map(str::trim).unwrap_or_default();
    if extra.chars().any(char::is_control) {
        return Err(VmError::CmdlineChars);
    }
    // The longest it can get once the address is known; the kernel needs room for a NUL.
    let worst = [CONSOLE_ARG, extra]
        .into_iter()
        .chain(fixed_args.iter().map(String::as_str))
        .map(|a| a.len() + 1)
        .sum::<usize>()
        + MAX_IP_ARG;
    if worst >= MAX_CMDLINE {
        return Err(VmError::CmdlineTooLong { len: worst });
    }
    Ok(Checked {
        kernel,
        boot,
        fixed_args,
        extra: extra.to_owned(),
    })
}

/// Checks that `path` is a regular file micropod can read (and write, for a rootfs), and
/// returns it absolute (the supervisor and the VMM run elsewhere).
fn check_file(what: &'static str, path: &Path, write: bool) -> Result<PathBuf, VmError> {
    let err = |source| VmError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO (or a tty) would otherwise wait for its other end forever;
    // it has no effect on a regular file.
    let file = File::options()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    if !file.metadata().map_err(err)?.is_file() {
        return Err(VmError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    fs::canonicalize(path).map_err(err)
}

/// The host's memory in MiB (`MemTotal`).
fn host_memory_mib() -> Option<u32> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    u32::try_from(kib / 1024).ok()
}

/// 16 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    let n = crate::sys::getrandom(&mut bytes);
    if n.ok() != Some(bytes.len()) {
        // Unique enough without the entropy pool: time and pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[expect(clippy::cast_possible_truncation, reason = "mixing bits, loss is fine")]
        let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
        bytes = mixed.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn remove_dir(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        log::warn!("cannot remove {}: {e}", dir.display());
    }
}

/// The last `lines` lines of a (small) log file; empty if unreadable.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib().is_some_and(|m| m >= MIN_MEMORY_MIB));
    }

    #[test]
    fn ip_arg_bound_is_the_longest() {
        let subnet: ipnetwork::Ipv4Network = "255.255.255.0/32".parse().unwrap();
        let arg = crate::network::kernel_ip_arg(
            Ipv4Addr::new(255, 255, 255, 255),
            subnet,
            Ipv4Addr::new(255, 255, 255, 255),
        );
        assert_eq!(arg.len(), MAX_IP_ARG);
    }

    #[test]
    fn check_file_refuses_missing_dirs_and_returns_absolute_paths() {
        let missing = check_file("kernel", Path::new("/nonexistent/vmlinuz"), false).unwrap_err();
        assert!(missing.to_string().contains("no such file"), "{missing}");
        let dir = check_file("kernel", Path::new("/"), false).unwrap_err();
        assert!(
            matches!(dir, VmError::NotAFile { .. } | VmError::File { .. }),
            "{dir}"
        );
        let exe = std::env::current_exe().unwrap();
        let ok = check_file("kernel", &exe, false).unwrap();
        assert!(ok.is_absolute());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("micropod-tail-{}", std::process::id()));
        fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&path, 2), "c\nd");
        assert_eq!(tail(&path, 10), "a\nb\nc\nd");
        fs::remove_file(&path).unwrap();
        assert_eq!(tail(&path, 2), "");
    }
}
