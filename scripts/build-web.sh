#!/usr/bin/env bash
# Build the browser engine into www/pkg: nomoat-web for wasm32, JS bindings from wasm-bindgen
# (--target web: an ES module the worker imports), then wasm-opt -O2 from npm's binaryen
# (Debian's wasm-opt is too old for the module's features).
#   scripts/build-web.sh            release build
# Serve the page: python3 -m http.server -d www 8000 --bind 127.0.0.1
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --target wasm32-unknown-unknown -p nomoat-web
wasm-bindgen --target web --out-dir www/pkg "${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/release/nomoat_web.wasm"
if [ -x node_modules/.bin/wasm-opt ]; then
  node_modules/.bin/wasm-opt -O2 --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    www/pkg/nomoat_web_bg.wasm -o www/pkg/nomoat_web_bg.wasm.opt
  mv www/pkg/nomoat_web_bg.wasm.opt www/pkg/nomoat_web_bg.wasm
else
  echo "build-web: node_modules/.bin/wasm-opt missing (npm install): leaving the module unoptimised" >&2
fi
# the model catalog the CLI compiles in, for the page's model list
cp runtime/src/catalog.json www/pkg/catalog.json
echo "built www/pkg ($(du -h www/pkg/nomoat_web_bg.wasm | cut -f1) wasm)"
