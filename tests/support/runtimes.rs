//! Real container runtimes as CNI clients: containerd 1.6 (`ctr run --cni`) and podman 4.3 (its
//! CNI backend), each run inside a test's own "host" network namespace, so a test can start a
//! container on a given conflist and look at what the plugin made of it.
//!
//! Both runtimes run their CNI plugins in their own process, so every runtime command runs
//! under `nsenter --net=<host namespace>`: the plugins' "host" is the test's namespace, never
//! the machine's. What each runtime does as a CNI client, as found on these machines (Debian
//! 12: containerd 1.6.20, podman 4.3.1 with containers/common 0.50.1):
//!
//! - **ctr** reads its configuration from `/etc/cni/net.d` (the first `.conf`, `.conflist` or
//!   `.json` file by name: go-cni's `WithDefaultConf`) and looks for plugins in
//!   `/opt/cni/bin` and then `/usr/lib/cni` (Debian's build; `CNI_PATH` says so), neither
//!   configurable from the command line. It never asks a plugin for VERSION. ADD gets
//!   `CNI_CONTAINERID=<ctr namespace>-<container id>`, `CNI_NETNS=/proc/<task pid>/ns/net`,
//!   `CNI_IFNAME=eth0`, `CNI_ARGS=` (empty) and ctr's whole environment. DEL is sent by
//!   a *foreground* `ctr run --cni` only, once the task has exited (killed or on its own),
//!   with `CNI_NETNS=` empty (the namespace died with the task) and the cached `prevResult`.
//!   `ctr run --cni -d` never sends DEL, and in 1.6 neither do `ctr task kill`, `task delete`
//!   nor `container rm` (1.7 added DEL to `task kill`). The harness therefore keeps the
//!   foreground `ctr run` as a child for each container. Results in 0.3.1, 0.4.0 and 1.0.0 are accepted; a 1.1.0
//!   result is refused ("unsupported CNI result version"); a conflist's `cniVersions` is
//!   ignored (without `cniVersion` the plugin gets `"cniVersion":""`).
//! - **podman** reads only `*.conflist` in its `network_config_dir` and runs plugins from its
//!   `cni_plugin_dirs`, both set here to dirs of the test's own. Every command that loads the
//!   networks sends VERSION (stdin `{"cniVersion":"1.0.0"}`, `CNI_NETNS=dummy`) to each
//!   plugin of each list and skips, with a warning only, a list whose `cniVersion` a plugin
//!   does not claim (a list without `cniVersion` counts as 0.1.0). ADD and DEL get
//!   `CNI_CONTAINERID=<64 hex id>`, `CNI_NETNS=/run/netns/netns-<uuid>` (a namespace podman
//!   bind-mounts there, machine-wide, and removes after DEL), `CNI_IFNAME=eth0` and
//!   `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>`. DEL comes from `podman stop` /
//!   `rm`, or, when the container ends on its own, from `podman container cleanup` started by
//!   conmon, whose environment podman reduces to `PATH`, `CONTAINERS_CONF`, `HOME` and a few
//!   of its own: a plugin must take its settings from the conflist, not from the environment.
//!   The result is converted to 0.4.0 and then must hold, for every interface with a
//!   `sandbox`, a MAC address that parses (an empty one is an error), IPs whose `interface`
//!   index is in range, and nameservers that parse. 1.1.0 results are refused as by ctr
//!   (after VERSION claimed 1.1.0, ADD runs, its result is refused, and podman sends DEL).
//!
//! `/etc/cni/net.d` and `/opt/cni/bin` belong to the whole machine: the harness installs only
//! files of its own names there (`00-mpt-<pid>-<n>-ctd-<tag>.conflist`, `mpt-<pid>-<n>-ctd-<tag>`),
//! and every harness (containerd or podman) holds an exclusive `flock` on
//! [`MACHINE_LOCK`] for its whole life, so no two of them share those dirs or the
//! runtimes' machine-wide droppings (below), and the tests take turns. Dropping a harness
//! ends every process it started by pid, unmounts what the runtime left mounted under its
//! dir, removes its cgroups, dirs and files, and any machine-wide path that did not exist
//! when it took the lock (`/opt/cni/bin`, `/var/lib/cni/results`, `/run/containerd/s` where
//! shims put their sockets whatever `state` says, `/var/lib/containers/cache` where `podman
//! load` keeps a blob cache whatever `--root` says).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use micropod::vm::ProcessRef;
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};

use crate::netlab::ip_json;

/// The name both runtimes give the image [`oci_image`] writes.
pub const IMAGE: &str = "localhost/mpt-busybox:latest";
/// The body of `/www/index.html` in the image (serve it with `httpd -f -p 80 -h /www`).
pub const IMAGE_INDEX: &str = "mpt-busybox\n";
/// Held (exclusively) by every harness while it lives; see the module docs.
pub const MACHINE_LOCK: &str = "/run/mpt-cni.lock";
/// Where ctr 1.6 reads CNI configurations (the first file by name).
pub const CTR_CONF_DIR: &str = "/etc/cni/net.d";
/// The first dir where ctr 1.6 looks for plugins (Debian's build then tries `/usr/lib/cni`).
pub const CTR_BIN_DIR: &str = "/opt/cni/bin";

/// The static busybox of Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// The applets the image links to busybox (those this busybox has).
const APPLETS: &[&str] = &[
    "sh", "httpd", "wget", "ip", "ifconfig", "route", "ping", "sleep", "cat", "nc", "ls", "ps",
    "kill", "echo", "env", "hostname", "grep", "mkdir", "true", "false",
];
/// PATH for every runtime command (and so for the plugins they run).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a runtime gets for one step (start, run, stop) before the test gives up.
const STEP: Duration = Duration::from_secs(30);

