#!/usr/bin/env python3
"""End-to-end model references for nomoat, produced by llama.cpp (through llama-cpp-python) and by
the plain numpy float32 forward pass in tests/reference/f32_forward.py.

How to run (from the repository root; about 10 minutes on 2 cores, 9 of them Gemma):

    pip install llama-cpp-python==0.3.36 gguf numpy     # CPU build; tested with gguf 0.19, numpy 2.4
    scripts/fetch-models.sh                             # the two test models, into $NOMOAT_CACHE/models
    python3 tests/reference/make_model_refs.py          # both models
    python3 tests/reference/make_model_refs.py --model gemma-3-270m-q4_k_m.gguf   # just one

Everything is deterministic (greedy argmax, fixed thread count, no sampling). Rerunning on the same
machine and library versions reproduces the files byte for byte; llama.cpp's CPU kernels depend on
the CPU features (see "llama_cpp_system_info" in the JSON), so another machine can move logits in
the last bits.

What it writes, for each model <stem> (file name without .gguf):

  tests/data/models/<stem>.json                   everything below, described in its "notes"
  tests/data/models/<stem>.<case>.logits.<f32|f16>          llama.cpp, last prompt position
  tests/data/models/<stem>.<case>.f32ref.logits.<f32|f16>   numpy f32 reference, last position
  tests/data/models/ppl.txt     (input, committed, hand-written prose) perplexity text

Logit files are raw little-endian arrays of n_vocab values, no header: float32 for SmolLM2
(49152 x 4 = 196608 bytes), float16 for Gemma 3 (262144 x 2 = 524288 bytes) to keep the
committed total near 10 MB. Top-10 lists and margins in the JSON are computed from the float32
logits before any f16 rounding, and written exactly (shortest repr that round-trips the f32).

Per case (llama.cpp, llama_cpp.Llama(path, n_ctx=512 (1024 for the "long_needle" case),
n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, seed=0, n_threads=2), default f16 KV cache, flash
attention off):
  * prompt_tokens = tokenize(prompt.encode(), add_bos=<tokenizer.ggml.add_bos_token>, special=True)
  * the prompt is evaluated in one batch; the last position's logits are stored (logits_file),
    with top10 (sorted by logit desc, ties by id asc) and top2_margin = top1 - top2 logit.
  * greedy: 32 tokens. Step 0 takes argmax of those batched last-position logits; each chosen
    token is then evaluated alone (batch of 1) and the next step takes argmax of its logits.
    Each entry is {id, margin} where margin = top1 - top2 of the logits the id was chosen from.
    Generation does not stop at EOS (an "eos" flag marks such steps).
  * self_consistency: the same prompt evaluated one token per llama_decode call (fresh KV cache);
    cosine and max |diff| of its last-position logits vs the batched ones. This is llama.cpp
    disagreeing with itself (different matmul kernels for batch vs single row), i.e. the noise
    floor any other implementation should be judged against.

Perplexity (both engines): see the "perplexity" object in the JSON, whose "procedure" field
spells out the llama.cpp perplexity-tool algorithm that is used.
"""

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402

sys.dont_write_bytecode = True  # no __pycache__ next to the committed scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))
from f32_forward import Model, models_dir  # noqa: E402
from llama_refs import cos_maxabs, eval_one_by_one, make_llm, margin, sha256, top_k, write_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "data" / "models"
PPL_TEXT = OUT_DIR / "ppl.txt"

N_GREEDY = 32
PPL_CTX = 128
MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
LOGITS_DTYPE = {"llama": "f32", "gemma3": "f16"}
F32_REF_CASES = ["short_en", "chat", "long_needle"]

PARAGRAPH = (
    "The lighthouse stood at the end of a long stone pier, and for more than a century its keepers "
    "had climbed the same hundred and twelve steps every evening to light the lamp. In winter the "
    "waves broke over the pier so violently that the keeper sometimes had to wait for a lull before "
    "running the last few yards to the door. The logbooks, kept in a cupboard in the watch room, "
    "record storms, shipwrecks, visits by inspectors, and once, in a careful hand, the birth of a "
    "daughter. When the light was finally automated, the last keeper locked the door, put the key in "
    "his pocket, and walked back along the pier without looking"
)

