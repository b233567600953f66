#!/usr/bin/env bash
# Installs what edgevlm needs to build and run on a fresh Debian 12 machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

. ci/apt.sh
# libclang-dev: the v4l crate generates its V4L2 bindings with bindgen at build time.
# openssh-server/-client: the end-to-end tests run a real sshd (tests/src/sshd.rs).
# fonts-dejavu-core: the text of `edgevlm compare --plot` (found at run time, never shipped).
# dosfstools, mtools, e2fsprogs, fdisk, xz-utils: `edgevlm image build` and its test.
apt_install build-essential pkg-config ca-certificates curl python3 python3-venv libclang-dev \
  openssh-server openssh-client fonts-dejavu-core dosfstools mtools e2fsprogs fdisk xz-utils

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  # rustup then reads rust-toolchain.toml and installs the pinned toolchain on first use.
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  . "$HOME/.cargo/env"
fi
cargo --version