/// Machine-wide paths the runtimes (or this harness) create as a side effect, deepest first:
/// each one that did not exist when the lock was taken is removed when it is released (dirs
/// only if empty).
const SHARED_PATHS: &[&str] = &[
    "/opt/cni/bin",
    "/opt/cni",
    "/etc/cni/net.d",
    "/etc/cni",
    "/var/lib/cni/results",
    "/var/lib/cni/networks",
    "/var/lib/cni",
    "/run/containerd/s",
    "/run/containerd/fifo",
    "/run/containerd/runc",
    "/run/containerd",
    "/run/runc",
    "/var/lib/containers/cache/blob-info-cache-v1.boltdb",
    "/var/lib/containers/cache",
    "/var/lib/containers",
];

/// A `mpt-<pid>-<n>-<tag>` name, unique on the machine while this process lives.
fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("mpt-{}-{n}-{tag}", std::process::id())
}

/// Polls `done` every 20 ms until it holds; panics with `what` after `timeout`.
#[track_caller]
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `program` inside the network namespace at `netns`, with an environment of PATH only: the
/// runtime runs the CNI plugins in its own process, so they see this namespace as the host
/// and inherit exactly this environment (plus their CNI_ variables).
fn in_netns(netns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg(program)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null());
    cmd
}

/// Writes an OCI image layout tarball into `dir` and returns its path: one uncompressed layer
/// with the static busybox of `busybox-static` as `/bin/busybox`, its applets in [`APPLETS`]
/// as symlinks, `/www/index.html` ([`IMAGE_INDEX`]) and a root entry in `/etc/passwd`. The
/// index's manifest carries the name [`IMAGE`] twice: `io.containerd.image.name`, which both
/// `ctr image import` and `podman load` prefer, and `org.opencontainers.image.ref.name`, which
/// both take as a whole reference when it has a `/` or `:` (ctr would otherwise prefix a bare
/// tag with `import-<date>`). Blobs are digested with `sha256sum`; the tars are made with
/// GNU tar, sorted, owned by root and dated 1970, so the image is the same every time.
pub fn oci_image(dir: &Path) -> PathBuf {
    let busybox = fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("reading {BUSYBOX} (install busybox-static): {e}"));
    assert!(
        is_static_elf(&busybox),
        "{BUSYBOX} is not a static executable (install busybox-static, not busybox)"
    );
    let work = dir.join(unique("image"));
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "www", "var/run",
    ] {
        fs::create_dir_all(rootfs.join(d)).expect("making the image's rootfs");
    }
    fs::create_dir_all(&blobs).expect("making the image layout");
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("/tmp");
    fs::write(rootfs.join("bin/busybox"), &busybox).expect("copying busybox");
    fs::set_permissions(
        rootfs.join("bin/busybox"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("busybox mode");
    let list = run_ok(Command::new(BUSYBOX).arg("--list"));
    let have: Vec<&str> = list.lines().collect();
    for applet in APPLETS.iter().filter(|a| have.contains(a)) {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .expect("linking an applet");
    }
    fs::write(rootfs.join("www/index.html"), IMAGE_INDEX).expect("index.html");
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");

    let layer = work.join("layer.tar");
    run_ok(reproducible_tar(&rootfs, &layer).arg("."));
    let layer = add_blob(&blobs, &layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "micropod-tests oci_image"}],
    }))
    .expect("config JSON");
    let config = add_blob_bytes(&blobs, &work, "config.json", &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest,
            "size": config.size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer.digest,
            "size": layer.size,
        }],
    }))
    .expect("manifest JSON");
    let manifest = add_blob_bytes(&blobs, &work, "manifest.json", &manifest);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": IMAGE,
            },
        }],
    });
    fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let archive = dir.join("mpt-busybox.oci.tar");
    run_ok(reproducible_tar(&layout, &archive).args(["oci-layout", "index.json", "blobs"]));
    fs::remove_dir_all(&work).expect("removing the image's work dir");
    archive
}

/// `tar -c` of `dir`'s entries (named after this call) into `out`, the same bytes every time.
fn reproducible_tar(dir: &Path, out: &Path) -> Command {
    let mut cmd = Command::new("tar");
    cmd.args([
        "--sort=name",
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "--mtime=@0",
        "--format=gnu",
    ])
    .arg("-C")
    .arg(dir)
    .arg("-cf")
    .arg(out);
    cmd
}

/// A blob of an image layout.
struct Blob {
    digest: String,
    size: u64,
}

/// Moves `file` into `blobs` under its sha256.
fn add_blob(blobs: &Path, file: &Path) -> Blob {
    let sum = run_ok(Command::new("sha256sum").arg(file));
    let hex = sum.split_whitespace().next().expect("sha256sum output");
    let size = fs::metadata(file).expect("blob size").len();
    fs::rename(file, blobs.join(hex)).expect("moving a blob");
    Blob {
        digest: format!("sha256:{hex}"),
        size,
    }
}

fn add_blob_bytes(blobs: &Path, work: &Path, name: &str, bytes: &[u8]) -> Blob {
    let file = work.join(name);
    fs::write(&file, bytes).expect("writing a blob");
    add_blob(blobs, &file)
}

/// Whether `elf` is a 64-bit ELF executable without a program interpreter (PT_INTERP), i.e.
/// one that runs in a container with nothing else in it.
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * usize::from(phentsize);
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

