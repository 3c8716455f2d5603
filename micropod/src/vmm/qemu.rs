//! QEMU's `microvm` machine: a Firecracker-like board (virtio-mmio, no PCI, no firmware
//! beyond a minimal one) that boots a Linux kernel directly.
//!
//! - Machine `microvm,pit=on,pic=on,rtc=on`: a stock distribution kernel needs the legacy PIT
//!   and PIC to calibrate its clocks and route the timer interrupt, and the RTC for the time.
//! - Acceleration: KVM when `/dev/kvm` can really run a stock guest, else TCG (see
//!   [`Accel::choose`]); `MICROPOD_QEMU_ACCEL=kvm|tcg` overrides the probe.
//! - Serial console on QEMU's stdout (the supervisor points it at the console log), network
//!   as virtio-net on the VM's TAP with the endpoint's MAC, rootfs (if any) as virtio-blk.
//! - Control over QMP on `<run_dir>/qmp.sock`: `start` waits for `query-status` to say
//!   `running`; `request_stop` sends `system_powerdown` (an ACPI power-button press, which the
//!   guest has to act on).

mod qmp;

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use qmp::Qmp;

use super::{Boot, VmSpec, Vmm, VmmError, VmmKind};

/// The binary micropod runs.
pub const BINARY: &str = "qemu-system-x86_64";
/// Overrides the accelerator probe: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "MICROPOD_QEMU_ACCEL";
/// The QMP socket's name inside the VM's run dir.
pub const QMP_SOCKET: &str = "qmp.sock";
const INSTALL: &str = "install it with `apt-get install qemu-system-x86` (Debian/Ubuntu)";

#[derive(Debug, Default)]
pub struct Qemu;

/// How QEMU executes guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's own translator: slow, but runs anywhere.
    Tcg,
}

