#!/usr/bin/env bash
# Install everything nomoat needs on a fresh Debian machine and fetch the test models.
# Every step checks first, so re-running takes seconds.
#   scripts/setup.sh            install + fetch
# Environment: NOMOAT_CACHE (default ~/.cache/nomoat) holds models and tools.
set -euo pipefail
cd "$(dirname "$0")/.."
export NOMOAT_CACHE="${NOMOAT_CACHE:-$HOME/.cache/nomoat}"
mkdir -p "$NOMOAT_CACHE"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need_apt+=(mesa-vulkan-drivers)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# native/tests/deploy.rs puts nginx in front of two servers (Debian keeps it in /usr/sbin)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} ..."
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

# wasm-bindgen's CLI must match the library version Cargo.lock pins
if grep -q '^name = "wasm-bindgen"$' Cargo.lock 2>/dev/null; then
  wb=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p' | head -1)
  if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$wb" ]; then
    cargo install -q wasm-bindgen-cli --version "$wb"
  fi
fi

# browser test tooling (playwright-core drives Debian's chromium; binaryen gives wasm-opt)
# (again whenever package-lock.json is newer than the install: a checkout that added a package)
if [ -f package.json ] && { [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; }; then
  npm install --no-audit --no-fund --silent
fi

# the browser engine (www/pkg), once wasm-bindgen and binaryen are in place
if [ -f web/Cargo.toml ] && [ ! -f www/pkg/nomoat_web_bg.wasm ] && command -v wasm-bindgen >/dev/null; then
  scripts/build-web.sh
fi

python3 -c "import gguf, numpy" 2>/dev/null || pip install -q gguf numpy
python3 -c "import openai" 2>/dev/null || pip install -q openai
# automatic differentiation, the reference of tests/tests/train_autograd.rs
python3 -c "import autograd" 2>/dev/null || pip install -q autograd
# structured output and tool tests: jsonschema validates replies, jinja2 renders templates as HF does
python3 -c "import jsonschema, jinja2, pydantic" 2>/dev/null || pip install -q jsonschema jinja2 pydantic
# native/tests/deploy.rs parses docs/deploy.md's Kubernetes manifest
python3 -c "import yaml" 2>/dev/null || pip install -q pyyaml
scripts/fetch-models.sh
