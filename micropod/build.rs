//! Builds the eBPF object from `micropod-ebpf` with its pinned nightly (aya-build), or, with
//! `AYA_BUILD_SKIP=1`, writes an empty placeholder so unit tests build without nightly or
//! bpf-linker. A binary built that way reports that it carries no eBPF object.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// The object's file name in OUT_DIR: the `[[bin]]` name of micropod-ebpf.
const OBJECT: &str = "micropod";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../micropod-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var("OUT_DIR")?).join(OBJECT);
        fs::write(&out, []).with_context(|| format!("writing placeholder {}", out.display()))?;
        return Ok(());
    }

    let toolchain = nightly_channel(&fs::read_to_string(&toolchain_file)?)
        .ok_or_else(|| anyhow!("no channel in {}", toolchain_file.display()))?;
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "micropod-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF object; run scripts/setup.sh to install the nightly and bpf-linker, or set AYA_BUILD_SKIP=1 to build without it")
}

/// The `channel = "…"` value of a rust-toolchain.toml.
fn nightly_channel(toml: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("channel")?
            .trim()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}
