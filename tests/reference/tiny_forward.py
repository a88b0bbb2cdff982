#!/usr/bin/env python3
"""numpy float32 forward pass for the tiny test models in tests/data/tiny (all their
architectures), with optional LoRA adapters: an independent cross-check of the llama.cpp
references written by make_tiny_models.py and make_tiny_lora_refs.py.

Supported: llama (incl. a rope_freqs.weight frequency-factor tensor), qwen2, qwen3, phi3,
gemma3 (incl. gemma3.attention.sliding_window_pattern as a uint32 or a bool array) and smollm3.
Each convention mirrors llama.cpp 0.3.36's graph (src/models/<arch>.cpp); see
make_tiny_models.py's docstring for the list with file/line references.

    from tiny_forward import TinyModel
    m = TinyModel(path)                       # dequantizes every tensor to float32 (gguf-py)
    m.forward(ids)                            # [T, n_vocab] float32
    m.forward(ids, loras=[(pairs, s_eff)])    # pairs: {base tensor name: (A (r,n_in), B (n_out,r))}
    m.forward(ids, gelu="f16_table")          # llama.cpp CPU's GELU (f16 lookup table) instead
                                              # of the exact tanh formula in f32

Not a speed-oriented implementation: it is for ~40-token sequences on tiny models.
"""
import math
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf.quants import dequantize  # noqa: E402


def _field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def rms_norm(x, w, eps):
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps).astype(np.float32)) * w


def rope(x, pos, base, neox, freq_factors=None):
    # x: [T, H, d], angle of pair i at position p: p * base^(-2i/d) / freq_factors[i]
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-2.0 * np.arange(half, dtype=np.float64) / d)
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    ang = pos.astype(np.float64)[:, None] * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    if neox:  # pairs (i, i + d/2)
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    x0, x1 = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i+1)
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def attention(q, k, v, scale, window=None):
    T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    p, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = j <= p
    if window is not None:
        visible &= (p - j) < window  # llama.cpp is_masked_swa (STANDARD): masked iff p - j >= n_swa
    out = np.empty((T, Hq, v.shape[-1]), dtype=np.float32)
    for h in range(Hq):
        s = (q[:, h, :] @ k[:, h // group, :].T) * np.float32(scale)
        s = np.where(visible, s, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        out[:, h, :] = (e / e.sum(axis=-1, keepdims=True)) @ v[:, h // group, :]
    return out.reshape(T, -1)


def silu(x):
    return x / (np.float32(1) + np.exp(-x))


def gelu_tanh(x):
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * x * (np.float32(1) + np.float32(0.044715) * x * x)))


def gelu_f16_table(x):
    """ggml-cpu's GELU (vec.h GGML_GELU_FP16): x <= -10 -> 0, x >= 10 -> x, else the f16 table
    entry at fp16(x), which holds fp16(gelu_tanh_f32(fp16(x)))."""
    x16 = x.astype(np.float16).astype(np.float32)
    y = gelu_tanh(x16).astype(np.float16).astype(np.float32)
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, y)).astype(np.float32)


