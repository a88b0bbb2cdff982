#!/usr/bin/env bash
# Pack the npm package `nomoat` (the browser API) into target/nomoat-VERSION.tgz and print its
# absolute path. It is www/nomoat.js, www/worker.js and the wasm engine from www/pkg (scripts/build-web.sh
# builds it), with the types, package.json and README from packages/nomoat/, laid out as in www/
# so the module finds its worker and the worker its wasm by relative URL.
#   scripts/pack-npm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f www/pkg/nomoat_web.js ] && [ -f www/pkg/nomoat_web_bg.wasm ] || {
  echo "pack-npm: www/pkg is not built: run scripts/build-web.sh first" >&2
  exit 1
}
# one version for the crates and the package: the workspace's
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
package_version=$(node -p 'require("./packages/nomoat/package.json").version')
[ "$version" = "$package_version" ] || {
  echo "pack-npm: packages/nomoat/package.json has version $package_version, the workspace $version" >&2
  exit 1
}
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
stage="$target/npm/nomoat"
rm -rf "$stage"
mkdir -p "$stage/pkg"
cp packages/nomoat/package.json packages/nomoat/index.d.ts packages/nomoat/README.md www/nomoat.js www/worker.js "$stage/"
cp www/pkg/nomoat_web.js www/pkg/nomoat_web_bg.wasm "$stage/pkg/"
# only the snippets this build imports (pkg/snippets keeps those of older builds)
grep -o "\./snippets/[^'\"]*" www/pkg/nomoat_web.js | sort -u | while read -r snippet; do
  mkdir -p "$stage/pkg/$(dirname "$snippet")"
  cp "www/pkg/$snippet" "$stage/pkg/$snippet"
done
tarball=$(cd "$stage" && npm pack --silent --pack-destination "$target")
echo "$target/$tarball"
