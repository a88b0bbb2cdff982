#!/usr/bin/env bash
# Speed on a machine with a GPU and no network (issue #22): GGUF files with the shapes of
# Llama-3.2-1B and Llama-3.1-8B and random weights (`nomoat synth`: speed depends on shapes and
# types, not values) in Q4_0, Q4_K_M and Q8_0, each through `nomoat bench` (pp512, tg128, and
# tg32 at depth 4096; for the first, pp512 at depth 4096 with the tiled attention and with
# NOMOAT_ATTENTION=workgroup), then a table with the share of the GPU's memory bandwidth decode
# reaches.
#
#   bench/gpu.sh --prepare   here: the stripped release binary in .gpubench/ and the Vulkan
#                            loader packages in .gl/ (both git-ignored, ~25 MiB together)
#   bench/gpu.sh             there: everything, one model at a time (written to /tmp, deleted
#                            after); the table on stdout, JSON lines in $OUT/gpu-bench.jsonl
#   NOMOAT_GPU_QUICK=1 bench/gpu.sh   the same path on one small run (checks the script here)
#
# With the device tool: run(command="bash bench/gpu.sh", carry=[".gpubench", ".gl"], timeout_s=540).
# llama.cpp is not run beside it: its Vulkan build cannot travel within the 64 MiB tree.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  cargo build -q --release -p nomoat
  mkdir -p .gpubench
  strip -o .gpubench/nomoat target/release/nomoat
  if [ ! -d .gl ] || [ -z "$(ls .gl/*.deb 2>/dev/null)" ]; then
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    apt-get $o update -q >/dev/null
    (cd .gl && apt-get $o download libvulkan1 >/dev/null)
  fi
  du -sh .gpubench .gl
  exit 0
fi

bin="${NOMOAT_BIN:-.gpubench/nomoat}"
[ -x "$bin" ] || { echo "no $bin: run bench/gpu.sh --prepare first (on the machine with the source)" >&2; exit 1; }
# the loader, where the machine has none (unpacked into /, as the device README says)
if ! ldconfig -p | grep -q libvulkan.so.1 && [ -d .gl ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
echo "GPU: ${gpu:-unknown (no nvidia-smi)}; $(date -u +%F)"
work=$(mktemp -d /tmp/nomoat-gpu.XXXXXX)
results="${OUT:-$work}/gpu-bench.jsonl"
: > "$results"
trap 'rm -rf "$work"' EXIT

if [ -n "${NOMOAT_GPU_QUICK:-}" ]; then
  runs="llama-3.2-1b:q4_0"; pp=16; tg=4; depth=64; dtg=4; reps=1
else
  runs="llama-3.2-1b:q4_0 llama-3.2-1b:q4_k_m llama-3.2-1b:q8_0 llama-3.1-8b:q4_0 llama-3.1-8b:q4_k_m llama-3.1-8b:q8_0"
  pp=512; tg=128; depth=4096; dtg=32; reps=2
fi
for run in $runs; do
  shape=${run%%:*}; ty=${run##*:}
  model="$work/$shape-$ty.gguf"
  "$bin" synth --shape "$shape" --type "$ty" -o "$model" >&2
  # each test: nomoat bench's arguments | environment overrides
  tests=("-p $pp -n $tg -r $reps|" "-p 0 -n $dtg -d $depth -r 1|")
  if [ "$run" = "${runs%% *}" ]; then
    # prefill deep in the cache: the tiled attention (GPUs' default) against one workgroup per (head, query)
    tests+=("-p $pp -n 0 -d $depth -r 1|" "-p $pp -n 0 -d $depth -r 1|NOMOAT_ATTENTION=workgroup")
  fi
  # each line: {"shape", "type", "env", "bench": <nomoat bench --json>}
  for t in "${tests[@]}"; do
    args=${t%%|*}; envs=${t#*|}
    # shellcheck disable=SC2086
    if out=$(env $envs "$bin" bench -m "$model" $args --json 2>"$work/err"); then
      printf '{"shape": "%s", "type": "%s", "env": "%s", "bench": %s}\n' "$shape" "$ty" "$envs" "$out" >> "$results"
    else
      echo "$shape $ty bench $args $envs failed: $(tail -3 "$work/err")" >&2
    fi
  done
  rm -f "$model"
done

python3 - "$results" "$gpu" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gpu = sys.argv[2]
# nominal memory bandwidth, GB/s, by the name nvidia-smi gives
nominal = [("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("A100-SXM4-80GB", 2039),
           ("A100", 1555), ("L40S", 864), ("L4", 300), ("RTX 4090", 1008), ("A10", 600)]
bw = next((v for k, v in nominal if k in gpu), None)
print(f"\n| model | test | tok/s | GB/s of weights | share of {bw or '?'} GB/s | share of the measured f32 matvec |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for r in rows:
    b = r["bench"]
    per_token = b["decode_bytes_per_token"]
    for t in b["tests"]:
        tps = t["tok_s_mean"]
        decode = t["test"].startswith("tg")
        gbs = tps * per_token / 1e9 if decode else None
        share = f"{100 * gbs / bw:.0f}%" if decode and bw else ""
        c, sd = b["decode_ceiling_tok_s"], b.get("decode_ceiling_tok_s_std", 0)
        ceil = f"{100 * tps / (c + sd):.0f} to {100 * tps / max(c - sd, 1e-9):.0f}%" if decode else ""
        gbs_s = f"{gbs:.0f}" if gbs else ""
        test = f"{t['test']} {r['env']}" if r.get("env") else t["test"]
        print(f"| {r['shape']} {r['type']} ({b['size_mib']:.0f} MiB) | {test} | {tps:.1f} ± {t['tok_s_std']:.1f} | {gbs_s} | {share} | {ceil} |")
print(f"\nbackend: {rows[0]['bench']['backend'] if rows else '?'}; f32 matvec measured {rows[0]['bench']['matvec_f32_gbs']:.0f} ± {rows[0]['bench'].get('matvec_f32_gbs_std', 0):.0f} GB/s (6 samples)" if rows else "no results")
PY
