#!/usr/bin/env bash
# Fuzz the GGUF parser, the tokenizer and chat templates with libFuzzer (cargo-fuzz, nightly Rust).
#   scripts/fuzz.sh                        every target, 600 s each, one after the other
#   scripts/fuzz.sh gguf_reader 60         one target (gguf_reader, tokenizer_from_gguf, chat_template) for 60 s
#   FUZZ_ARGS='-runs=0' scripts/fuzz.sh    extra libFuzzer flags (here: just replay the corpus)
# One process, one job. Inputs are at most 64 KiB; -malloc_limit_mb=512 fails any single
# allocation of more than 512 MiB (8192 times the largest input), -rss_limit_mb=2048 the
# process, and -timeout=10 any input taking more than 10 s, so blow-ups and hangs count as
# crashes. Builds go to $NOMOAT_CACHE/fuzz-target (default ~/.cache/nomoat), the growing
# corpus to $NOMOAT_CACHE/fuzz-corpus/<target>; the committed seeds in fuzz/corpus/<target>
# are read, never written. A crash stops the run and leaves its input in
# fuzz/artifacts/<target>/: fix it, then add the input to tests/data/fuzz_regressions/.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(gguf_reader tokenizer_from_gguf chat_template)
target=${1:-all}
seconds=${2:-600}
if [ "$target" = all ]; then
  targets=("${all[@]}")
else
  case " ${all[*]} " in
    *" $target "*) targets=("$target") ;;
    *) echo "fuzz.sh: unknown target '$target' (known: ${all[*]})" >&2; exit 2 ;;
  esac
fi

cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
# Its own target dir: sanitizer flags would otherwise rebuild the main build's dependencies.
export CARGO_TARGET_DIR=$cache/fuzz-target
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz
fi

for t in "${targets[@]}"; do
  corpus=$cache/fuzz-corpus/$t
  mkdir -p "$corpus"
  echo "fuzz.sh: $t for ${seconds}s (corpus $corpus + fuzz/corpus/$t)" >&2
  # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
  cargo +nightly fuzz run "$t" "$corpus" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -max_len=65536 \
    -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -dict="fuzz/$t.dict" -print_final_stats=1 ${FUZZ_ARGS:-}
done
