#!/usr/bin/env bash
# Cross-builds edgevlm for 64-bit ARM boards (Raspberry Pi 4/5, Jetson) and proves the build
# on an emulated Cortex-A72:
#   bash ci/cross.sh [--linker auto|zig|gcc] [--no-test]
#
# - zig: `cargo zigbuild --target aarch64-unknown-linux-gnu.2.28`, so the binary
#   needs glibc 2.28 at most and runs on Raspberry Pi OS bullseye / bookworm and JetPack 5.
#   zig comes from the PyPI package `ziglang`, cargo-zigbuild from crates.io.
# - gcc: Debian's gcc-aarch64-linux-gnu. That binary needs this machine's glibc (2.36:
#   bookworm and newer only); the script says so.
# - auto (default): zig, or gcc when zig or cargo-zigbuild cannot be installed, so the build
#   does not hang on one download path.
#
# Then, unless --no-test: the runtime's model-fixture tests (tract's ARM kernels against the
# ONNX Runtime references) and the demo inspection, both under `qemu-aarch64 -cpu cortex-a72`.
# The binary ends up in target/aarch64-unknown-linux-gnu/release/edgevlm.
set -euo pipefail
cd "$(dirname "$0")/.."

linker=auto
run_tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --linker) linker=${2:?--linker needs auto, zig or gcc}; shift 2 ;;
    --no-test) run_tests=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "cross.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
case "$linker" in auto|zig|gcc) ;; *) echo "cross.sh: --linker is auto, zig or gcc, not $linker" >&2; exit 2 ;; esac

target=aarch64-unknown-linux-gnu
glibc_floor=2.28
# Pinned so a new release cannot change the build under us; zig 0.14 is what this
# cargo-zigbuild release is tested with.
zig_version=0.14.1
zigbuild_version=0.24.1
jobs=${EDGEVLM_JOBS:-2}
step() { echo; echo "=== cross: $* ($(date +%H:%M:%S))"; }

[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export CARGO_TERM_COLOR=never

step "packages"
# qemu-user runs the binaries; libc6-dev-arm64-cross is the arm64 glibc they load under it
# (-L /usr/aarch64-linux-gnu) and the headers bindgen reads for the V4L2 bindings;
# gcc-aarch64-linux-gnu is the fallback linker.
. ci/apt.sh
apt_install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils python3-venv
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

sysroot=/usr/aarch64-linux-gnu
# bindgen (v4l2-sys-mit) parses linux/videodev2.h for arm64. zig's libc headers lack the
# kernel's V4L2 header, so Debian's arm64 headers are searched after them (cargo-zigbuild
# appends its own include options to this variable).
export BINDGEN_EXTRA_CLANG_ARGS="-idirafter $sysroot/include"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu cortex-a72 -L $sysroot"

install_zig() {
  local venv=target/cross-venv
  if ! "$venv/bin/python" -m ziglang version 2>/dev/null | grep -qx "$zig_version"; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q "ziglang==$zig_version" || return 1
  fi
  # cargo-zigbuild runs `python -m ziglang` when it finds no `zig`; point it at ours.
  export PATH="$PWD/$venv/bin:$PATH"
  if ! cargo zigbuild --version 2>/dev/null | grep -q "$zigbuild_version"; then
    cargo install -q --locked --version "$zigbuild_version" cargo-zigbuild || return 1
  fi
}

if [ "$linker" != gcc ]; then
  step "zig $zig_version and cargo-zigbuild $zigbuild_version"
  if install_zig; then
    linker=zig
  elif [ "$linker" = auto ]; then
    echo "cross.sh: zig or cargo-zigbuild could not be installed; falling back to gcc" >&2
    linker=gcc
  else
    echo "cross.sh: zig or cargo-zigbuild could not be installed (try --linker gcc)" >&2
    exit 1
  fi
fi
if [ "$linker" = zig ]; then
  build=(cargo-zigbuild build)
  test=(cargo-zigbuild test)
  triple="$target.$glibc_floor"
else
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
  build=(cargo build)
  test=(cargo test)
  triple="$target"
fi

step "build edgevlm for $triple"
"${build[@]}" --release -j"$jobs" -p edgevlm --target "$triple"
bin="target/$target/release/edgevlm"
file "$bin" 2>/dev/null || ls -l "$bin"

step "glibc symbols the binary needs"
needed=$(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
echo "highest GLIBC symbol version: $needed"
if [ "$linker" = zig ]; then
  if [ "$(printf '%s\n%s\n' "$needed" "$glibc_floor" | sort -V | tail -1)" != "$glibc_floor" ]; then
    echo "cross.sh: $bin needs GLIBC_$needed, more than $glibc_floor" >&2
    exit 1
  fi
  echo "ok: runs on glibc >= $glibc_floor (Raspberry Pi OS bullseye 2.31, bookworm 2.36, JetPack 5 2.31)"
else
  echo "note: gcc fallback build; it needs glibc >= $needed (Debian bookworm / Raspberry Pi OS bookworm)"
fi

[ "$run_tests" = 1 ] || exit 0

step "model fixtures and the load cache under qemu-aarch64 -cpu cortex-a72 (tract's ARM kernels vs ONNX Runtime)"
"${test[@]}" --release -j"$jobs" -p edgevlm-runtime --target "$triple" --test fixtures --test demo --test cache
step "generation under qemu-aarch64: preprocessing, prompt ids and greedy tokens vs transformers / ONNX Runtime"
"${test[@]}" --release -j"$jobs" -p edgevlm-runtime --target "$triple" --test generate

step "the demo inspection under qemu-aarch64"
$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER "$bin" --version
$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER "$bin" inspect --board sim --model models/demo models/demo/samples --fail-on-ng || [ $? -eq 1 ]
step "done"