CODE = (
    "def fibonacci(n):\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    if n < 2:\n"
    "        return n\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n - 1):\n"
    "        a, b = b,"
)


def common_prompts():
    """(name, prompt) pairs shared by both models; the chat case is per model."""
    return [
        ("short_en", "The quick brown fox"),
        ("single_token", "Hello"),
        ("paragraph", PARAGRAPH),
        ("code", CODE),
        ("numbers", "1, 1, 2, 3, 5, 8, 13, 21, 34, 55,"),
        ("french", "La tour Eiffel, construite pour l'Exposition universelle de 1889, est aujourd'hui"),
        ("japanese", "東京は日本の首都で、人口は約"),
        ("list", "Things to pack for a weekend hike:\n1. Water bottle\n2. Rain jacket\n3."),
        ("question", "Question: At what temperature does water boil at sea level, in degrees Celsius?\nAnswer:"),
        ("whitespace", "    x  =  [ 1 ,\t2 ]\n\n\n   # odd   spacing  and\ttabs "),
    ]


CHAT = {
    "llama": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
}


def needle_prompt():
    # ~720 tokens: longer than Gemma 3's 512-token sliding window, so the answer must come through
    # the global layers. Evaluated with n_ctx = 1024.
    return ("Remember this: the secret password is PELICAN-42.\n\n" + PPL_TEXT.read_text()
            + "\nQuestion: What is the secret password?\nAnswer: The secret password is")


# ----------------------------------------------------------------------------------------------