impl Accel {
    /// `MICROPOD_QEMU_ACCEL` if set, else KVM when [`kvm_usable`], else TCG.
    pub fn choose() -> Result<Self, VmmError> {
        match std::env::var(ACCEL_ENV) {
            Ok(value) => match value.as_str() {
                "kvm" => Ok(Self::Kvm),
                "tcg" => Ok(Self::Tcg),
                _ => Err(VmmError::Unsupported {
                    vmm: "qemu",
                    what: format!("{ACCEL_ENV}={value:?}; use kvm or tcg, or unset it"),
                }),
            },
            Err(_) if kvm_usable() => Ok(Self::Kvm),
            Err(_) => Ok(Self::Tcg),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Whether KVM can run a stock guest kernel: `/dev/kvm` opens, speaks API version 12 and
/// creates a VM, and it is not PVM. PVM (`kvm_pvm`, KVM for machines without hardware
/// virtualisation, as on nested cloud instances) passes all of those checks but only runs
/// guest kernels built for it, so a stock kernel never boots there.
pub fn kvm_usable() -> bool {
    const KVM_API_VERSION: libc::c_int = 12;
    if Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    let Ok(kvm) = File::options().read(true).write(true).open("/dev/kvm") else {
        return false;
    };
    if crate::sys::kvm_api_version(kvm.as_fd()).ok() != Some(KVM_API_VERSION) {
        return false;
    }
    // The VM is closed again at once: creating it is the test.
    crate::sys::kvm_create_vm(kvm.as_fd()).is_ok()
}

/// The host's TSC rate in kHz, from `/proc/cpuinfo` (`cpu MHz`).
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))?
        .trim_start_matches([' ', '\t', ':'])
        .trim()
        .parse()
        .ok()?;
    // Truncation is fine: the kernel only needs the rate roughly right.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive MHz figure well within u64"
    )]
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// Finds `name` in `$PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl Qemu {
    fn qmp_socket(spec: &VmSpec) -> PathBuf {
        spec.run_dir.join(QMP_SOCKET)
    }

    /// QEMU's arguments for `spec` with `accel`.
    fn args(spec: &VmSpec, accel: Accel) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("guest={},process=micropod-{}", spec.name, spec.name),
            "-M".into(),
            "microvm,pit=on,pic=on,rtc=on".into(),
            "-accel".into(),
            accel.name().into(),
            "-cpu".into(),
            match accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            }
            .into(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-smp".into(),
            spec.cpus.to_string(),
            // Only the devices below: no default NIC, VGA, monitor or config files.
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // A guest reboot ends the VM, as with Firecracker: the supervisor sees it exit.
            "-no-reboot".into(),
            "-chardev".into(),
            "stdio,id=console,signal=off".into(),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
        ];
        match &spec.boot {
            Boot::Initrd(initrd) => {
                args.extend(["-initrd".into(), initrd.display().to_string()]);
            }
            Boot::Rootfs(rootfs) => args.extend([
                "-drive".into(),
                // QEMU's -drive syntax escapes commas in values by doubling them.
                format!(
                    "id=root,file={},format=raw,if=none",
                    rootfs.display().to_string().replace(',', ",,")
                ),
                "-device".into(),
                "virtio-blk-device,drive=root".into(),
            ]),
        }
        args.extend([
            "-append".into(),
            spec.cmdline.clone(),
            "-netdev".into(),
            format!("tap,id=net0,ifname={},script=no,downscript=no", spec.tap),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", spec.mac),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                Self::qmp_socket(spec)
                    .display()
                    .to_string()
                    .replace(',', ",,")
            ),
        ]);
        args
    }
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn binary(&self) -> Result<PathBuf, VmmError> {
        find_in_path(BINARY).ok_or_else(|| VmmError::NotInstalled {
            vmm: "qemu",
            binary: BINARY.into(),
            install: INSTALL,
        })
    }

    fn control_socket_name(&self) -> &'static str {
        QMP_SOCKET
    }

    fn kernel_args(&self) -> Result<Vec<String>, VmmError> {
        // Under TCG the guest's quick PIT calibration of the TSC often fails when the host is
        // busy (several VMs booting at once); the kernel then finds no other reference clock
        // on microvm and hangs at boot. The guest TSC runs at the host's rate, so say it; and
        // keep the clocksource watchdog from swapping the TSC for jiffies, which lose ticks
        // under TCG.
        Ok(match (Accel::choose()?, host_tsc_khz()) {
            (Accel::Tcg, Some(khz)) => vec![format!("tsc_early_khz={khz}"), "tsc=reliable".into()],
            _ => Vec::new(),
        })
    }

    fn command(&self, binary: &Path, spec: &VmSpec) -> Result<Command, VmmError> {
        let mut cmd = Command::new(binary);
        cmd.args(Self::args(spec, Accel::choose()?));
        Ok(cmd)
    }

    fn start(&self, spec: &VmSpec, timeout: Duration) -> Result<(), VmmError> {
        let deadline = Instant::now() + timeout;
        let mut qmp = Qmp::connect(&Self::qmp_socket(spec), timeout)?;
        loop {
            let status = qmp.execute("query-status", None)?;
            if status["status"] == "running" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Protocol {
                    vmm: "qemu",
                    request: "query-status".into(),
                    detail: format!("the VM is still {} after {timeout:?}", status["status"]),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn request_stop(&self, spec: &VmSpec, timeout: Duration) -> Result<(), VmmError> {
        Qmp::connect(&Self::qmp_socket(spec), timeout)?
            .execute("system_powerdown", None)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::net::Mac;

    fn spec(boot: Boot) -> VmSpec {
        VmSpec {
            name: "web".into(),
            kernel: "/k/vmlinuz".into(),
            boot,
            cpus: 2,
            memory_mib: 256,
            cmdline: "console=ttyS0 ip=10.10.0.2::10.10.0.1:255.255.255.0::eth0:off".into(),
            tap: "mpt-0a0a0002".into(),
            mac: Mac::for_ip(Ipv4Addr::new(10, 10, 0, 2)),
            ip: Ipv4Addr::new(10, 10, 0, 2),
            run_dir: "/state/vms/abc".into(),
            console_log: "/state/vms/abc/console.log".into(),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn initrd_command_line() {
        let args = Qemu::args(&spec(Boot::Initrd("/k/initrd".into())), Accel::Tcg);
        assert_eq!(after(&args, "-M"), ["microvm,pit=on,pic=on,rtc=on"]);
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-cpu"), ["max"]);
        assert_eq!(after(&args, "-m"), ["256M"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(after(&args, "-initrd"), ["/k/initrd"]);
        assert!(after(&args, "-drive").is_empty());
        assert_eq!(
            after(&args, "-append"),
            ["console=ttyS0 ip=10.10.0.2::10.10.0.1:255.255.255.0::eth0:off"]
        );
        assert_eq!(
            after(&args, "-netdev"),
            ["tap,id=net0,ifname=mpt-0a0a0002,script=no,downscript=no"]
        );
        assert_eq!(
            after(&args, "-device"),
            ["virtio-net-device,netdev=net0,mac=02:6d:0a:0a:00:02"]
        );
        assert_eq!(
            after(&args, "-qmp"),
            ["unix:/state/vms/abc/qmp.sock,server=on,wait=off"]
        );
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(args.iter().any(|a| a == "-no-reboot"));
    }

    #[test]
    fn rootfs_and_kvm() {
        let args = Qemu::args(&spec(Boot::Rootfs("/img/a,b.ext4".into())), Accel::Kvm);
        assert_eq!(after(&args, "-accel"), ["kvm"]);
        assert_eq!(after(&args, "-cpu"), ["host"]);
        assert!(after(&args, "-initrd").is_empty());
        assert_eq!(
            after(&args, "-drive"),
            ["id=root,file=/img/a,,b.ext4,format=raw,if=none"]
        );
        assert_eq!(
            after(&args, "-device"),
            [
                "virtio-blk-device,drive=root",
                "virtio-net-device,netdev=net0,mac=02:6d:0a:0a:00:02"
            ]
        );
    }

    #[test]
    fn tsc_rate_from_cpuinfo() {
        // Every x86 Linux host reports `cpu MHz`; the figure must be plausible.
        let khz = host_tsc_khz().expect("cpu MHz in /proc/cpuinfo");
        assert!((100_000..20_000_000).contains(&khz), "{khz}");
    }
}
