//! Firecracker, configured over its API socket.
//!
//! The process starts with only `--api-sock` (and `--id`); [`Firecracker::start`] then waits for
//! the socket and sends, in order: `PUT /boot-source`, `PUT /drives/rootfs` (rootfs boot only),
//! `PUT /network-interfaces/eth0`, `PUT /machine-config`, `PUT /actions InstanceStart`, and
//! checks with `GET /` that the instance runs. Firecracker's serial console is its stdout.
//!
//! The guest command line is the caller's: for Firecracker it wants `console=ttyS0` for the
//! console, and `reboot=k` so that the guest's reboot (the answer to `SendCtrlAltDel`) makes
//! Firecracker exit.

pub mod api;
mod http;

use std::{
    ffi::OsStr,
    fs, io,
    os::unix::{ffi::OsStrExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use self::{
    api::{ActionType, ApiError, InstanceInfo, Request},
    http::HttpError,
};
use super::{Boot, SUN_PATH_MAX, VmSpec, Vmm, VmmError, VmmKind};

const VMM: &str = "firecracker";
const BINARY: &str = "firecracker";
/// Names the Firecracker binary (a path, or a name looked up on PATH) instead of `firecracker`.
pub const BINARY_ENV: &str = "MICROPOD_FIRECRACKER";
const INSTALL: &str = "download a release from \
    https://github.com/firecracker-microvm/firecracker/releases, unpack it and put its \
    `firecracker-<version>-<arch>` binary on PATH as `firecracker` (or set MICROPOD_FIRECRACKER \
    to its path); Firecracker also needs a usable /dev/kvm";
/// The API socket's file name inside the VM's run directory.
pub const SOCKET_NAME: &str = "firecracker.sock";
/// Firecracker's instance id rules (`validate_instance_id`).
const MAX_ID_LEN: usize = 64;
/// How often to look for the API socket while Firecracker starts.
const SOCKET_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
pub struct Firecracker;

/// The API socket of the VM whose run directory is `run_dir`.
#[must_use]
pub fn api_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    /// `reboot=k`: the guest's reboot (after `SendCtrlAltDel`) ends Firecracker; `panic=1`:
    /// a guest panic does too, instead of hanging; `pci=off`: Firecracker has no PCI bus.
    fn kernel_args(&self) -> Result<Vec<String>, VmmError> {
        Ok(["reboot=k", "panic=1", "pci=off"]
            .map(String::from)
            .to_vec())
    }

    fn control_socket_name(&self) -> &'static str {
        SOCKET_NAME
    }

    fn binary(&self) -> Result<PathBuf, VmmError> {
        let wanted = std::env::var_os(BINARY_ENV)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| BINARY.into());
        locate(&wanted, std::env::var_os("PATH").as_deref())
    }

    fn command(&self, binary: &Path, spec: &VmSpec) -> Result<Command, VmmError> {
        let socket = api_socket(&spec.run_dir);
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(unsupported(format!(
                "an API socket path longer than {SUN_PATH_MAX} bytes ({}); use a shorter \
                 state directory",
                socket.display()
            )));
        }
        // Firecracker refuses to start when its socket path exists: one left by a VMM that
        // died is stale, since the run directory is this VM's alone.
        match fs::remove_file(&socket) {
            Ok(()) => log::debug!("removed the stale API socket {}", socket.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VmmError::Io {
                    vmm: VMM,
                    socket,
                    source,
                });
            }
        }
        let mut command = Command::new(binary);
        command.arg("--api-sock").arg(&socket);
        // The id only names the instance in Firecracker's logs and metrics; a VM name it
        // would refuse is left out rather than failing the start.
        if is_valid_instance_id(&spec.name) {
            command.arg("--id").arg(&spec.name);
        }
        Ok(command)
    }

    fn start(&self, spec: &VmSpec, timeout: Duration) -> Result<(), VmmError> {
        // Checked before waiting: a spec Firecracker would refuse fails at once.
        let requests = configuration(spec)?;
        let deadline = Instant::now() + timeout;
        let socket = api_socket(&spec.run_dir);
        wait_for_socket(&socket, deadline, timeout)?;
        for request in &requests {
            call(&socket, request, deadline)?;
        }
        let info = instance_info(&socket, deadline)?;
        if info.state != api::STATE_RUNNING {
            return Err(VmmError::Protocol {
                vmm: VMM,
                request: "GET /".into(),
                detail: format!(
                    "instance {:?} is {:?} after InstanceStart, not {:?}",
                    info.id,
                    info.state,
                    api::STATE_RUNNING
                ),
            });
        }
        log::debug!(
            "firecracker {} runs instance {:?}",
            info.vmm_version,
            info.id
        );
        Ok(())
    }

    fn request_stop(&self, spec: &VmSpec, timeout: Duration) -> Result<(), VmmError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(unsupported(
                "a graceful stop on this architecture (SendCtrlAltDel is x86_64 only)".into(),
            ));
        }
        let socket = api_socket(&spec.run_dir);
        let request = api::action(ActionType::SendCtrlAltDel);
        call(&socket, &request, Instant::now() + timeout).map(drop)
    }
}

