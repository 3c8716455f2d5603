#!/usr/bin/env bash
# Installs everything micropod needs to build, test and run its demo, and only what is missing:
#   - Debian packages (apt-get, once, only if one is missing)
#   - rustup (if absent), the userspace toolchain pinned in rust-toolchain.toml, and the dated
#     nightly (with rust-src) pinned in micropod-ebpf/rust-toolchain.toml
#   - bpf-linker, built against that nightly's own libLLVM so both use the same LLVM
#   - bpffs at /sys/fs/bpf
# Safe to run again: on a ready machine it checks and exits in seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BPF_LINKER_VERSION=0.13.0
# Debian packages the build, the tests and the demo use.
DEBIAN_PACKAGES=(
  ca-certificates curl gcc libc6-dev pkg-config iproute2 util-linux
  nftables                  # tests read the ruleset back with an independent tool
  containernetworking-plugins # the reference CNI bridge + host-local for `cargo xtask bench attach`
  ethtool                   # data plane tests turn checksum offload off so the kernel verifies
  nginx-light wrk iperf3    # `cargo xtask bench datapath`: server, connection rate, throughput
  qemu-system-x86 cpio      # VMs (QEMU microvm); cpio checks the test guest's initramfs writer
  containerd runc podman busybox-static # real CNI clients (`ctr run --cni`, podman's CNI backend)
                            # and the busybox the tests' container image is made of
)

say() { printf '==> %s\n' "$*" >&2; }
started=$SECONDS

export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
export PATH="$CARGO_HOME/bin:$PATH"

# --- Debian packages --------------------------------------------------------------------------
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == *'install ok installed'* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# --- rustup and toolchains --------------------------------------------------------------------
if ! command -v rustup >/dev/null; then
  say "installing rustup into $CARGO_HOME"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  curl --proto '=https' --tlsv1.2 -sSf -o "$tmp/rustup-init" \
    https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init
  chmod +x "$tmp/rustup-init"
  "$tmp/rustup-init" -y --no-modify-path --profile minimal --default-toolchain none >/dev/null
fi
rustup set auto-self-update disable >/dev/null 2>&1 || true

channel() { sed -n 's/^channel *= *"\(.*\)"/\1/p' "$1"; }
components() { sed -n 's/^components *= *\[\(.*\)\]/\1/p' "$1" | tr -d '" ' | tr ',' ' '; }
targets() { sed -n 's/^targets *= *\[\(.*\)\]/\1/p' "$1" | tr -d '" ' | tr ',' ' '; }

ensure_toolchain() { # file
  local file=$1 tc comps targs have missing=() c
  tc=$(channel "$file")
  read -r -a comps <<<"$(components "$file")"
  read -r -a targs <<<"$(targets "$file")"
  if rustup run "$tc" rustc --version >/dev/null 2>&1; then
    have=$(rustup component list --toolchain "$tc" --installed 2>/dev/null)
    for c in "${comps[@]}"; do grep -q "^$c" <<<"$have" || missing+=("$c"); done
    have=$(rustup target list --toolchain "$tc" --installed 2>/dev/null)
    for c in "${targs[@]}"; do grep -qx "$c" <<<"$have" || missing+=("$c"); done
    if ((${#missing[@]} == 0)); then
      say "toolchain $tc present"
      return
    fi
  fi
  say "installing toolchain $tc (${comps[*]} ${targs[*]})"
  local args=()
  for c in "${comps[@]}"; do args+=(-c "$c"); done
  for c in "${targs[@]}"; do args+=(-t "$c"); done
  rustup toolchain install "$tc" --profile minimal "${args[@]}" >/dev/null
}
ensure_toolchain rust-toolchain.toml
ensure_toolchain micropod-ebpf/rust-toolchain.toml
USER_TC=$(channel rust-toolchain.toml)
EBPF_TC=$(channel micropod-ebpf/rust-toolchain.toml)

# --- bpf-linker against the nightly's libLLVM ------------------------------------------------
sysroot=$(rustup run "$EBPF_TC" rustc --print sysroot)
llvm_major=$(rustup run "$EBPF_TC" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
libllvm=$(cd "$sysroot/lib" && ls libLLVM.so."$llvm_major".* 2>/dev/null | head -n1 || true)
if [[ -z $libllvm ]]; then
  echo "error: no libLLVM.so.$llvm_major.* in $sysroot/lib; reinstall $EBPF_TC" >&2
  exit 1
fi
# llvm-sys links against the unversioned name.
[[ $(readlink "$sysroot/lib/libLLVM.so" 2>/dev/null) == "$libllvm" ]] ||
  ln -sfn "$libllvm" "$sysroot/lib/libLLVM.so"

linker_ok() {
  local bin=$CARGO_HOME/bin/bpf-linker
  [[ -x $bin ]] || return 1
  # Outputs are captured, not piped into `grep -q`: under pipefail, grep leaving early can
  # SIGPIPE the writer and fail a check that matched.
  local version deps
  version=$("$bin" --version 2>/dev/null) || return 1
  [[ $version == *"$BPF_LINKER_VERSION"* ]] || return 1
  # It must load this nightly's libLLVM (the path is baked in at build time).
  deps=$(ldd "$bin" 2>/dev/null) || return 1
  [[ $deps =~ libLLVM[^[:space:]]*\ =\>\ $sysroot/lib/ ]]
}
if linker_ok; then
  say "bpf-linker $BPF_LINKER_VERSION (LLVM $llvm_major) present"
else
  say "building bpf-linker $BPF_LINKER_VERSION against $EBPF_TC's LLVM $llvm_major (takes a few minutes)"
  LLVM_PREFIX=$sysroot rustup run "$USER_TC" cargo install --locked --force \
    "bpf-linker@$BPF_LINKER_VERSION" --no-default-features --features "llvm-$llvm_major"
  linker_ok || { echo "error: bpf-linker built but does not load $sysroot/lib/$libllvm" >&2; exit 1; }
fi

# --- bpffs ------------------------------------------------------------------------------------
if [[ $(id -u) == 0 ]] && ! mountpoint -q /sys/fs/bpf; then
  say "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

say "setup done in $((SECONDS - started))s"
