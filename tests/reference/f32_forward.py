#!/usr/bin/env python3
"""A plain numpy float32 forward pass for nomoat's two test-model architectures (llama, gemma3).

Purpose: an independent, readable reference for the GPU graph. It takes the GGUF weights,
dequantizes every tensor to float32 with gguf-py, and runs the transformer in float32 with no
quantized activations and no f16 KV cache (llama.cpp's CPU backend does both of those, so it
is *not* an f32 reference; see "Where llama.cpp differs" below).

Usage (from the repository root):

    python3 tests/reference/f32_forward.py                  # self-check: both models, a few
                                                            # prompts, cosine/top-1 vs llama.cpp
    python3 tests/reference/f32_forward.py --model gemma-3-270m-q4_k_m.gguf --text "Hello"

As a library (tests/reference/make_model_refs.py uses it to write the committed `f32_reference`
logits and the `f32_vs_llamacpp` agreement numbers):

    from f32_forward import Model
    m = Model(path)                  # reads + dequantizes all weights (float32)
    logits = m.forward(token_ids)    # [n_tokens, n_vocab] float32, logits at every position
    last = m.forward(token_ids, last_only=True)   # [1, n_vocab]

Model location: $NOMOAT_CACHE/models (default ~/.cache/nomoat/models).

Conventions (each one mirrors llama.cpp's graph: src/models/llama.cpp and
src/models/gemma3.cpp, hparams from src/llama-model.cpp, masking from src/llama-hparams.h):

  common
    * GGUF tensor dims are [ne0 = in, ne1 = out]; gguf-py dequantizes to a numpy array of shape
      [out, in], so a linear layer is  y[t, o] = sum_i x[t, i] * W[o, i]  (x @ W.T).
    * RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w   (eps = *.attention.layer_norm_rms_epsilon).
    * RoPE angle for pair i (0 <= i < n_rot/2) at position p: p * base^(-2i/n_rot).
    * Causal attention: query at position p attends keys at positions j <= p.
    * GQA: query head h reads kv head h // (n_head / n_head_kv).
    * Tied output: logits = final_norm(x) @ token_embd.T when there is no output.weight.

  llama (SmolLM2)
    * x = token_embd[ids] (no scale).
    * per layer: h = attn_norm(x); q,k,v = h@Wq.T, h@Wk.T, h@Wv.T; RoPE "normal" ordering
      (rotates adjacent pairs (2i, 2i+1); the GGUF converter permuted Wq/Wk for this);
      base = llama.rope.freq_base (1e5); scores = q.k / sqrt(head_dim); softmax; @v; @Wo.T;
      x += attn;  h = ffn_norm(x); x += (silu(h@Wgate.T) * (h@Wup.T)) @ Wdown.T.
    * out = output_norm(x) @ token_embd.T.

  gemma3 (Gemma 3 270M)
    * x = token_embd[ids] * sqrt(n_embd)   (float32 sqrt(640) = 25.298221; llama.cpp does not
      round it to bf16 the way Hugging Face's Gemma3 code does (25.25)).
    * layer il is sliding-window ("local") iff il % 6 < 5, i.e. global iff (il+1) % 6 == 0
      (llama.cpp: hparams.set_swa_pattern(6)); for 18 layers the global ones are 5, 11, 17.
    * local layers: RoPE base 10000 (hparams.rope_freq_base_train_swa, hard-coded), and the
      key at position j is masked for the query at position p iff p - j >= sliding_window
      (512), i.e. visible iff 0 <= p - j < 512 (llama.cpp is_masked_swa, LLAMA_SWA_TYPE_STANDARD).
    * global layers: RoPE base gemma3.rope.freq_base (1e6), plain causal mask.
    * RoPE "NeoX" ordering (rotates pairs (i, i + n_rot/2)), n_rot = head_dim = key_length = 256.
    * per layer:
        h = attn_norm(x)
        q = h@Wq.T -> [T, n_head, 256];  k = h@Wk.T -> [T, n_head_kv, 256];  v likewise
        q = attn_q_norm(q)  (RMSNorm over each 256-wide head, eps = the model eps, one shared
                             [256] weight for all heads)  ;  q = rope(q)
        k = attn_k_norm(k) ;  k = rope(k)            (norm BEFORE rope, v gets no norm)
        q = q * f_attention_scale = 1/sqrt(key_length) = 1/16 (llama.cpp: 1/sqrt(n_embd_head_k)
            for every size but 27B), then softmax(q.k) with no further scale
        a = attention(q, k, v) @ Wo.T
        a = post_attention_norm(a);  x = x + a
        h = ffn_norm(x);  f = (gelu_tanh(h@Wgate.T) * (h@Wup.T)) @ Wdown.T
        f = post_ffw_norm(f);  x = x + f
    * out = output_norm(x) @ token_embd.T; no final logit softcap (Gemma 3 has none).
    * every stored norm weight (attn_norm, attn_q_norm, attn_k_norm, post_attention_norm,
      ffn_norm, post_ffw_norm, output_norm) already includes Gemma's "+1": use it as is.

Where llama.cpp differs (why cosine is ~0.999 and not 1): its CPU backend quantizes the
activation vector to Q8_0/Q8_1/Q8_K before every quantized matmul, stores K and V in an f16
cache (and rounds the other operand to f16 for the attention products), evaluates GELU through
an f16 lookup table, and computes the RoPE angles by repeated float32 multiplication. Measured
on the committed cases: last-position cosine 0.9933..0.99998 (SmolLM2) and 0.9985..0.99993
(Gemma 3), top-1 equal wherever llama.cpp's top-2 margin exceeds 0.5. llama.cpp's own batched vs
token-by-token logits differ by as much (min cosine 0.9960 / 0.9987). The worst case (SmolLM2
"The quick brown fox", 0.9933) is activation rounding: rounding only the matmul inputs to Q8_1
blocks in this code moves it to 0.9990 vs llama.cpp (and 0.9940 vs plain f32). Getting a
convention wrong costs far more (mean cosine over 60-73 positions of 5 prompts, vs 0.9994 /
0.9991 as implemented): SmolLM2 with NeoX ordering 0.836, base 1e4 0.985; Gemma with normal
ordering 0.873, local base 1e6 0.986, scale 1/sqrt(n_embd/n_head) 0.991, global base 1e4 0.9977;
Gemma's 698-token case without the sliding window 0.40.
"""

