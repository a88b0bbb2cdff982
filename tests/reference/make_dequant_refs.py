#!/usr/bin/env python3
"""Reference data for nomoat's dequantization, produced by the PyPI `gguf` package (gguf-py).

How to run (from the repository root):

    pip install gguf numpy          # tested with gguf 0.19.0, numpy 2.4
    scripts/fetch-models.sh         # the two test models, into $NOMOAT_CACHE/models
    python3 tests/reference/make_dequant_refs.py

What it writes (both files are committed; rerunning must reproduce them byte for byte):

  tests/data/dequant_random.json
      For each of the 11 types the kernels implement, 5 blocks of pseudo-random bytes (numpy
      PCG64, fixed seed) and gguf-py's dequantization of them. The quant payload is random;
      the f16 scale fields of blocks 0..3 are set to sane values (d uniform in [-0.1, 0.1] for
      the symmetric types Q8_0/Q4_0/Q5_0, d/dmin in [0.001, 0.1] and m in [-0.1, 0.1] for the
      others), while block 4 gets arbitrary finite f16 bit patterns there (subnormals, large
      values). For F32/F16/BF16 a "block" is 256 elements of random finite bit patterns.

  tests/data/dequant_real.json
      For each test model and each tensor type present in it, one chosen tensor (listed in
      CHOSEN below): its file offset (absolute), row size, three dequantized rows (first,
      middle, last) and a matrix-vector product y_r = dot(row_r, x) with
      x_k = sin(0.37*k + 0.11) * 0.5, computed in float64, over all rows (or, for a tensor
      with more than MAX_Y_ROWS rows, the first MAX_Y_ROWS: see "y_rows").

Number format: every dequantized value is an f32; it is written as the shortest decimal that
round-trips the same value as an f64 (Python's repr of float(np.float32(v))), so reading it as
f64 and casting to f32 gives the exact f32 back: values are exact, not rounded. y values are
f64, also written exactly.

Model location: $NOMOAT_CACHE/models (default ~/.cache/nomoat/models), as in tests/src/support.rs.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

SEED = 0x6E6F6D6F  # "nomo"
BLOCKS_PER_TYPE = 5
PLAIN_ELEMS = 256  # elements per "block" of F32/F16/BF16
MAX_Y_ROWS = 4096

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "data"

# The kernel types, in KERNEL_TYPES order (runtime/src/ggml_type.rs).
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]

# f16 fields of each block type: (byte offset, kind). kind "sym": scale of a symmetric type,
# "pos": a positive scale, "min": an additive offset.
F16_FIELDS = {
    T.Q8_0: [(0, "sym")],
    T.Q4_0: [(0, "sym")],
    T.Q5_0: [(0, "sym")],
    T.Q4_1: [(0, "pos"), (2, "min")],
    T.Q5_1: [(0, "pos"), (2, "min")],
    T.Q4_K: [(0, "pos"), (2, "pos")],
    T.Q5_K: [(0, "pos"), (2, "pos")],
    T.Q6_K: [(208, "pos")],  # Q6_K stores d at the end of the block
}

MODELS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": {
        "F32": "blk.0.attn_norm.weight",  # 1-D: one row
        "Q8_0": "token_embd.weight",  # the only Q8_0 tensor: 49152 rows, y for the first 4096
        "Q4_1": "blk.0.attn_k.weight",  # 576 x 192
    },
    "gemma-3-270m-q4_k_m.gguf": {
        "F32": "blk.0.attn_norm.weight",  # 1-D: one row
        "Q8_0": "blk.0.attn_v.weight",  # 640 x 256 (token_embd is Q8_0 too, but 262144 rows)
        "Q5_0": "blk.0.attn_k.weight",  # 640 x 256
        "Q4_K": "blk.0.attn_output.weight",  # 1024 x 640
        "Q6_K": "blk.0.ffn_down.weight",  # 2048 x 640
    },
}


def exact_floats(a: np.ndarray) -> list[float]:
    """f32 (or f64) values as Python floats; json writes each as its shortest f64 repr."""
    return [float(v) for v in np.asarray(a).astype(np.float64).ravel()]


def random_finite_bits(rng: np.random.Generator, n: int, bits: int, exp_mask: int) -> np.ndarray:
    """n random bit patterns of an IEEE float whose exponent field is `exp_mask`; NaN/inf
    (exponent all ones) are redrawn."""
    dtype = np.uint16 if bits == 16 else np.uint32
    out = rng.integers(0, 1 << bits, size=n, dtype=np.uint64).astype(dtype)
    while True:
        bad = (out & dtype(exp_mask)) == dtype(exp_mask)
        if not bad.any():
            return out
        out[bad] = rng.integers(0, 1 << bits, size=int(bad.sum()), dtype=np.uint64).astype(dtype)


def random_block(rng: np.random.Generator, qtype: T, index: int) -> bytes:
    if qtype == T.F32:
        return random_finite_bits(rng, PLAIN_ELEMS, 32, 0x7F80_0000).tobytes()
    if qtype == T.F16:
        return random_finite_bits(rng, PLAIN_ELEMS, 16, 0x7C00).tobytes()
    if qtype == T.BF16:
        return random_finite_bits(rng, PLAIN_ELEMS, 16, 0x7F80).tobytes()
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    block = bytearray(rng.integers(0, 256, size=type_size, dtype=np.uint8).tobytes())
    for offset, kind in F16_FIELDS[qtype]:
        if index == BLOCKS_PER_TYPE - 1:
            h = random_finite_bits(rng, 1, 16, 0x7C00)[0]
        elif kind == "pos":
            h = np.float16(rng.uniform(0.001, 0.1)).view(np.uint16)
        else:
            h = np.float16(rng.uniform(-0.1, 0.1)).view(np.uint16)
        block[offset:offset + 2] = int(h).to_bytes(2, "little")
    return bytes(block)


def make_random() -> dict:
    rng = np.random.default_rng(SEED)
    types = []
    for qtype in TYPES:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = []
        for i in range(BLOCKS_PER_TYPE):
            raw = random_block(rng, qtype, i)
            values = dequantize(np.frombuffer(raw, dtype=np.uint8), qtype)
            assert values.dtype == np.float32 and np.isfinite(values).all()
            blocks.append({"hex": raw.hex(), "n_elements": int(values.size), "values": exact_floats(values)})
        types.append({"type": qtype.name, "block_elems": block_elems, "block_bytes": block_bytes, "blocks": blocks})
    return {
        "generator": "tests/reference/make_dequant_refs.py",
        "gguf_version": gguf_version(),
        "numpy_version": np.__version__,
        "seed": SEED,
        "note": "values: gguf.quants.dequantize of the block bytes, exact f32 values written as f64; "
                "block 4 of each quant type has arbitrary finite f16 scale fields",
        "types": types,
    }


def x_vector(n: int) -> np.ndarray:
    k = np.arange(n, dtype=np.float64)
    return np.sin(0.37 * k + 0.11) * 0.5


def make_real(models_dir: Path) -> dict:
    tensors = []
    for model_file, chosen in MODELS.items():
        path = models_dir / model_file
        if not path.exists():
            sys.exit(f"missing test model {path}: run scripts/fetch-models.sh")
        reader = gguf.GGUFReader(path)
        present = {t.tensor_type.name for t in reader.tensors}
        assert present == set(chosen), f"{model_file}: types {sorted(present)} != chosen {sorted(chosen)}"
        by_name = {t.name: t for t in reader.tensors}
        with open(path, "rb") as f:
            for type_name, tensor_name in chosen.items():
                t = by_name[tensor_name]
                assert t.tensor_type.name == type_name, (tensor_name, t.tensor_type.name)
                qtype = t.tensor_type
                dims = [int(d) for d in t.shape]  # ggml order: ne0 (row length) first
                ne0 = dims[0]
                n_rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
                block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
                row_bytes = ne0 // block_elems * block_bytes
                offset = int(t.data_offset)
                # data_offset is absolute in gguf-py (reader.data_offset, the start of the data
                # section, plus the tensor's own offset): check that it lies in the aligned data
                # section and that the bytes there are what the reader itself maps as the tensor.
                assert offset >= reader.data_offset and (offset - reader.data_offset) % reader.alignment == 0
                assert t.n_bytes == row_bytes * n_rows
                f.seek(offset)
                head = f.read(row_bytes)
                assert head == np.asarray(t.data).view(np.uint8).ravel()[:row_bytes].tobytes(), "offset is not absolute"

                def read_rows(first: int, count: int) -> np.ndarray:
                    f.seek(offset + first * row_bytes)
                    raw = np.frombuffer(f.read(count * row_bytes), dtype=np.uint8).reshape(count, row_bytes)
                    vals = dequantize(raw, qtype).reshape(count, ne0)
                    assert vals.dtype == np.float32
                    return vals

                row_indices = sorted({0, n_rows // 2, n_rows - 1})
                rows = [{"index": r, "values": exact_floats(read_rows(r, 1))} for r in row_indices]

                y_rows = min(n_rows, MAX_Y_ROWS)
                x = x_vector(ne0)
                y = []
                for start in range(0, y_rows, 1024):
                    count = min(1024, y_rows - start)
                    y.extend(float(v) for v in read_rows(start, count).astype(np.float64) @ x)

                entry = {
                    "model": model_file,
                    "tensor": tensor_name,
                    "type": type_name,
                    "dims": dims,
                    "ne0": ne0,
                    "n_rows": n_rows,
                    "data_offset": offset,
                    "row_bytes": row_bytes,
                    "rows": rows,
                    "y_rows": y_rows,
                    "y": y,
                }
                if y_rows < n_rows:
                    entry["y_note"] = f"y covers only the first {y_rows} of {n_rows} rows, to keep the file small"
                tensors.append(entry)
    return {
        "generator": "tests/reference/make_dequant_refs.py",
        "gguf_version": gguf_version(),
        "numpy_version": np.__version__,
        "note": "rows: gguf.quants.dequantize of the raw row bytes at data_offset + index * row_bytes "
                "(data_offset is absolute in the file), exact f32 values written as f64. "
                "y[r] = sum_k row_r[k] * x[k] in float64 for r < y_rows.",
        "x_definition": "x[k] = sin(0.37 * k + 0.11) * 0.5 in float64, k = 0..ne0",
        "tensors": tensors,
    }


def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "unknown"


def write_json(path: Path, doc: dict, list_key: str) -> None:
    """One list entry per line: small diffs, still plain JSON."""
    head = {k: v for k, v in doc.items() if k != list_key}
    text = json.dumps(head, separators=(",", ":"))[:-1]
    items = ",\n".join(json.dumps(item, separators=(",", ":")) for item in doc[list_key])
    text += f',"{list_key}":[\n{items}\n]}}\n'
    json.loads(text)  # still valid JSON
    path.write_text(text)
    print(f"wrote {path.relative_to(REPO)} ({len(text)} bytes)")


def main() -> None:
    cache = Path(os.environ["NOMOAT_CACHE"]) if os.environ.get("NOMOAT_CACHE") else Path.home() / ".cache" / "nomoat"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_json(OUT_DIR / "dequant_random.json", make_random(), "types")
    write_json(OUT_DIR / "dequant_real.json", make_real(cache / "models"), "tensors")


if __name__ == "__main__":
    main()
