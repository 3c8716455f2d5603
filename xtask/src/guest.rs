//! `cargo xtask guest`: micropod's test guest, built from Debian packages and cached.
//!
//! - Kernel: `linux-image-cloud-amd64`'s versioned image package; its virtio drivers are modules,
//!   which go into the initramfs.
//! - Userland: `busybox-static` and `guest/init`, packed as a gzip'd newc cpio written here (so
//!   `/dev/console` can be a device node without root, and the archive is reproducible).
//!
//! Output in `target/guest/`: `vmlinuz`, `initrd.img` and a stamp of what they were built from.
//! The stamp is keyed by the package versions, `guest/init`'s bytes and this builder's format;
//! asking apt for the versions takes about a second, so while the apt lists are unchanged since
//! the last build the stamp alone decides.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

/// Bump when the archive's layout changes, so old caches rebuild.
const FORMAT: u32 = 1;
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";
const APT_LISTS: &str = "/var/lib/apt/lists";
/// virtio-net over virtio-mmio (QEMU microvm, Firecracker), in load order.
const NET_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
];
/// For a graceful stop: the ACPI power button as an input device that busybox acpid reads.
/// Loaded when the kernel has them.
const OPTIONAL_MODULES: &[&str] = &["evdev", "button"];

/// The built guest.
pub(crate) struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub(crate) fn build(root: &Path) -> anyhow::Result<Guest> {
    let started = Instant::now();
    let out = root.join("target/guest");
    let guest = Guest {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
    };
    let init_path = root.join("guest/init");
    let init = fs::read(&init_path).with_context(|| format!("reading {}", init_path.display()))?;
    let stamp_path = out.join("stamp");
    let old = fs::read_to_string(&stamp_path).unwrap_or_default();
    let built = guest.kernel.is_file() && guest.initrd.is_file();

    // The stamp: `format=` and `init=` lines, one `<package>=<version>` line each, then
    // `apt-lists=`.
    let head = format!("format={FORMAT}\ninit={:016x}\n", fnv1a(&init));
    let lists = format!("apt-lists={}\n", lists_mtime()?);
    if built && old.starts_with(&head) && old.ends_with(&lists) {
        return done(guest, "cached", started);
    }
    let pkgs = resolve()?;
    let mut inputs = head;
    for p in &pkgs {
        inputs.push_str(&format!("{}={}\n", p.name, p.version));
    }
    let old_inputs = old.split("apt-lists=").next().unwrap_or_default();
    if built && old_inputs == inputs {
        // Same packages; only the apt lists changed.
        write_stamp(&stamp_path, &format!("{inputs}{lists}"))?;
        return done(guest, "cached", started);
    }

    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // A half-built guest must not look built if this run fails.
    let _ = fs::remove_file(&stamp_path);
    let [kernel_pkg, busybox_pkg] = &pkgs;
    let kernel_dir = fetch(&out, kernel_pkg)?;
    let busybox_dir = fetch(&out, busybox_pkg)?;

    let vmlinuz = find_one(&kernel_dir.join("boot"), "vmlinuz-")?;
    fs::copy(&vmlinuz, &guest.kernel).with_context(|| {
        format!(
            "copying {} to {}",
            vmlinuz.display(),
            guest.kernel.display()
        )
    })?;

    eprintln!("==> writing {}", guest.initrd.display());
    let modules_dir = find_one(&kernel_dir.join("lib/modules"), "")?;
    let modules = Modules::read(&modules_dir)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console before /init runs (and before devtmpfs is mounted).
    cpio.char_dev("dev/console", 0o600, 5, 1);
    let busybox = busybox_dir.join("bin/busybox");
    cpio.file(
        "bin/busybox",
        0o755,
        fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?,
    );
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, init);
    let mut load = String::new();
    for (name, optional) in NET_MODULES
        .iter()
        .map(|m| (m, false))
        .chain(OPTIONAL_MODULES.iter().map(|m| (m, true)))
    {
        match modules.find(name) {
            Module::Builtin => {}
            Module::Missing if optional => {}
            Module::Missing => bail!(
                "module {name} is neither built into {} nor shipped with it",
                kernel_pkg.name
            ),
            Module::File(path) => {
                cpio.file(
                    &format!("lib/modules/{name}.ko"),
                    0o644,
                    read_module(&path)?,
                );
                load.push_str(name);
                load.push('\n');
            }
        }
    }
    cpio.file("lib/modules/load", 0o644, load.into_bytes());
    gzip(&cpio.finish(), &guest.initrd)?;

    write_stamp(&stamp_path, &format!("{inputs}{lists}"))?;
    done(guest, "built", started)
}