/// The requests that configure and start `spec`'s VM, in the order they are sent. Refuses a
/// spec Firecracker would refuse, before anything is sent.
pub fn configuration(spec: &VmSpec) -> Result<Vec<Request>, VmmError> {
    let cpus = spec.cpus;
    if !(1..=api::MAX_VCPUS).contains(&cpus) || (cpus != 1 && !cpus.is_multiple_of(2)) {
        return Err(unsupported(format!(
            "{cpus} vCPUs (1 or an even number up to {})",
            api::MAX_VCPUS
        )));
    }
    if spec.memory_mib == 0 {
        return Err(unsupported("a VM without memory (0 MiB)".into()));
    }
    let kernel = utf8(&spec.kernel)?;
    let mut requests = Vec::with_capacity(5);
    let (initrd, rootfs) = match &spec.boot {
        Boot::Initrd(path) => (Some(utf8(path)?), None),
        Boot::Rootfs(path) => (None, Some(utf8(path)?)),
    };
    requests.push(Request::put(
        "/boot-source",
        &api::BootSource {
            kernel_image_path: kernel,
            boot_args: &spec.cmdline,
            initrd_path: initrd,
        },
    ));
    if let Some(rootfs) = rootfs {
        requests.push(Request::put(
            format!("/drives/{}", api::ROOT_DRIVE_ID),
            &api::Drive {
                drive_id: api::ROOT_DRIVE_ID,
                path_on_host: rootfs,
                is_root_device: true,
                is_read_only: false,
            },
        ));
    }
    requests.push(Request::put(
        format!("/network-interfaces/{}", api::IFACE_ID),
        &api::NetworkInterface {
            iface_id: api::IFACE_ID,
            host_dev_name: &spec.tap,
            guest_mac: spec.mac.to_string(),
        },
    ));
    requests.push(Request::put(
        "/machine-config",
        &api::MachineConfiguration {
            vcpu_count: cpus,
            mem_size_mib: spec.memory_mib,
        },
    ));
    requests.push(api::action(ActionType::InstanceStart));
    Ok(requests)
}

/// Firecracker's `--id` rules: 1 to 64 characters, alphanumeric or `-`.
fn is_valid_instance_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `wanted` as a path, or looked up in `path` (PATH's value).
fn locate(wanted: &OsStr, path: Option<&OsStr>) -> Result<PathBuf, VmmError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    which::which_in(wanted, path, cwd).map_err(|_| VmmError::NotInstalled {
        vmm: VMM,
        binary: wanted.to_string_lossy().into_owned(),
        install: INSTALL,
    })
}