/// The exclusive lock every harness holds on [`MACHINE_LOCK`] while it lives, and what it
/// found of [`SHARED_PATHS`] when it took it.
struct MachineLock {
    lock: Option<Flock<File>>,
    existed: Vec<(&'static str, bool)>,
}

impl MachineLock {
    /// Takes the lock (waiting for another test's harness to finish), removes what a harness
    /// killed before its Drop ran left in the machine's CNI dirs (only names this harness
    /// makes: nobody else of ours can be using them while we hold the lock), and notes which
    /// shared paths exist.
    fn acquire() -> Self {
        let lock = loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(MACHINE_LOCK)
                .unwrap_or_else(|e| panic!("opening {MACHINE_LOCK}: {e}"));
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((file, _)) => {
                    eprintln!("waiting for {MACHINE_LOCK} (another runtime test holds it)");
                    Flock::lock(file, FlockArg::LockExclusive)
                        .unwrap_or_else(|(_, e)| panic!("locking {MACHINE_LOCK}: {e}"))
                }
            };
            // A releasing holder unlinks the file before it unlocks: make sure the lock we
            // got is on the file the path names now.
            let held = file.metadata().expect("lock file metadata");
            if fs::metadata(MACHINE_LOCK)
                .is_ok_and(|now| now.dev() == held.dev() && now.ino() == held.ino())
            {
                break file;
            }
        };
        sweep_stale();
        let existed = SHARED_PATHS
            .iter()
            .map(|&p| (p, fs::symlink_metadata(p).is_ok()))
            .collect();
        Self {
            lock: Some(lock),
            existed,
        }
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        for &(path, existed) in &self.existed {
            if existed {
                continue;
            }
            let result = match fs::symlink_metadata(path) {
                Ok(meta) if meta.is_dir() => fs::remove_dir(path),
                Ok(_) => fs::remove_file(path),
                Err(_) => continue,
            };
            if let Err(e) = result {
                eprintln!("warning: cannot remove {path}, made during the test: {e}");
            }
        }
        // Unlinked while still locked: a waiter that opened this file finds it gone and
        // opens a new one.
        if let Err(e) = fs::remove_file(MACHINE_LOCK) {
            eprintln!("warning: cannot remove {MACHINE_LOCK}: {e}");
        }
        drop(self.lock.take());
    }
}

/// Removes this harness's names from the machine's CNI dirs and caches, left by a test that
/// was killed before its Drop ran. Called with the machine lock held.
fn sweep_stale() {
    for (dir, prefix) in [
        (CTR_CONF_DIR, "00-mpt-"),
        (CTR_BIN_DIR, "mpt-"),
        ("/var/lib/cni/results", "mpt-"),
        ("/var/lib/cni/networks", "mpt-"),
    ] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            let path = entry.path();
            eprintln!(
                "warning: removing {}, left by an earlier test run",
                path.display()
            );
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(e) = result {
                eprintln!("warning: cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// The CNI configuration dir and plugin dir a runtime reads, and what the harness put there:
/// files of its own names only, removed on drop (with the runtimes' result caches and
/// host-local's default leases for its networks).
pub struct CniDirs {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    /// `mpt-<pid>-<n>-ctd` or `-pod`: the start of every plugin, network and file name this
    /// installs.
    prefix: String,
    /// ctr's dirs, shared by the machine (ctr takes the first conflist by name, so there is
    /// one at a time), or a test's own (podman: any number, by network name).
    machine: bool,
    files: Vec<PathBuf>,
    networks: Vec<String>,
}

impl CniDirs {
    fn new(conf_dir: PathBuf, bin_dir: PathBuf, prefix: String, machine: bool) -> Self {
        for dir in [&conf_dir, &bin_dir] {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        Self {
            conf_dir,
            bin_dir,
            prefix,
            machine,
            files: Vec::new(),
            networks: Vec::new(),
        }
    }

    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A network name of this harness's own (`<prefix>-<tag>`); conflists must use one,
    /// since the runtimes' caches (`/var/lib/cni/results/<network>-…`) and host-local's
    /// default leases (`/var/lib/cni/networks/<network>`) are shared by the machine.
    pub fn network_name(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }

    /// Installs a copy of the executable `source` as a plugin and returns its name, which is
    /// what a conflist's `type` (or `ipam.type`) names: `<prefix>-<tag>`.
    pub fn install_plugin(&mut self, tag: &str, source: &Path) -> String {
        let name = self.network_name(tag);
        let path = self.bin_dir.join(&name);
        self.files.push(path.clone());
        fs::copy(source, &path).unwrap_or_else(|e| {
            panic!("installing {} as {}: {e}", source.display(), path.display())
        });
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("plugin mode");
        name
    }

    /// Installs a shell script as a plugin (`#!/bin/sh` is prepended); returns its name.
    pub fn install_script(&mut self, tag: &str, body: &str) -> String {
        let name = self.network_name(tag);
        let path = self.bin_dir.join(&name);
        self.files.push(path.clone());
        // Written to a temp name and renamed: the kernel refuses to exec a file that some
        // process still has open for writing (ETXTBSY).
        let tmp = self.bin_dir.join(format!(".{name}.tmp"));
        let mut file = File::create(&tmp).expect("creating a plugin script");
        write!(file, "#!/bin/sh\n{body}").expect("writing a plugin script");
        file.set_permissions(fs::Permissions::from_mode(0o755))
            .expect("plugin mode");
        drop(file);
        fs::rename(&tmp, &path).expect("installing a plugin script");
        name
    }

    /// Installs a plugin that runs `real` (by absolute path, with everything it was given)
    /// and records each call in `log_dir` for [`cni_calls`]: environment, stdin, stdout and
    /// exit status. Returns its name.
    pub fn install_logging_wrapper(&mut self, tag: &str, real: &Path, log_dir: &Path) -> String {
        fs::create_dir_all(log_dir).expect("creating the CNI call log dir");
        let log = shell_quote(&log_dir.display().to_string());
        let real = shell_quote(&real.display().to_string());
        self.install_script(
            tag,
            &format!(
                "# Records one CNI call in {log}, then answers as {real} does.\n\
                 n=\"$(date +%s%N)-$$\"\n\
                 env -0 > {log}/\"$n.env\"\n\
                 cat > {log}/\"$n.stdin\"\n\
                 {real} < {log}/\"$n.stdin\" > {log}/\"$n.stdout\"\n\
                 rc=$?\n\
                 cat {log}/\"$n.stdout\"\n\
                 echo \"$rc\" > {log}/\"$n.rc\"\n\
                 exit \"$rc\"\n"
            ),
        )
    }

    /// Writes `conflist` where the runtime reads it and returns its path. Its `name` must be
    /// one of [`Self::network_name`]'s. In ctr's dir it replaces the one written before and
    /// must be the first file by name (ctr reads only that one), which is checked.
    #[track_caller]
    pub fn write_conflist(&mut self, conflist: &Value) -> PathBuf {
        let name = conflist["name"]
            .as_str()
            .expect("a conflist has a name")
            .to_owned();
        assert!(
            name.starts_with(&format!("{}-", self.prefix)),
            "network {name:?} is not one of this harness's (use network_name)"
        );
        let path = if self.machine {
            let conf_dir = self.conf_dir.clone();
            self.files.retain(|f| {
                let ours = f.parent() == Some(conf_dir.as_path());
                if ours {
                    let _ = fs::remove_file(f);
                }
                !ours
            });
            self.conf_dir.join(format!("00-{name}.conflist"))
        } else {
            self.conf_dir.join(format!("{name}.conflist"))
        };
        if !self.files.contains(&path) {
            self.files.push(path.clone());
        }
        if !self.networks.contains(&name) {
            self.networks.push(name);
        }
        let tmp = self.conf_dir.join(format!(".{}.tmp", self.prefix));
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(conflist).expect("conflist JSON"),
        )
        .expect("writing the conflist");
        fs::rename(&tmp, &path).expect("installing the conflist");
        if self.machine {
            let first = fs::read_dir(&self.conf_dir)
                .expect("listing the CNI conf dir")
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "conf" || x == "conflist" || x == "json")
                })
                .min();
            assert_eq!(
                first.as_deref(),
                Some(path.as_path()),
                "ctr would read another file than ours; remove it"
            );
        }
        path
    }
}