fn done(guest: Guest, how: &str, started: Instant) -> anyhow::Result<Guest> {
    eprintln!("guest {how} in {:.1?}", started.elapsed());
    println!("kernel: {}", guest.kernel.display());
    println!("initrd: {}", guest.initrd.display());
    Ok(guest)
}

fn write_stamp(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// When apt's package lists last changed (`apt-get update` renames files into the directory).
fn lists_mtime() -> anyhow::Result<String> {
    let meta = fs::metadata(APT_LISTS).with_context(|| format!("reading {APT_LISTS}"))?;
    let t = meta.modified()?.duration_since(UNIX_EPOCH)?;
    Ok(format!("{}.{:09}", t.as_secs(), t.subsec_nanos()))
}

/// 64-bit FNV-1a: a stable fingerprint for the stamp (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Package {
    name: String,
    version: String,
}

/// The candidate versions of the kernel image package (named by the meta package's dependency)
/// and busybox-static. Runs `apt-get update` once if apt does not know them.
fn resolve() -> anyhow::Result<[Package; 2]> {
    match try_resolve()? {
        Some(p) => Ok(p),
        None => {
            eprintln!("==> apt-get update (apt does not know {KERNEL_META} or {BUSYBOX})");
            apt_update()?;
            try_resolve()?.with_context(|| {
                format!("apt has no candidate for {KERNEL_META} or {BUSYBOX}; check its sources")
            })
        }
    }
}

fn try_resolve() -> anyhow::Result<Option<[Package; 2]>> {
    let show =
        output(Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_META, BUSYBOX]))
            .unwrap_or_default();
    let mut kernel = None;
    let mut busybox = None;
    // One stanza per package: Package, Version, Depends.
    for stanza in show.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        };
        match field("Package") {
            Some(KERNEL_META) => {
                // Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
                let dep = field("Depends").context("no Depends in apt-cache show")?;
                let (name, rest) = dep
                    .split_once(" (= ")
                    .with_context(|| format!("unexpected Depends of {KERNEL_META}: {dep}"))?;
                kernel = Some(Package {
                    name: name.trim().to_owned(),
                    version: rest.trim_end_matches(')').trim().to_owned(),
                });
            }
            Some(BUSYBOX) => {
                busybox = field("Version").map(|v| Package {
                    name: BUSYBOX.to_owned(),
                    version: v.to_owned(),
                });
            }
            _ => {}
        }
    }
    Ok(kernel.zip(busybox).map(|(k, b)| [k, b]))
}

fn apt_update() -> anyhow::Result<()> {
    crate::run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update (needs root and the Debian mirror)")
}

/// Downloads `pkg` (once) and extracts it (once) under `out`; returns the extracted tree.
fn fetch(out: &Path, pkg: &Package) -> anyhow::Result<PathBuf> {
    let id = format!("{}_{}", pkg.name, pkg.version.replace(':', "%3a"));
    let dir = out.join("pkgs").join(&id);
    if dir.join(".extracted").exists() {
        return Ok(dir);
    }
    let debs = out.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = debs.join(format!("{id}_amd64.deb"));
    if !deb.exists() {
        eprintln!("==> apt-get download {}={}", pkg.name, pkg.version);
        let download = || {
            crate::run(
                Command::new("apt-get")
                    // Root downloading into a directory `_apt` cannot write: say so once, here.
                    .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
                    .arg(format!("{}={}", pkg.name, pkg.version))
                    .current_dir(&debs),
            )
        };
        if download().is_err() {
            // Stale lists name a version the mirror no longer has.
            eprintln!("==> apt-get update, then download again");
            apt_update()?;
            download().with_context(|| format!("apt-get download {}", pkg.name))?;
        }
        if !deb.exists() {
            bail!(
                "apt-get download {} did not write {}",
                pkg.name,
                deb.display()
            );
        }
    }
    eprintln!("==> extracting {}", deb.display());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))
        .with_context(|| format!("extracting {}", deb.display()))?;
    fs::write(dir.join(".extracted"), "")?;
    Ok(dir)
}