import argparse
import math
import os
import sys
from pathlib import Path

# Keep BLAS lean: other engineers compile on this 2-core machine.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf.quants import dequantize  # noqa: E402


def models_dir() -> Path:
    cache = os.environ.get("NOMOAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nomoat")
    return Path(cache) / "models"


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


# ----------------------------------------------------------------------------------------------
# building blocks (x: [T, D] float32 unless said otherwise)


def rms_norm(x, w, eps):
    # x: [..., D], w: [D] -> [..., D]
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)  # [..., 1]
    return (x / np.sqrt(ms + eps).astype(np.float32)) * w


def rope(x, pos, base, neox):
    # x: [T, H, n_rot] (n_rot == head_dim here), pos: [T] int -> [T, H, n_rot]
    n_rot = x.shape[-1]
    half = n_rot // 2
    inv_freq = base ** (-2.0 * np.arange(half, dtype=np.float64) / n_rot)  # [half]
    ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, half]
    cos = np.cos(ang).astype(np.float32)[:, None, :]  # [T, 1, half]
    sin = np.sin(ang).astype(np.float32)[:, None, :]  # [T, 1, half]
    if neox:
        x0 = x[..., :half]  # [T, H, half]  element i
        x1 = x[..., half:]  # [T, H, half]  element i + n_rot/2
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    x0 = x[..., 0::2]  # [T, H, half]  element 2i
    x1 = x[..., 1::2]  # [T, H, half]  element 2i+1
    out = np.empty_like(x)  # [T, H, n_rot]
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def attention(q, k, v, scale, window=None):
    # q: [T, Hq, d], k: [T, Hkv, d], v: [T, Hkv, dv] -> [T, Hq * dv]
    T, Hq, _ = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    p = np.arange(T)[:, None]  # [T, 1] query positions
    j = np.arange(T)[None, :]  # [1, T] key positions
    visible = j <= p  # [T, T] causal
    if window is not None:
        visible &= (p - j) < window  # llama.cpp: masked iff p - j >= n_swa
    out = np.empty((T, Hq, v.shape[-1]), dtype=np.float32)  # [T, Hq, dv]
    for h in range(Hq):
        kh = k[:, h // group, :]  # [T, d]
        vh = v[:, h // group, :]  # [T, dv]
        s = (q[:, h, :] @ kh.T) * np.float32(scale)  # [T, T]
        s = np.where(visible, s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        e = np.exp(s)  # [T, T]
        a = e / e.sum(axis=-1, keepdims=True)  # [T, T]
        out[:, h, :] = a @ vh  # [T, dv]
    return out.reshape(T, Hq * v.shape[-1])


def silu(x):
    return x / (np.float32(1) + np.exp(-x))


def gelu_tanh(x):
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * x * (np.float32(1) + np.float32(0.044715) * x * x)))


# ----------------------------------------------------------------------------------------------


class Model:
    def __init__(self, path):
        self.path = Path(path)
        r = gguf.GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch not in ("llama", "qwen2", "gemma3"):
            raise SystemExit(f"unsupported architecture {arch}")
        self.arch = arch
        self.n_layer = int(_field(r, f"{arch}.block_count"))
        self.n_embd = int(_field(r, f"{arch}.embedding_length"))
        self.n_head = int(_field(r, f"{arch}.attention.head_count"))
        self.n_head_kv = int(_field(r, f"{arch}.attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(r, f"{arch}.attention.key_length", self.n_embd // self.n_head))
        self.eps = float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(_field(r, f"{arch}.rope.freq_base", 10000.0))
        self.n_rot = int(_field(r, f"{arch}.rope.dimension_count", self.head_dim))
        assert self.n_rot == self.head_dim, "partial rotary not implemented"
        if arch == "gemma3":
            self.sliding_window = int(_field(r, "gemma3.attention.sliding_window"))
            self.rope_base_swa = 10000.0  # llama.cpp: hparams.rope_freq_base_train_swa
            self.attn_scale = 1.0 / math.sqrt(self.head_dim)  # f_attention_scale (non-27B)
        else:
            self.attn_scale = 1.0 / math.sqrt(self.head_dim)

        self.w = {}  # name -> float32 array, [out, in] for matrices, [D] for norms
        for t in r.tensors:
            a = dequantize(np.asarray(t.data), t.tensor_type)
            self.w[t.name] = np.ascontiguousarray(a, dtype=np.float32)
        self.tok_embd = self.w["token_embd.weight"]  # [n_vocab, n_embd]
        self.output = self.w.get("output.weight", self.tok_embd)  # [n_vocab, n_embd] (tied)
        self.n_vocab = self.tok_embd.shape[0]

    def mm(self, x, name):
        # x: [T, in], W[name]: [out, in] -> [T, out] (+ the bias, where the model has one)
        y = (x @ self.w[name].T).astype(np.float32)
        bias = self.w.get(name.replace(".weight", ".bias"))
        return y if bias is None else y + bias

    def is_swa(self, il):
        return self.arch == "gemma3" and il % 6 < 5

    def forward(self, ids, last_only=False):
        ids = np.asarray(ids, dtype=np.int64)  # [T]
        T = len(ids)
        pos = np.arange(T)  # [T]
        W = self.w
        eps = self.eps
        H, Hkv, d = self.n_head, self.n_head_kv, self.head_dim

        x = self.tok_embd[ids].copy()  # [T, n_embd]
        if self.arch == "gemma3":
            x *= np.float32(math.sqrt(self.n_embd))

        for il in range(self.n_layer):
            p = f"blk.{il}."
            h = rms_norm(x, W[p + "attn_norm.weight"], eps)  # [T, n_embd]
            q = self.mm(h, p + "attn_q.weight").reshape(T, H, d)  # [T, H, d]
            k = self.mm(h, p + "attn_k.weight").reshape(T, Hkv, d)  # [T, Hkv, d]
            v = self.mm(h, p + "attn_v.weight").reshape(T, Hkv, -1)  # [T, Hkv, dv]

            if self.arch in ("llama", "qwen2"):
                neox = self.arch == "qwen2"
                q = rope(q, pos, self.rope_base, neox=neox)  # [T, H, d]
                k = rope(k, pos, self.rope_base, neox=neox)  # [T, Hkv, d]
                a = attention(q, k, v, self.attn_scale)  # [T, H*dv]
                x = x + self.mm(a, p + "attn_output.weight")  # [T, n_embd]
                h = rms_norm(x, W[p + "ffn_norm.weight"], eps)  # [T, n_embd]
                g = silu(self.mm(h, p + "ffn_gate.weight"))  # [T, n_ff]
                u = self.mm(h, p + "ffn_up.weight")  # [T, n_ff]
                x = x + self.mm(g * u, p + "ffn_down.weight")  # [T, n_embd]
            else:
                swa = self.is_swa(il)
                base = self.rope_base_swa if swa else self.rope_base
                q = rms_norm(q, W[p + "attn_q_norm.weight"], eps)  # [T, H, d] per-head norm
                q = rope(q, pos, base, neox=True)  # [T, H, d]
                k = rms_norm(k, W[p + "attn_k_norm.weight"], eps)  # [T, Hkv, d]
                k = rope(k, pos, base, neox=True)  # [T, Hkv, d]
                q = q * np.float32(self.attn_scale)  # [T, H, d]
                a = attention(q, k, v, 1.0, self.sliding_window if swa else None)  # [T, H*dv]
                a = self.mm(a, p + "attn_output.weight")  # [T, n_embd]
                a = rms_norm(a, W[p + "post_attention_norm.weight"], eps)  # [T, n_embd]
                x = x + a  # [T, n_embd]
                h = rms_norm(x, W[p + "ffn_norm.weight"], eps)  # [T, n_embd]
                g = gelu_tanh(self.mm(h, p + "ffn_gate.weight"))  # [T, n_ff]
                u = self.mm(h, p + "ffn_up.weight")  # [T, n_ff]
                f = self.mm(g * u, p + "ffn_down.weight")  # [T, n_embd]
                f = rms_norm(f, W[p + "post_ffw_norm.weight"], eps)  # [T, n_embd]
                x = x + f  # [T, n_embd]

        if last_only:
            x = x[-1:]  # [1, n_embd]
        x = rms_norm(x, W["output_norm.weight"], eps)  # [T', n_embd]
        return self.mm(x, "output.weight" if "output.weight" in W else "token_embd.weight")  # [T', n_vocab]


# ----------------------------------------------------------------------------------------------


def compare(a, b):
    """cosine (f64), max |a-b|, top-1 ids, b's top-2 margin."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))
    s = np.sort(b)
    return cos, float(np.max(np.abs(a64 - b64))), int(np.argmax(a)), int(np.argmax(b)), float(s[-1] - s[-2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="model file name in the models dir (repeatable)")
    ap.add_argument("--text", action="append", help="prompt (repeatable)")
    args = ap.parse_args()
    import llama_cpp

    models = args.model or ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
    texts = args.text or ["The quick brown fox", "def fibonacci(n):\n    if n < 2:\n        return n\n",
                          "La tour Eiffel est située à Paris, et elle"]
    for name in models:
        path = models_dir() / name
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, seed=0, verbose=False,
                              n_threads=2)
        add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
        m = Model(path)
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            llm.reset()
            llm.eval(ids)
            ref = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
            ours = m.forward(ids, last_only=True)[0]
            cos, mx, t_ours, t_ref, margin = compare(ours, ref)
            print(f"{name} {text[:30]!r:34} T={len(ids):3d} cos={cos:.6f} max_abs={mx:.4f} "
                  f"top1 ours={t_ours} llama.cpp={t_ref} margin={margin:.3f}")
        del llm, m


if __name__ == "__main__":
    sys.exit(main())
