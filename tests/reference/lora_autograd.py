#!/usr/bin/env python3
"""LoRA factor gradients by automatic differentiation (PyPI `autograd`, float64), the reference
tests/tests/train_autograd.rs holds the GPU trainer to.

The forward pass is tiny_forward.py's (llama.cpp's graph conventions for every architecture it
lists), rewritten without in-place writes so autograd can trace it; the base weights are
constants (dequantized by gguf-py), the adapter's A and B the variables. The loss is the one
nomoat trains on: sum over positions t of weight[t + 1] * -log softmax(logits[t])[ids[t + 1]].

    lora_autograd.py MODEL.gguf ADAPTER.gguf CASE.json OUT.gguf
CASE.json: {"ids": [...], "weights": [...]} (weights per position, as the trainer's).
OUT.gguf: per adapted tensor <base>.grad_a [rank][k] and <base>.grad_b [n_out][rank], f32, and
the loss as the metadata key "loss".
"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import autograd.numpy as anp  # noqa: E402
import gguf  # noqa: E402
import numpy as np  # noqa: E402
from autograd import value_and_grad  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from tiny_forward import TinyModel  # noqa: E402  (configuration and weights)


def rms_norm(x, w, eps):
    return x / anp.sqrt(anp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, base, neox, freq_factors=None):
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-2.0 * np.arange(half) / d)
    if freq_factors is not None:
        inv = inv / freq_factors
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        x0, x1 = x[..., :half], x[..., half:]
        return anp.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    # interleave (2i, 2i+1) back without writing in place
    return anp.reshape(anp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1), x.shape)


def attention(q, k, v, scale, window=None):
    T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    p, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = j <= p
    if window is not None:
        visible &= (p - j) < window
    heads = []
    for h in range(Hq):
        s = anp.dot(q[:, h, :], k[:, h // group, :].T) * scale
        s = anp.where(visible, s, -1e30)
        e = anp.exp(s - anp.max(s, axis=-1, keepdims=True))
        heads.append(anp.dot(e / anp.sum(e, axis=-1, keepdims=True), v[:, h // group, :]))
    return anp.concatenate(heads, axis=-1)


def silu(x):
    return x / (1.0 + anp.exp(-x))


def gelu_tanh(x):
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + anp.tanh(c * x * (1.0 + 0.044715 * x * x)))


def loss_fn(m, W, names, scale, ids, weights):
    def mm(x, name, factors):
        y = anp.dot(x, W[name].T)
        if name in names:
            a, b = factors[names.index(name)]
            y = y + scale * anp.dot(anp.dot(x, a.T), b.T)
        bias = W.get(name[: -len(".weight")] + ".bias")
        return y if bias is None else y + bias

    def loss(factors):
        arch, eps = m.arch, m.eps
        H, Hkv, d = m.n_head, m.n_head_kv, m.head_dim
        T = len(ids) - 1
        pos = np.arange(T, dtype=np.float64)
        x = W["token_embd.weight"][ids[:T]]
        if arch == "gemma3":
            x = x * math.sqrt(m.n_embd)
        ff = W.get("rope_freqs.weight")
        for il in range(m.n_layer):
            p = f"blk.{il}."
            h = rms_norm(x, W[p + "attn_norm.weight"], eps)
            q, k, v = (mm(h, p + f"attn_{n}.weight", factors) for n in "qkv")
            q, k, v = anp.reshape(q, (T, H, d)), anp.reshape(k, (T, Hkv, d)), anp.reshape(v, (T, Hkv, -1))
            if arch in ("qwen3", "gemma3"):
                q = rms_norm(q, W[p + "attn_q_norm.weight"], eps)
                k = rms_norm(k, W[p + "attn_k_norm.weight"], eps)
            base = m.rope_base_swa if m.swa[il] else m.rope_base
            if not (arch == "smollm3" and (il + 1) % 4 == 0):
                q = rope(q, pos, base, m.neox, ff)
                k = rope(k, pos, base, m.neox, ff)
            a = mm(attention(q, k, v, 1.0 / math.sqrt(d), m.window if m.swa[il] else None), p + "attn_output.weight", factors)
            if arch == "gemma3":
                a = rms_norm(a, W[p + "post_attention_norm.weight"], eps)
            x = x + a
            h = rms_norm(x, W[p + "ffn_norm.weight"], eps)
            act = gelu_tanh if arch == "gemma3" else silu
            f = mm(act(mm(h, p + "ffn_gate.weight", factors)) * mm(h, p + "ffn_up.weight", factors), p + "ffn_down.weight", factors)
            if arch == "gemma3":
                f = rms_norm(f, W[p + "post_ffw_norm.weight"], eps)
            x = x + f
        logits = mm(rms_norm(x, W["output_norm.weight"], eps), m.out_name, factors)
        top = anp.max(logits, axis=-1, keepdims=True)
        logp = logits - top - anp.log(anp.sum(anp.exp(logits - top), axis=-1, keepdims=True))
        picked = logp[np.arange(T), ids[1:]]
        return -anp.sum(weights[1:] * picked)

    return loss


def main():
    model_path, adapter_path, case_path, out_path = sys.argv[1:5]
    m = TinyModel(model_path)
    assert m.arch != "phi3", "fused projections: not trained"
    W = {k: v.astype(np.float64) for k, v in m.w.items()}
    r = gguf.GGUFReader(adapter_path)
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float64) for t in r.tensors}
    names = sorted({n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a")})
    factors = [(tensors[n + ".lora_a"], tensors[n + ".lora_b"]) for n in names]
    rank = factors[0][0].shape[0]
    case = json.loads(Path(case_path).read_text())
    ids = np.asarray(case["ids"], dtype=np.int64)
    weights = np.asarray(case["weights"], dtype=np.float64)
    value, grads = value_and_grad(loss_fn(m, W, names, alpha / rank, ids, weights))(factors)
    w = gguf.GGUFWriter(out_path, "lora-gradients")
    w.add_float64("loss", float(value))
    for n, (ga, gb) in zip(names, grads):
        w.add_tensor(n + ".grad_a", np.ascontiguousarray(ga, dtype=np.float32))
        w.add_tensor(n + ".grad_b", np.ascontiguousarray(gb, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
