#!/usr/bin/env bash
# The whole test suite: install what is missing, then every Rust test on lavapipe (the CPU
# Vulkan device), the runtime built for wasm32 as well as natively, then the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# lavapipe is the device tests run on; a real GPU's driver would be picked otherwise
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# formatting and lints first: they take seconds and say what is wrong before the long tests
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
cargo fmt --check
cargo clippy -q --workspace --all-targets -- -D warnings
cargo build -q -p nomoat-runtime --target wasm32-unknown-unknown
# the runtime as crates.io would get it: docs without warnings, and the packaged crate builds on
# its own (its verify build catches a file it needs but does not ship; about 2 minutes). Offline
# first: the dependencies are those the workspace already fetched, except crates.io's minijinja,
# which the workspace patches with vendor/minijinja, so a fresh machine has never fetched it:
# then the index is asked (on a fresh VM the offline attempt failed with "no matching package
# named `minijinja`").
RUSTDOCFLAGS=-Dwarnings cargo doc -q -p nomoat-runtime --no-deps
cargo package -q -p nomoat-runtime --allow-dirty --offline 2>/dev/null || cargo package -q -p nomoat-runtime --allow-dirty
cargo test --workspace 2>&1
# The browser suite: the same runtime as wasm in headless Chromium (WebGPU on SwiftShader),
# driven by playwright-core; its chat test compares with the native release binary's reply.
scripts/build-web.sh
cargo build -q --release -p nomoat
node --test --test-concurrency=1 tests/browser/