impl Drop for CniDirs {
    fn drop(&mut self) {
        for file in &self.files {
            if let Err(e) = fs::remove_file(file)
                && e.kind() != io::ErrorKind::NotFound
            {
                eprintln!("warning: cannot remove {}: {e}", file.display());
            }
        }
        // libcni's cache of each ADD (removed by a DEL that worked) and host-local's leases
        // when a conflist left its dataDir at the default.
        if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if self
                    .networks
                    .iter()
                    .any(|n| name.starts_with(&format!("{n}-")))
                {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        for network in &self.networks {
            let _ = fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(network));
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One call of a plugin installed with [`CniDirs::install_logging_wrapper`].
#[derive(Debug)]
pub struct CniCall {
    /// `CNI_COMMAND`.
    pub command: String,
    pub env: BTreeMap<String, String>,
    /// The network configuration the plugin got (a JSON string if it was not JSON).
    pub stdin: Value,
    pub stdout: String,
    /// The exit status; `None` while the call still runs.
    pub rc: Option<i32>,
}

impl CniCall {
    /// An environment variable of the call ("" if unset).
    pub fn var(&self, name: &str) -> &str {
        self.env.get(name).map_or("", String::as_str)
    }
}

/// The calls recorded in `log_dir`, oldest first.
pub fn cni_calls(log_dir: &Path) -> Vec<CniCall> {
    let Ok(entries) = fs::read_dir(log_dir) else {
        return Vec::new();
    };
    let mut stems: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".env")
                .map(str::to_owned)
        })
        .collect();
    stems.sort();
    stems
        .into_iter()
        .map(|stem| {
            let read = |ext: &str| fs::read(log_dir.join(format!("{stem}.{ext}")));
            let env: BTreeMap<String, String> = read("env")
                .unwrap_or_default()
                .split(|&b| b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect();
            let stdin = read("stdin").unwrap_or_default();
            CniCall {
                command: env.get("CNI_COMMAND").cloned().unwrap_or_default(),
                stdin: serde_json::from_slice(&stdin)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&stdin).into())),
                stdout: String::from_utf8_lossy(&read("stdout").unwrap_or_default()).into(),
                rc: read("rc")
                    .ok()
                    .and_then(|rc| String::from_utf8_lossy(&rc).trim().parse().ok()),
                env,
            }
        })
        .collect()
}

/// The IPv4 address of `ifname` in the namespace at `netns` (a container's, e.g.
/// [`Containerd::netns`] or [`Podman::netns`]), read with `ip -j`.
#[track_caller]
pub fn ipv4_of(netns: &Path, ifname: &str) -> Ipv4Addr {
    let v = ip_json(netns, &["-4", "addr", "show", "dev", ifname]);
    v[0]["addr_info"][0]["local"]
        .as_str()
        .unwrap_or_else(|| panic!("no IPv4 address on {ifname} in {}: {v}", netns.display()))
        .parse()
        .expect("an IPv4 address")
}

/// The names of the ports of `bridge` in the namespace at `netns`.
pub fn bridge_ports(netns: &Path, bridge: &str) -> Vec<String> {
    ip_json(netns, &["link", "show", "master", bridge])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// How a runtime process that the harness waited for ended.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Unmounts (lazily) every mount whose mount point is `dir` or below it, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let dir = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == &dir || p.starts_with(&format!("{dir}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        if let Err(e) = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("warning: cannot unmount {point}: {e}");
        }
    }
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        match rest
            .get(at + 1..at + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes the cgroup `rel` (a path below a hierarchy's root that only this harness uses) in
/// every hierarchy, its children first; only empty cgroups can go, so a cgroup that still
/// holds a process stays, with a warning.
fn remove_cgroups(rel: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join(rel)];
    if let Ok(entries) = fs::read_dir(root) {
        candidates.extend(entries.flatten().map(|e| e.path().join(rel)));
    }
    for dir in candidates {
        if dir.is_dir() {
            remove_cgroup_tree(&dir);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("warning: cannot remove cgroup {}: {e}", dir.display());
    }
}

/// Removes `dir`, retrying for a moment (a process that was just killed may still hold a file
/// in it).
fn remove_dir(dir: &Path) {
    let mut attempts = 0;
    loop {
        match fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) if attempts < 40 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                eprintln!("warning: cannot remove {}: {e}", dir.display());
                return;
            }
        }
    }
}