/// Waits until Firecracker accepts connections on `socket`. Connecting (not only seeing the
/// file) is the test: the path exists between `bind` and `listen`, when connects are refused.
fn wait_for_socket(socket: &Path, deadline: Instant, timeout: Duration) -> Result<(), VmmError> {
    loop {
        match UnixStream::connect(socket) {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(source) => {
                return Err(VmmError::Io {
                    vmm: VMM,
                    socket: socket.to_owned(),
                    source,
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(VmmError::SocketTimeout {
                vmm: VMM,
                socket: socket.to_owned(),
                timeout,
            });
        }
        thread::sleep(SOCKET_POLL.min(deadline - now));
    }
}

/// Sends `request`; a 2xx answer is success, anything else Firecracker's refusal.
fn call(socket: &Path, request: &Request, deadline: Instant) -> Result<http::Response, VmmError> {
    log::debug!("firecracker: {request} {:?}", request.body);
    let timeout = deadline.saturating_duration_since(Instant::now());
    let response = http::send(socket, request, timeout).map_err(|e| match e {
        HttpError::Io(source) => VmmError::Request {
            vmm: VMM,
            request: request.to_string(),
            socket: socket.to_owned(),
            source,
        },
        HttpError::Malformed(detail) => protocol(request, detail),
    })?;
    if (200..300).contains(&response.status) {
        return Ok(response);
    }
    match serde_json::from_slice::<ApiError>(&response.body) {
        Ok(error) => Err(VmmError::Api {
            vmm: VMM,
            request: request.to_string(),
            status: response.status,
            fault: error.fault_message,
        }),
        Err(_) => Err(protocol(
            request,
            format!(
                "status {} with a body that is not Firecracker's error document: {}",
                response.status,
                excerpt(&response.body)
            ),
        )),
    }
}

fn instance_info(socket: &Path, deadline: Instant) -> Result<InstanceInfo, VmmError> {
    let request = Request::get("/");
    let response = call(socket, &request, deadline)?;
    serde_json::from_slice(&response.body).map_err(|e| {
        protocol(
            &request,
            format!("not an InstanceInfo ({e}): {}", excerpt(&response.body)),
        )
    })
}

fn utf8(path: &Path) -> Result<&str, VmmError> {
    path.to_str().ok_or_else(|| {
        unsupported(format!(
            "the non-UTF-8 path {:?} (its API takes JSON strings)",
            path.as_os_str().as_bytes()
        ))
    })
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    )
}

fn protocol(request: &Request, detail: String) -> VmmError {
    VmmError::Protocol {
        vmm: VMM,
        request: request.to_string(),
        detail,
    }
}

fn unsupported(what: String) -> VmmError {
    VmmError::Unsupported { vmm: VMM, what }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, os::unix::fs::PermissionsExt as _};

    use super::*;
    use crate::net::Mac;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("micropod-fc-{}-{tag}", std::process::id()));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn spec(run_dir: &Path, boot: Boot) -> VmSpec {
        let ip = Ipv4Addr::new(10, 10, 0, 2);
        VmSpec {
            name: "vm-1".into(),
            kernel: "/k/vmlinux".into(),
            boot,
            cpus: 2,
            memory_mib: 256,
            cmdline: "console=ttyS0 reboot=k".into(),
            tap: "mp-tap0".into(),
            mac: Mac::for_ip(ip),
            ip,
            run_dir: run_dir.to_owned(),
            console_log: run_dir.join("console.log"),
        }
    }

    fn paths(requests: &[Request]) -> Vec<String> {
        requests.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn initrd_boot_sends_no_drive() {
        let requests =
            configuration(&spec(Path::new("/run"), Boot::Initrd("/i.cpio".into()))).unwrap();
        assert_eq!(
            paths(&requests),
            [
                "PUT /boot-source",
                "PUT /network-interfaces/eth0",
                "PUT /machine-config",
                "PUT /actions"
            ]
        );
        assert_eq!(
            requests[0].body,
            Some(serde_json::json!({
                "kernel_image_path": "/k/vmlinux",
                "boot_args": "console=ttyS0 reboot=k",
                "initrd_path": "/i.cpio",
            }))
        );
        assert_eq!(
            requests[1].body,
            Some(serde_json::json!({
                "iface_id": "eth0", "host_dev_name": "mp-tap0", "guest_mac": "02:6d:0a:0a:00:02",
            }))
        );
    }

    #[test]
    fn rootfs_boot_attaches_a_writable_root_drive() {
        let requests =
            configuration(&spec(Path::new("/run"), Boot::Rootfs("/r.ext4".into()))).unwrap();
        assert_eq!(paths(&requests)[1], "PUT /drives/rootfs");
        assert_eq!(
            requests[1].body,
            Some(serde_json::json!({
                "drive_id": "rootfs", "path_on_host": "/r.ext4",
                "is_root_device": true, "is_read_only": false,
            }))
        );
        let boot = requests[0].body.as_ref().unwrap();
        assert!(boot.get("initrd_path").is_none(), "{boot}");
    }

    #[test]
    fn vcpus_are_one_or_even_up_to_32() {
        for (cpus, ok) in [
            (0, false),
            (1, true),
            (2, true),
            (3, false),
            (32, true),
            (34, false),
        ] {
            let mut spec = spec(Path::new("/run"), Boot::Initrd("/i".into()));
            spec.cpus = cpus;
            assert_eq!(configuration(&spec).is_ok(), ok, "{cpus} vCPUs");
        }
        let mut spec = spec(Path::new("/run"), Boot::Initrd("/i".into()));
        spec.memory_mib = 0;
        assert!(matches!(
            configuration(&spec),
            Err(VmmError::Unsupported { .. })
        ));
    }

    #[test]
    fn instance_id_follows_firecracker_rules() {
        assert!(is_valid_instance_id("vm-1"));
        assert!(is_valid_instance_id(&"a".repeat(64)));
        assert!(!is_valid_instance_id(""));
        assert!(!is_valid_instance_id(&"a".repeat(65)));
        assert!(!is_valid_instance_id("vm_1"));
        assert!(!is_valid_instance_id("vm.1"));
    }

    #[test]
    fn command_removes_a_stale_socket_and_names_the_instance() {
        let tmp = TempDir::new("command");
        let socket = api_socket(&tmp.0);
        fs::write(&socket, b"stale").unwrap();
        let mut spec = spec(&tmp.0, Boot::Initrd("/i".into()));
        let command = Firecracker.command(Path::new("/bin/fc"), &spec).unwrap();
        assert!(!socket.exists());
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(
            args,
            [
                OsStr::new("--api-sock"),
                socket.as_os_str(),
                OsStr::new("--id"),
                OsStr::new("vm-1")
            ]
        );
        spec.name = "not_an_id".into();
        let command = Firecracker.command(Path::new("/bin/fc"), &spec).unwrap();
        assert_eq!(command.get_args().count(), 2);
    }

    #[test]
    fn command_refuses_a_socket_path_too_long_for_sun_path() {
        let spec = spec(
            &PathBuf::from(format!("/{}", "d".repeat(100))),
            Boot::Initrd("/i".into()),
        );
        assert!(matches!(
            Firecracker.command(Path::new("/bin/fc"), &spec),
            Err(VmmError::Unsupported { .. })
        ));
    }

    #[test]
    fn locate_finds_an_executable_on_path_or_says_how_to_install() {
        let tmp = TempDir::new("locate");
        let binary = tmp.0.join("firecracker");
        fs::write(&binary, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            locate(OsStr::new("firecracker"), Some(tmp.0.as_os_str())).unwrap(),
            binary
        );
        assert_eq!(locate(binary.as_os_str(), None).unwrap(), binary);
        let err = locate(OsStr::new("firecracker"), Some(OsStr::new("/nonexistent"))).unwrap_err();
        assert!(matches!(err, VmmError::NotInstalled { .. }), "{err:?}");
        assert!(err.to_string().contains("firecracker/releases"), "{err}");
    }
}