class TinyModel:
    ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma3", "smollm3")

    def __init__(self, path):
        r = gguf.GGUFReader(str(path))
        a = _field(r, "general.architecture")
        assert a in self.ARCHS, a
        self.arch = a
        self.n_layer = int(_field(r, f"{a}.block_count"))
        self.n_embd = int(_field(r, f"{a}.embedding_length"))
        self.n_ff = int(_field(r, f"{a}.feed_forward_length"))
        self.n_head = int(_field(r, f"{a}.attention.head_count"))
        self.n_head_kv = int(_field(r, f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(r, f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(_field(r, f"{a}.rope.freq_base", 10000.0))
        self.neox = a in ("qwen2", "qwen3", "phi3", "gemma3")  # llama-model.cpp llama_model_rope_type
        self.swa = [False] * self.n_layer
        self.window = None
        if a == "gemma3" and int(_field(r, "gemma3.attention.sliding_window", 0)) > 0:
            self.window = int(_field(r, "gemma3.attention.sliding_window"))
            pat = r.fields.get("gemma3.attention.sliding_window_pattern")
            if pat is not None and pat.types[0] == gguf.GGUFValueType.ARRAY:
                self.swa = [bool(v) for v in pat.contents()]  # load_swa_pattern: get_arr first
            else:
                n = int(pat.contents()) if pat is not None else 6
                self.swa = [n == 0 or il % n < n - 1 for il in range(self.n_layer)]  # set_swa_pattern
            self.rope_base_swa = float(_field(r, "gemma3.rope.freq_base_swa", 10000.0))
        self.w = {}
        for t in r.tensors:
            self.w[t.name] = np.ascontiguousarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
        self.out_name = "output.weight" if "output.weight" in self.w else "token_embd.weight"
        self.n_vocab = self.w["token_embd.weight"].shape[0]

    def mm(self, x, name):
        y = (x @ self.w[name].T).astype(np.float32)
        for a, b, s in self._lora.get(name, []):
            y = y + s * ((x @ a.T) @ b.T)
        bias = self.w.get(name[: -len(".weight")] + ".bias")
        return (y if bias is None else y + bias).astype(np.float32)

    def forward(self, ids, loras=(), gelu="exact"):
        """loras: [(pairs {base name: (A, B)}, effective scale)]; returns [T, n_vocab] f32."""
        self._lora = {}
        for pairs, s in loras:
            for name, (a, b) in pairs.items():
                self._lora.setdefault(name, []).append((a.astype(np.float32), b.astype(np.float32), np.float32(s)))
        W, eps, arch = self.w, self.eps, self.arch
        H, Hkv, d = self.n_head, self.n_head_kv, self.head_dim
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        pos = np.arange(T)
        x = W["token_embd.weight"][ids].copy()
        if arch == "gemma3":
            x = x * np.float32(math.sqrt(self.n_embd))
        ff = W.get("rope_freqs.weight")
        act = gelu_tanh if gelu == "exact" else gelu_f16_table
        for il in range(self.n_layer):
            p = f"blk.{il}."
            h = rms_norm(x, W[p + "attn_norm.weight"], eps)
            if arch == "phi3":  # fused: rows [0, q) q, [q, q+kv) k, [q+kv, q+2kv) v
                qkv = self.mm(h, p + "attn_qkv.weight")
                qd, kd = H * d, Hkv * d
                q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
            else:
                q, k, v = (self.mm(h, p + f"attn_{n}.weight") for n in "qkv")
            q, k, v = q.reshape(T, H, d), k.reshape(T, Hkv, d), v.reshape(T, Hkv, -1)
            if arch in ("qwen3", "gemma3"):  # per-head RMSNorm before RoPE
                q = rms_norm(q, W[p + "attn_q_norm.weight"], eps)
                k = rms_norm(k, W[p + "attn_k_norm.weight"], eps)
            base = self.rope_base_swa if self.swa[il] else self.rope_base
            if not (arch == "smollm3" and (il + 1) % 4 == 0):  # smollm3: no RoPE on every 4th layer
                q = rope(q, pos, base, self.neox, ff)
                k = rope(k, pos, base, self.neox, ff)
            a = attention(q, k, v, 1.0 / math.sqrt(d), self.window if self.swa[il] else None)
            a = self.mm(a, p + "attn_output.weight")
            if arch == "gemma3":
                a = rms_norm(a, W[p + "post_attention_norm.weight"], eps)
            x = x + a
            h = rms_norm(x, W[p + "ffn_norm.weight"], eps)
            if arch == "phi3":  # fused ffn_up: first n_ff rows gate (silu), last n_ff rows up
                gu = self.mm(h, p + "ffn_up.weight")
                f = silu(gu[:, : self.n_ff]) * gu[:, self.n_ff:]
            elif arch == "gemma3":
                f = act(self.mm(h, p + "ffn_gate.weight")) * self.mm(h, p + "ffn_up.weight")
            else:
                f = silu(self.mm(h, p + "ffn_gate.weight")) * self.mm(h, p + "ffn_up.weight")
            f = self.mm(f, p + "ffn_down.weight")
            if arch == "gemma3":
                f = rms_norm(f, W[p + "post_ffw_norm.weight"], eps)
            x = x + f
        x = rms_norm(x, W["output_norm.weight"], eps)
        return self.mm(x, self.out_name)