/// Sends SIGTERM to a child, waits up to `grace`, then SIGKILL; reaps it.
fn end_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(process) = ProcessRef::of(child.id()) {
        let _ = process.signal(nix::libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for `child` to exit; `None` if it still runs.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/status`.
fn parent_of(pid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// Whether the NUL-separated `/proc/<pid>/cmdline` has `flag` followed by `value`.
fn cmdline_has(pid: u32, flag: &str, value: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == flag.as_bytes() && w[1] == value.as_bytes())
}

/// One container started through `ctr run`.
struct CtrContainer {
    /// The foreground `ctr run --cni` (which sends DEL when the task ends); `None` for a
    /// detached container or once it has been waited for.
    ctr: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    /// The task's shim and init, recorded once it runs.
    processes: Vec<ProcessRef>,
    /// The shim's socket, in `/run/containerd/s` whatever the config says; the shim removes
    /// it when it exits, unless it is killed.
    shim_socket: Option<PathBuf>,
}

/// containerd 1.6 of the test's own: its config, root, state, sockets, runc root and FIFOs
/// under a temp dir, the CRI plugin (and the snapshotters that cannot work here) disabled,
/// running under `nsenter --net=<host namespace>` so that it, its shims and runc all sit in
/// the test's namespace; `ctr` commands run there too (ctr runs the CNI plugins itself).
/// CNI goes through [`CniDirs`] in ctr's hard-coded machine dirs, under the machine lock.
///
/// Drop ends every container (so each foreground `ctr run` sends its DEL), then containerd
/// (SIGTERM, then SIGKILL, by pid), then any shim or container process that outlived it (by
/// pid and start time); unmounts what is left under its dir, removes its cgroups
/// (`/sys/fs/cgroup/*/<ctr namespace>`: runc makes `/<namespace>/<id>` and removes only the
/// leaf) and its dir; then the CNI files, then the lock.
pub struct Containerd {
    dir: PathBuf,
    host: PathBuf,
    /// The ctr namespace, `mpt-<pid>-<n>-ctd`; also the prefix of the CNI names.
    namespace: String,
    address: PathBuf,
    daemon: Option<Child>,
    containers: BTreeMap<String, CtrContainer>,
    image: Option<String>,
    cni: CniDirs,
    _lock: MachineLock,
}

impl Containerd {
    /// Takes the machine lock and starts containerd in the namespace at `host`; returns once
    /// it answers on its socket.
    pub fn start(host: &Path) -> Self {
        let lock = MachineLock::acquire();
        let namespace = unique("ctd");
        let dir = std::env::temp_dir().join(&namespace);
        // Made before anything can fail, so that Drop cleans up after a failed start too.
        let mut ctd = Self {
            address: dir.join("containerd.sock"),
            cni: CniDirs::new(
                CTR_CONF_DIR.into(),
                CTR_BIN_DIR.into(),
                namespace.clone(),
                true,
            ),
            dir,
            host: host.to_owned(),
            namespace,
            daemon: None,
            containers: BTreeMap::new(),
            image: None,
            _lock: lock,
        };
        for sub in ["root", "state", "tmp", "opt", "fifo", "runc"] {
            fs::create_dir_all(ctd.dir.join(sub)).expect("creating containerd's dirs");
        }
        let d = ctd.dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
temp = "{d}/tmp"
# The CRI plugin would run a CNI of its own on the machine's config; the snapshotters listed
# cannot work here and only log. (runtime.v1.linux must stay: the tasks service needs it.)
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "warn"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
"#
        );
        let config_path = ctd.dir.join("config.toml");
        fs::write(&config_path, config).expect("writing containerd's config");
        let log = File::create(ctd.dir.join("containerd.log")).expect("containerd's log");
        let mut cmd = in_netns(host, "containerd");
        cmd.arg("--config")
            .arg(&config_path)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        // nsenter execs containerd (no fork without --pid), so this pid is containerd's.
        ctd.daemon = Some(cmd.spawn().expect("starting nsenter"));
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(Ok(Some(status))) = ctd.daemon.as_mut().map(Child::try_wait) {
                panic!(
                    "containerd exited ({status}):\n{}",
                    fs::read_to_string(ctd.dir.join("containerd.log")).unwrap_or_default()
                );
            }
            if ctd.address.exists()
                && ctd
                    .ctr(["version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within {STEP:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ctd
    }

    /// The harness's temp dir (containerd's root and state are in it; tests may put their
    /// own files there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ctr namespace (`CNI_CONTAINERID` is `<namespace>-<container id>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// ctr's CNI dirs (the machine's), for plugins and the conflist.
    pub fn cni(&mut self) -> &mut CniDirs {
        &mut self.cni
    }

    /// `ctr --address … --namespace … ARGS` inside the host namespace.
    pub fn ctr<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = in_netns(&self.host, "ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// `ctr image import` of an image made by [`oci_image`]; returns its name ([`IMAGE`]),
    /// which later runs use.
    #[track_caller]
    pub fn import(&mut self, image: &Path) -> String {
        run_ok(self.ctr(["image", "import"]).arg(image));
        let names = run_ok(&mut self.ctr(["image", "ls", "-q"]));
        assert!(
            names.lines().any(|l| l == IMAGE),
            "ctr image import did not name the image {IMAGE}: {names:?}"
        );
        self.image = Some(IMAGE.into());
        IMAGE.into()
    }

    fn run_args(&self, id: &str) -> Command {
        let image = self.image.as_deref().expect("import an image first");
        let mut cmd = self.ctr(["run", "--cni"]);
        cmd.arg("--rm")
            .arg("--fifo-dir")
            .arg(self.dir.join("fifo"))
            .arg("--runc-root")
            .arg(self.dir.join("runc"))
            .args([image, id]);
        cmd
    }

    /// Runs `cmd` in a new container `id` with `ctr run --cni --rm` (in the foreground, as
    /// a child of the test, since only a foreground `ctr run` sends DEL) and returns once its
    /// task runs, i.e. once ADD has succeeded; panics with ctr's output if ADD fails.
    #[track_caller]
    pub fn run_cni(&mut self, id: &str, cmd: &[&str]) {
        if let Err(exited) = self.try_run_cni(id, cmd) {
            panic!("ctr run --cni {id} {cmd:?} failed: {exited:?}");
        }
    }

    /// [`Self::run_cni`], returning how ctr ended if the task never ran (ADD failed: ctr has
    /// then sent DEL, with an empty netns, and removed the container).
    pub fn try_run_cni(&mut self, id: &str, cmd: &[&str]) -> Result<(), Exited> {
        let stdout = self.dir.join(format!("{id}.stdout"));
        let stderr = self.dir.join(format!("{id}.stderr"));
        let child = self
            .run_args(id)
            .args(cmd)
            .stdout(File::create(&stdout).expect("container stdout file"))
            .stderr(File::create(&stderr).expect("ctr stderr file"))
            .spawn()
            .expect("starting ctr run");
        self.containers.insert(
            id.into(),
            CtrContainer {
                ctr: Some(child),
                stdout,
                stderr,
                processes: Vec::new(),
                shim_socket: None,
            },
        );
        let deadline = Instant::now() + STEP;
        loop {
            if self.task_status(id).as_deref() == Some("RUNNING") {
                break;
            }
            let c = self.containers.get_mut(id).expect("just inserted");
            if let Some(Ok(Some(status))) = c.ctr.as_mut().map(Child::try_wait) {
                c.ctr = None;
                let exited = Exited {
                    status,
                    stdout: fs::read_to_string(&c.stdout).unwrap_or_default(),
                    stderr: fs::read_to_string(&c.stderr).unwrap_or_default(),
                };
                self.containers.remove(id);
                return Err(exited);
            }
            assert!(
                Instant::now() < deadline,
                "the task of {id} does not run after {STEP:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.record_processes(id);
        Ok(())
    }

    /// Notes the task's init, its shim (init's parent, checked to be a shim of this
    /// containerd) and the shim's socket, so that Drop can end and remove them even if
    /// containerd cannot.
    fn record_processes(&mut self, id: &str) {
        let Some(init) = self.try_pid(id) else {
            return;
        };
        let address = self.address.display().to_string();
        let shim = parent_of(init).filter(|&p| cmdline_has(p, "-address", &address));
        let processes: Vec<ProcessRef> = [Some(init), shim]
            .into_iter()
            .flatten()
            .filter_map(|pid| ProcessRef::of(pid).ok())
            .collect();
        let socket = fs::read_to_string(self.bundle(id).join("address"))
            .ok()
            .and_then(|a| a.trim().strip_prefix("unix://").map(PathBuf::from))
            .filter(|p| p.starts_with("/run/containerd/s/"));
        if let Some(c) = self.containers.get_mut(id) {
            c.processes = processes;
            c.shim_socket = socket;
        }
    }

    /// The task's bundle dir (the shim's `init.pid`, `address`, the rootfs mount).
    fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    /// The task's status as `ctr task ls` shows it (RUNNING, STOPPED, CREATED, …).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(["task", "ls"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.first() == Some(&id))
                .then(|| fields.get(2).map(|s| (*s).to_owned()))
                .flatten()
        })
    }

    fn try_pid(&self, id: &str) -> Option<u32> {
        fs::read_to_string(self.bundle(id).join("init.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The pid of the container's init process (from the shim's `init.pid`).
    #[track_caller]
    pub fn pid(&self, id: &str) -> u32 {
        self.try_pid(id)
            .unwrap_or_else(|| panic!("container {id} has no running task"))
    }

    /// The container's network namespace, as ctr gave it to the plugin (`/proc/<pid>/ns/net`).
    #[track_caller]
    pub fn netns(&self, id: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid(id)))
    }

    /// `ctr task exec` of `cmd` in the container; its output, whatever the status.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Output {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let exec_id = format!("mpt-exec-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.ctr(["task", "exec", "--exec-id", &exec_id, "--fifo-dir"])
            .arg(self.dir.join("fifo"))
            .arg(id)
            .args(cmd)
            .output()
            .expect("running ctr task exec")
    }

    /// The container's stdout so far.
    pub fn stdout(&self, id: &str) -> String {
        self.containers
            .get(id)
            .and_then(|c| fs::read_to_string(&c.stdout).ok())
            .unwrap_or_default()
    }

    /// Kills the task (SIGKILL: busybox as pid 1 ignores SIGTERM) and waits for the
    /// foreground `ctr run`, which then sends DEL (empty `CNI_NETNS`), deletes the task and
    /// removes the container; returns how that ctr ended (its stderr has "network review"
    /// if DEL failed: ctr only logs it). A detached container is deleted with `ctr task
    /// delete` and `ctr container rm`, which send no CNI call.
    #[track_caller]
    pub fn stop(&mut self, id: &str) -> Exited {
        let _ = self.ctr(["task", "kill", "-s", "SIGKILL", id]).output();
        self.wait_exit(id, STEP)
    }

    /// Waits (up to `timeout`) for the container's task to end by itself, and for its
    /// foreground ctr to finish (DEL, delete); see [`Self::stop`].
    #[track_caller]
    pub fn wait_exit(&mut self, id: &str, timeout: Duration) -> Exited {
        let c = self
            .containers
            .get_mut(id)
            .unwrap_or_else(|| panic!("no container {id}"));
        let exited = match c.ctr.as_mut() {
            Some(child) => {
                let status = wait_child(child, timeout)
                    .unwrap_or_else(|| panic!("ctr run of {id} did not finish within {timeout:?}"));
                c.ctr = None;
                Exited {
                    status,
                    stdout: fs::read_to_string(&c.stdout).unwrap_or_default(),
                    stderr: fs::read_to_string(&c.stderr).unwrap_or_default(),
                }
            }
            None => {
                wait_until(&format!("the task of {id} stops"), timeout, || {
                    !matches!(self.task_status(id).as_deref(), Some("RUNNING" | "CREATED"))
                });
                let delete = self.ctr(["task", "delete", id]).output().expect("ctr");
                let rm = self.ctr(["container", "rm", id]).output().expect("ctr");
                Exited {
                    status: rm.status,
                    stdout: String::from_utf8_lossy(&delete.stdout).into_owned(),
                    stderr: format!(
                        "{}{}",
                        String::from_utf8_lossy(&delete.stderr),
                        String::from_utf8_lossy(&rm.stderr)
                    ),
                }
            }
        };
        self.containers.remove(id);
        exited
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Through containerd first (if it runs: ctr would wait for its socket), so each
        // foreground ctr sends its DEL while the plugins and the conflist are still installed.
        let running = self
            .daemon
            .as_mut()
            .is_some_and(|d| matches!(d.try_wait(), Ok(None)));
        if running {
            self.end_containers();
        }
        if let Some(mut daemon) = self.daemon.take() {
            end_child(&mut daemon, Duration::from_secs(5));
        }
        let mut sockets = Vec::new();
        for (id, mut c) in std::mem::take(&mut self.containers) {
            if let Some(mut child) = c.ctr.take() {
                if matches!(child.try_wait(), Ok(None)) {
                    eprintln!("warning: ctr run of {id} still runs; killing it");
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
            for process in c.processes {
                if matches!(process.signal(nix::libc::SIGKILL), Ok(true)) {
                    eprintln!("warning: killed {} left by containerd", process.pid);
                }
            }
            sockets.extend(c.shim_socket);
        }
        for socket in sockets.iter().filter(|s| s.exists()) {
            eprintln!(
                "warning: removing {}, left by a dead shim",
                socket.display()
            );
            let _ = fs::remove_file(socket);
        }
        unmount_under(&self.dir);
        remove_cgroups(&self.namespace);
        remove_dir(&self.dir);
    }
}

impl Containerd {
    /// Drop's orderly part: kills every task through containerd, lets each foreground ctr
    /// finish (DEL, delete), then deletes what containerd still has.
    fn end_containers(&mut self) {
        let ids: Vec<String> = self.containers.keys().cloned().collect();
        for id in &ids {
            let _ = self.ctr(["task", "kill", "-s", "SIGKILL", id]).output();
        }
        for (id, c) in &mut self.containers {
            if let Some(child) = c.ctr.as_mut() {
                if wait_child(child, Duration::from_secs(10)).is_none() {
                    eprintln!("warning: ctr run of {id} did not finish; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                }
                c.ctr = None;
            }
        }
        // Whatever this containerd still knows of (detached containers, failed runs).
        if let Ok(out) = self.ctr(["task", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(["task", "kill", "-s", "SIGKILL", id]).output();
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(self.task_status(id).as_deref(), Some("RUNNING" | "CREATED"))
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = self.ctr(["task", "delete", id]).output();
            }
        }
        if let Ok(out) = self.ctr(["container", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(["container", "rm", id]).output();
            }
        }
    }
}

/// One container started through `podman run`.
struct PodmanContainer {
    /// Its network namespace (`/run/netns/netns-<uuid>`), which podman removes after DEL.
    netns: Option<PathBuf>,
    /// conmon and the container's init, recorded at run.
    processes: Vec<ProcessRef>,
}

/// podman 4.3 of the test's own: `CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF` and
/// `CONTAINERS_REGISTRIES_CONF` in its temp dir (the machine's are never read), storage
/// (`--root`, `--runroot`, vfs), `--tmpdir`, file locks instead of the machine-wide SHM lock
/// segment, file events, cgroupfs with a cgroup parent of its own, runc with its state under
/// the dir (through a two-line wrapper, since podman has no setting for runc's `--root` that
/// reaches conmon's cleanup command), and the CNI backend on [`CniDirs`] of its own. Every
/// command runs under `nsenter --net=<host namespace>`: podman runs the plugins itself, and
/// conmon (which podman starts, in the same namespace) runs `podman container cleanup`, which
/// sends DEL when a container ends by itself.
///
/// Drop removes every container (`rm -f -t 0`: DEL while the plugins are installed), ends by
/// pid any conmon or container process left, removes a container namespace podman left in
/// `/run/netns`, unmounts what is left under its dir, removes its cgroups and its dir; then
/// the lock.
pub struct Podman {
    dir: PathBuf,
    host: PathBuf,
    /// `/mpt-<pid>-<n>-pod`: `--cgroup-parent` of every container (podman puts conmon in
    /// `<parent>/conmon` and the container in `<parent>/libpod-<id>`).
    cgroup_parent: String,
    containers: BTreeMap<String, PodmanContainer>,
    cni: CniDirs,
    _lock: MachineLock,
}

impl Podman {
    /// Takes the machine lock and writes podman's configuration for running in the
    /// namespace at `host`.
    pub fn new(host: &Path) -> Self {
        let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("runc is installed");
        let lock = MachineLock::acquire();
        let name = unique("pod");
        let dir = std::env::temp_dir().join(&name);
        // Made before anything can fail, so that Drop cleans up after a failed start too.
        let podman = Self {
            cgroup_parent: format!("/{name}"),
            cni: CniDirs::new(dir.join("net.d"), dir.join("cni-bin"), name.clone(), false),
            dir: dir.clone(),
            host: host.to_owned(),
            containers: BTreeMap::new(),
            _lock: lock,
        };
        for sub in ["root", "runroot", "tmp", "runc", "home"] {
            fs::create_dir_all(dir.join(sub)).expect("creating podman's dirs");
        }
        let d = dir.display();
        // Beside runc's state dir, not in it: runc owns that.
        let wrapper = dir.join("mpt-runc");
        fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec {runc} --root {d}/runc \"$@\"\n"),
        )
        .expect("writing the runc wrapper");
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("wrapper mode");
        let containers_conf = format!(
            r#"[containers]
# podman raises RLIMIT_NOFILE to fs.nr_open (1048576) for root by default; above the hard
# limit here (20000) that is not permitted, and runc fails ("error setting rlimit type 7").
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
# File locks in tmp_dir, not the SHM segment /dev/shm/libpod_lock that every podman shares.
lock_type = "file"
tmp_dir = "{d}/tmp"
image_copy_tmp_dir = "{d}/tmp"
volume_path = "{d}/root/volumes"
static_dir = "{d}/root/libpod"
runtime = "mpt-runc"

[engine.runtimes]
mpt-runc = ["{d}/mpt-runc"]

[network]
network_backend = "cni"
network_config_dir = "{d}/net.d"
cni_plugin_dirs = ["{d}/cni-bin"]
# podman makes this network in memory when no file names it; never written to disk.
default_network = "{name}-default"
"#
        );
        fs::write(dir.join("containers.conf"), containers_conf).expect("containers.conf");
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/root\"\n"
            ),
        )
        .expect("storage.conf");
        fs::write(dir.join("registries.conf"), "").expect("registries.conf");
        fs::write(
            dir.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("policy.json");
        podman
    }

    /// The harness's temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// podman's CNI dirs (the test's own), for plugins and conflists.
    pub fn cni(&mut self) -> &mut CniDirs {
        &mut self.cni
    }

    /// `podman <global flags> ARGS` inside the host namespace.
    pub fn podman<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let d = &self.dir;
        let mut cmd = in_netns(&self.host, "podman");
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("HOME", d.join("home"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--network-config-dir")
            .arg(d.join("net.d"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        cmd
    }

    /// `podman load -i` of an image made by [`oci_image`]; returns the name podman gave it.
    #[track_caller]
    pub fn load(&self, image: &Path) -> String {
        let out = run_ok(
            self.podman(["load", "--signature-policy"])
                .arg(self.dir.join("policy.json"))
                .arg("-i")
                .arg(image),
        );
        let name = out
            .lines()
            .find_map(|l| l.strip_prefix("Loaded image: "))
            .unwrap_or_else(|| panic!("podman load named no image: {out:?}"))
            .trim()
            .to_owned();
        assert_eq!(name, IMAGE, "podman load gave the image another name");
        name
    }

    /// `podman run -d --name NAME --network NETWORK` of [`IMAGE`] with `cmd`; returns the
    /// container's id once it runs (ADD has succeeded). Panics with podman's output if not.
    #[track_caller]
    pub fn run(&mut self, name: &str, network: &str, cmd: &[&str]) -> String {
        self.try_run(name, network, cmd)
            .unwrap_or_else(|out| panic!("podman run {name} on {network} failed: {out:?}"))
    }

    /// [`Self::run`], returning podman's output if it fails.
    pub fn try_run(&mut self, name: &str, network: &str, cmd: &[&str]) -> Result<String, Output> {
        self.containers.insert(
            name.into(),
            PodmanContainer {
                netns: None,
                processes: Vec::new(),
            },
        );
        let out = self
            .podman(["run", "-d", "--name", name, "--network", network])
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg(IMAGE)
            .args(cmd)
            .output()
            .expect("running podman run");
        if !out.status.success() {
            return Err(out);
        }
        let inspect = self.inspect(name);
        let state = &inspect["State"];
        let netns = inspect["NetworkSettings"]["SandboxKey"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let conmon = state["ConmonPid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok());
        let init = state["Pid"].as_u64().and_then(|p| u32::try_from(p).ok());
        let c = self.containers.get_mut(name).expect("just inserted");
        c.netns = netns;
        c.processes = [conmon, init]
            .into_iter()
            .flatten()
            .filter(|&p| p != 0)
            .filter_map(|pid| ProcessRef::of(pid).ok())
            .collect();
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `podman inspect NAME`, parsed (the first object).
    #[track_caller]
    pub fn inspect(&self, name: &str) -> Value {
        let out = run_ok(&mut self.podman(["inspect", name]));
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("podman inspect {name}: bad JSON {out:?}: {e}"));
        v[0].clone()
    }

    /// The container's init pid.
    #[track_caller]
    pub fn pid(&self, name: &str) -> u32 {
        let pid = self.inspect(name)["State"]["Pid"].as_u64().unwrap_or(0);
        assert!(pid != 0, "container {name} does not run");
        u32::try_from(pid).expect("a pid")
    }

    /// The container's network namespace, as podman gave it to the plugin
    /// (`/run/netns/netns-<uuid>`).
    #[track_caller]
    pub fn netns(&self, name: &str) -> PathBuf {
        let inspect = self.inspect(name);
        let key = inspect["NetworkSettings"]["SandboxKey"]
            .as_str()
            .unwrap_or_default();
        assert!(!key.is_empty(), "container {name} has no network namespace");
        key.into()
    }

    /// The address podman recorded for the container on `network` (from the plugin's result).
    #[track_caller]
    pub fn ipv4(&self, name: &str, network: &str) -> Ipv4Addr {
        let inspect = self.inspect(name);
        let ip = &inspect["NetworkSettings"]["Networks"][network]["IPAddress"];
        ip.as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 address for {name} on {network}: {ip}"))
    }

    /// `podman exec NAME cmd…`; its output, whatever the status.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Output {
        self.podman(["exec", name])
            .args(cmd)
            .output()
            .expect("running podman exec")
    }

    /// `podman stop -t 0` (SIGKILL at once: busybox as pid 1 ignores SIGTERM): the container
    /// stops, podman sends DEL (with the container's netns path, still there) and removes the
    /// namespace. Returns podman's output, whatever the status.
    pub fn stop(&self, name: &str) -> Output {
        self.podman(["stop", "-t", "0", name])
            .output()
            .expect("running podman stop")
    }

    /// `podman rm -f -t 0` (DEL too if it still ran).
    pub fn rm(&mut self, name: &str) -> Output {
        let out = self
            .podman(["rm", "-f", "-t", "0", name])
            .output()
            .expect("running podman rm");
        if out.status.success() {
            self.containers.remove(name);
        }
        out
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Every container in this root is the test's.
        let _ = self.podman(["rm", "-a", "-f", "-t", "0"]).output();
        for (name, c) in std::mem::take(&mut self.containers) {
            for process in c.processes {
                if matches!(process.signal(nix::libc::SIGKILL), Ok(true)) {
                    eprintln!("warning: killed {} left by podman for {name}", process.pid);
                }
            }
            if let Some(netns) = c.netns.filter(|p| p.exists()) {
                eprintln!("warning: removing {}, left by podman", netns.display());
                let _ = nix::mount::umount2(&netns, nix::mount::MntFlags::MNT_DETACH);
                let _ = fs::remove_file(&netns);
            }
        }
        unmount_under(&self.dir);
        remove_cgroups(self.cgroup_parent.trim_start_matches('/'));
        remove_dir(&self.dir);
    }
}
