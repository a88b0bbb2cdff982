#!/usr/bin/env bash
# Copy the page's runtime libraries from node_modules into www/vendor/ (checked in, so the page
# needs no other site and no npm at run time): marked (Markdown) and DOMPurify (the sanitiser
# every rendered reply goes through). Run after `npm install` when package.json moves them on.
set -euo pipefail
cd "$(dirname "$0")/.."
out=www/vendor
mkdir -p "$out"
version() { node -p "require('./node_modules/$1/package.json').version"; }
# the source maps are not copied: drop the comment that would fetch them
sed '/^\/\/# sourceMappingURL=/d' node_modules/marked/lib/marked.esm.js > "$out/marked.esm.js"
sed '/^\/\/# sourceMappingURL=/d' node_modules/dompurify/dist/purify.es.mjs > "$out/purify.es.mjs"
cp node_modules/marked/LICENSE "$out/LICENSE.marked"
cp node_modules/dompurify/LICENSE "$out/LICENSE.dompurify"
printf 'marked %s (MIT)\ndompurify %s (MPL-2.0 OR Apache-2.0)\n' "$(version marked)" "$(version dompurify)" > "$out/VERSIONS"
echo "vendored into $out:"; cat "$out/VERSIONS"