/// The one entry of `dir` whose name starts with `prefix`.
fn find_one(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(entry.path());
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) => bail!(
            "expected one `{prefix}*` in {}, found {found:?}",
            dir.display()
        ),
    }
}

enum Module {
    Builtin,
    File(PathBuf),
    Missing,
}

/// A kernel's `modules.builtin` and `modules.order` (the package has no `modules.dep`: its
/// postinst runs depmod).
struct Modules {
    dir: PathBuf,
    builtin: String,
    order: String,
}

impl Modules {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(Self {
            dir: dir.to_owned(),
            builtin: read("modules.builtin")?,
            order: read("modules.order")?,
        })
    }

    fn find(&self, name: &str) -> Module {
        // Lines are paths such as kernel/drivers/virtio/virtio.ko; files may be compressed.
        let named = |line: &&str| {
            Path::new(line)
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.split_once(".ko"))
                .is_some_and(|(stem, _)| stem.replace('-', "_") == name)
        };
        if self.builtin.lines().any(|l| named(&l)) {
            return Module::Builtin;
        }
        let Some(line) = self.order.lines().find(named) else {
            return Module::Missing;
        };
        // modules.order names the uncompressed file even when the package ships it compressed.
        let path = self.dir.join(line);
        for ext in ["", ".xz", ".zst"] {
            let mut candidate = path.clone().into_os_string();
            candidate.push(ext);
            let candidate = PathBuf::from(candidate);
            if candidate.exists() {
                return Module::File(candidate);
            }
        }
        Module::Missing
    }
}

/// A module's bytes, decompressed: busybox insmod loads them with init_module(2), which takes
/// an uncompressed ELF.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {tool} to decompress {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), out.status);
    }
    Ok(out.stdout)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn gzip(data: &[u8], to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut child = Command::new("gzip")
        .args(["-n", "-9"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("starting gzip")?;
    child
        .stdin
        .take()
        .context("gzip's stdin")?
        .write_all(data)
        .context("writing to gzip")?;
    let status = child.wait().context("waiting for gzip")?;
    if !status.success() {
        bail!("gzip failed: {status}");
    }
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

/// A newc ("070701") cpio archive, as the kernel unpacks an initramfs: every entry owned by
/// root, mtime 0, so the same inputs give the same bytes.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    const S_IFDIR: u32 = 0o040_000;
    const S_IFREG: u32 = 0o100_000;
    const S_IFLNK: u32 = 0o120_000;
    const S_IFCHR: u32 = 0o020_000;

    fn dir(&mut self, name: &str) {
        self.entry(name, Self::S_IFDIR | 0o755, 2, (0, 0), &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) {
        self.entry(name, Self::S_IFREG | perm, 1, (0, 0), &data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, Self::S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }
    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, Self::S_IFCHR | perm, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("initramfs entries are under 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short names");
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_archive_reads_back_with_gnu_cpio() {
        let mut c = Cpio::default();
        c.dir("d");
        c.file("d/f", 0o644, b"hello".to_vec());
        c.symlink("d/l", "f");
        let archive = c.finish();
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<_> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" d"));
        assert!(lines[1].starts_with("-rw-r--r--") && lines[1].contains(" 5 "));
        assert!(lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("d/l -> f"));
    }

    #[test]
    fn fnv1a_is_the_reference_function() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
