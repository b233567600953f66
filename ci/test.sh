#!/usr/bin/env bash
# Runs every check and test of the workspace. Installs what it needs first (ci/setup.sh).
# Model tests run in release: tract is unusably slow unoptimized, and CI builds tract once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export CARGO_TERM_COLOR=never
jobs=${EDGEVLM_JOBS:-2}

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "rustfmt"
cargo fmt --all -- --check
step "build (release)"
cargo build --release --workspace --all-targets -j"$jobs"
step "clippy"
cargo clippy --release --workspace --all-targets -j"$jobs" -- -D warnings
step "tests"
cargo test --release --workspace -j"$jobs" 2>&1 | tee target/test-output.txt
step "edgevlm-proto is no_std (thumbv7em-none-eabihf, with and without defmt)"
rustup target list --installed | grep -qx thumbv7em-none-eabihf || rustup target add thumbv7em-none-eabihf
cargo build --release -j"$jobs" -p edgevlm-proto --no-default-features --target thumbv7em-none-eabihf
cargo build --release -j"$jobs" -p edgevlm-proto --no-default-features --features defmt --target thumbv7em-none-eabihf
step "aarch64: cross-build (glibc <= 2.28), fixture tests and demo under qemu-aarch64 cortex-a72"
bash ci/cross.sh
step "doc tests and docs"
RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps -j"$jobs" -q
step "done"