def eval_batch(llm, ids):
    """Fresh KV cache, whole prompt in one llama_decode; returns [T, n_vocab] float32."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids, first_logits, eos):
    """llm holds the batched prompt in its KV cache; first_logits = its last-position logits."""
    out = []
    logits = first_logits
    for _ in range(N_GREEDY):
        tok = int(np.argmax(logits))
        out.append({"id": tok, "margin": margin(logits), "eos": tok == eos})
        llm.eval([tok])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return out


def log_softmax_at(logits, tok):
    l64 = logits.astype(np.float64)
    m = l64.max()
    return float(l64[tok] - m - math.log(np.exp(l64 - m).sum()))


def perplexity(tokens, add_bos, bos_id, window_logits):
    """llama.cpp perplexity-tool algorithm; window_logits(ids) -> [c, n_vocab] logits."""
    c = PPL_CTX
    first = c // 2
    n_chunk = len(tokens) // c
    nll, count, per_window = 0.0, 0, []
    nll_alt, count_alt = 0.0, 0
    for i in range(n_chunk):
        win = list(tokens[i * c:(i + 1) * c])
        if add_bos:
            win[0] = bos_id
        logits = window_logits(win)  # [c, n_vocab]
        w_nll = 0.0
        for j in range(first, c - 1):  # logits at j predict original token i*c + j + 1
            w_nll -= log_softmax_at(logits[j], tokens[i * c + j + 1])
        nll += w_nll
        count += c - 1 - first
        per_window.append(math.exp(nll / count))  # running value, as the tool prints "[i]ppl"
        for j in range(first - 1, c - 1):  # variant: 64 targets, positions c/2 .. c-1
            nll_alt -= log_softmax_at(logits[j], tokens[i * c + j + 1])
        count_alt += c - first
    return {"ppl": math.exp(nll / count), "n_windows": n_chunk, "n_scored": count,
            "running_ppl": per_window, "ppl_64_targets_variant": math.exp(nll_alt / count_alt)}


# ----------------------------------------------------------------------------------------------


def run_model(name):
    path = models_dir() / name
    stem = path.stem
    print(f"== {name}", flush=True)
    llm = make_llm(path, 512)
    md = llm.metadata
    arch = md["general.architecture"]
    add_bos = md.get("tokenizer.ggml.add_bos_token", "false") == "true"
    bos_id = int(md["tokenizer.ggml.bos_token_id"])
    eos_id = int(md["tokenizer.ggml.eos_token_id"])
    dtype = LOGITS_DTYPE[arch]
    n_vocab = llm.n_vocab()

    prompts = common_prompts() + [("chat", CHAT[arch]), ("long_needle", needle_prompt())]
    cases, last_logits = [], {}
    llm_long = None
    for cname, prompt in prompts:
        n_ctx = 1024 if cname == "long_needle" else 512
        if n_ctx == 1024 and llm_long is None:
            llm_long = make_llm(path, 1024)
        L = llm_long if n_ctx == 1024 else llm
        ids = L.tokenize(prompt.encode(), add_bos=add_bos, special=True)
        assert len(ids) + N_GREEDY <= n_ctx
        seq_last = eval_one_by_one(L, ids)
        batch = eval_batch(L, ids)
        last = batch[-1]
        g = greedy(L, ids, last, eos_id)
        sc_cos, sc_max = cos_maxabs(seq_last, last)
        last_logits[cname] = (ids, last)
        fname = write_logits(OUT_DIR / f"{stem}.{cname}.logits.{dtype}", last, dtype)
        cases.append({
            "name": cname,
            "prompt": prompt,
            "add_bos": add_bos,
            "parse_special": True,
            "n_ctx": n_ctx,
            "prompt_tokens": [int(t) for t in ids],
            "top10": top_k(last),
            "top2_margin": margin(last),
            "logits_file": fname,
            "logits_dtype": dtype,
            "greedy": g,
            "greedy_text": L.detokenize([s["id"] for s in g]).decode("utf-8", errors="replace"),
            "self_consistency": {"cosine": sc_cos, "max_abs": sc_max,
                                 "argmax_equal": int(np.argmax(seq_last)) == int(np.argmax(last))},
        })
        print(f"  {cname:13s} T={len(ids):4d} top1={int(np.argmax(last)):6d} margin={margin(last):7.3f} "
              f"self-consistency cos={sc_cos:.6f} max_abs={sc_max:.4f}", flush=True)

    # perplexity, llama.cpp
    text = PPL_TEXT.read_text()
    ppl_tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    ppl_cpp = perplexity(ppl_tokens, add_bos, bos_id, lambda w: eval_batch(llm, w))
    print(f"  perplexity llama.cpp: {ppl_cpp['ppl']:.4f} over {ppl_cpp['n_windows']} windows", flush=True)
    del llm, llm_long

    # numpy f32 reference
    m = Model(path)
    agreement = []
    for cname, (ids, ref) in last_logits.items():
        ours = m.forward(ids, last_only=True)[0]
        c, mx = cos_maxabs(ours, ref)
        agreement.append({"case": cname, "cosine": c, "max_abs": mx, "top1_f32": int(np.argmax(ours)),
                          "top1_llamacpp": int(np.argmax(ref)), "llamacpp_margin": margin(ref),
                          "top1_equal": int(np.argmax(ours)) == int(np.argmax(ref))})
        last_logits[cname] = (ids, ref, ours)
        print(f"  f32 vs llama.cpp {cname:13s} cos={c:.6f} max_abs={mx:.4f} top1 "
              f"{int(np.argmax(ours))}/{int(np.argmax(ref))} margin={margin(ref):.3f}", flush=True)
    f32_ref = []
    for cname in F32_REF_CASES:
        ids, ref, ours = last_logits[cname]
        fname = write_logits(OUT_DIR / f"{stem}.{cname}.f32ref.logits.{dtype}", ours, dtype)
        f32_ref.append({"case": cname, "logits_file": fname, "logits_dtype": dtype, "top10": top_k(ours),
                        "top2_margin": margin(ours)})
    swa_check = None
    if arch == "gemma3":
        # How much the sliding window matters for the long case: the same f32 forward with the
        # window removed (every layer global-masked, RoPE bases unchanged).
        ids, ref, ours = last_logits["long_needle"]
        saved, m.sliding_window = m.sliding_window, 10 ** 9
        nowin = m.forward(ids, last_only=True)[0]
        m.sliding_window = saved
        c1, mx1 = cos_maxabs(nowin, ours)
        c2, _ = cos_maxabs(nowin, ref)
        swa_check = {"case": "long_needle", "n_tokens": len(ids),
                     "cosine_f32_nowindow_vs_f32": c1, "max_abs_f32_nowindow_vs_f32": mx1,
                     "cosine_f32_nowindow_vs_llamacpp": c2,
                     "top1_f32_nowindow": int(np.argmax(nowin))}
        print(f"  SWA sensitivity: {swa_check}", flush=True)
    ppl_f32 = perplexity(ppl_tokens, add_bos, bos_id, lambda w: m.forward(w))
    print(f"  perplexity f32 numpy: {ppl_f32['ppl']:.4f}", flush=True)
    del m

    with_margin = [a for a in agreement if a["llamacpp_margin"] > 0.5]
    summary = {
        "min_cosine": min(a["cosine"] for a in agreement),
        "mean_cosine": float(np.mean([a["cosine"] for a in agreement])),
        "top1_agreement_where_margin_gt_0.5": f"{sum(a['top1_equal'] for a in with_margin)}/{len(with_margin)}",
        "top1_agreement_all": f"{sum(a['top1_equal'] for a in agreement)}/{len(agreement)}",
        "llamacpp_self_consistency_min_cosine": min(c["self_consistency"]["cosine"] for c in cases),
    }

    doc = {
        "model_file": name,
        "model_sha256": sha256(path),
        "architecture": arch,
        "n_vocab": n_vocab,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "llama_cpp_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "notes": [
            "Generated by tests/reference/make_model_refs.py (see its docstring); do not edit.",
            "logits files: raw little-endian, n_vocab values, dtype per logits_dtype (f32 = IEEE "
            "binary32, f16 = IEEE binary16 rounded from the f32 logits, round-to-nearest-even).",
            "top10 / top2_margin / greedy margins come from the unrounded f32 logits; logit values are "
            "exact f32 values.",
            "llama.cpp settings: n_threads=2, n_batch=n_ubatch=n_ctx, KV cache f16, flash attention off, "
            "CPU backend; prompts evaluated in a single batch unless said otherwise.",
            "greedy: argmax (lowest id on ties) over the previous step's logits; the chosen token is "
            "then evaluated alone; it does not stop at EOS.",
            "self_consistency: llama.cpp's own batched vs token-by-token last-position logits.",
            "f32_reference: tests/reference/f32_forward.py (float32 numpy over gguf-py dequantized "
            "weights), last position of the listed cases; f32_vs_llamacpp compares it with the "
            "llama.cpp logits of every case.",
        ],
        "cases": cases,
        "f32_reference": f32_ref,
        "f32_vs_llamacpp": {"summary": summary, "per_case": agreement},
        "perplexity": {
            "text_file": "tests/data/models/ppl.txt",
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokenize": {"add_bos": add_bos, "parse_special": False,
                         "n_tokens": len(ppl_tokens)},
            "window": PPL_CTX,
            "procedure": (
                "As llama.cpp's tools/perplexity (perplexity(), -c 128, non-overlapping windows): "
                "tokens = tokenize(whole file, add_bos=<metadata>, parse_special=False); "
                "n_windows = floor(n_tokens / 128), the remainder is dropped; window i holds "
                "tokens[128*i .. 128*i+127]; if the model adds BOS, the window's first token is "
                "replaced by BOS (window 0 already starts with it); each window is evaluated from "
                "an empty KV cache in one batch at positions 0..127; with first = 64, the logits at "
                "positions j = 64..126 score the ORIGINAL token tokens[128*i + j + 1] "
                "(63 predictions per window: positions 65..127); nll = -log_softmax(logits_j)[target] "
                "in float64; ppl = exp(sum nll / (63 * n_windows)). running_ppl[i] = value after "
                "window i (the tool's '[i]' printout). ppl_64_targets_variant also scores position "
                "64 from the logits at 63 (64 targets per window, positions c/2..c-1)."
            ),
            "llama_cpp": ppl_cpp,
            "f32_reference": ppl_f32,
        },
    }
    if swa_check is not None:
        doc["f32_vs_llamacpp"]["sliding_window_sensitivity"] = swa_check
    (OUT_DIR / f"{stem}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"  wrote {stem}.json; f32 vs llama.cpp: {summary}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="model file name (repeatable); default: both")
    args = ap.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.model or MODELS:
        run_model(name)


if __name__ == "__main__":
    main()
