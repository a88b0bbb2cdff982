#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/ (the seed-* files).

    python3 fuzz/gen_seeds.py            # from the repository root; needs `pip install gguf`

Sources: the GGUF files under tests/data and, when present, the test models in
$NOMOAT_CACHE/models (default ~/.cache/nomoat/models; scripts/fetch-models.sh fetches them).

gguf_reader seeds: each file's first bytes (header plus 64 bytes, at most 64 KiB: the real
models' headers are longer, so those seeds stop inside the vocabulary), each file rewritten
small and valid (arrays cut to 16 items, at most 24 tensors of one block each), and a few
made by hand (every value type, nesting, every tensor type, v2).

tokenizer_from_gguf seeds: the tokenizer metadata of each source with its vocabulary cut to
a prefix of the ids (and the merges among them), both as a GGUF file and in the target's
text format (fuzz/src/tokenizer_spec.rs), plus hand-written vocabularies in the text format.
Files are named seed-*, never *.gguf (the repository ignores *.gguf outside tests/data).
"""

import glob
import os
import struct
import sys

from gguf import GGUFReader, GGUFValueType, GGML_QUANT_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
MAX_LEN = 64 * 1024

T = GGUFValueType
SCALAR_FMT = {
    T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I",
    T.INT32: "<i", T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q",
    T.FLOAT64: "<d",
}


# --- a minimal GGUF writer ------------------------------------------------------------------

def enc_str(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_value(ty, v):
    """v for arrays: (elem_type, items)."""
    if ty == T.STRING:
        return enc_str(v)
    if ty == T.ARRAY:
        et, items = v
        return struct.pack("<IQ", int(et), len(items)) + b"".join(enc_value(et, x) for x in items)
    return struct.pack(SCALAR_FMT[ty], v)


def write_gguf(kvs, tensors=(), version=3, alignment=32):
    """kvs: [(key, type, value)]; tensors: [(name, dims, ggml type id, data bytes)]."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
    for k, ty, v in kvs:
        out += enc_str(k) + struct.pack("<I", int(ty)) + enc_value(ty, v)
    offset = 0
    for name, dims, ty, data in tensors:
        out += enc_str(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        offset += -(-len(data) // alignment) * alignment
    out += bytes(-len(out) % alignment)
    for _, _, _, data in tensors:
        out += data + bytes(-len(data) % alignment)
    return bytes(out)


# --- reading --------------------------------------------------------------------------------

def fields(reader):
    """[(key, type, value)] as write_gguf takes them, without the GGUF.* pseudo-fields."""
    kvs = []
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        ty = f.types[0]
        if ty == T.ARRAY:
            et = f.types[1] if len(f.types) > 1 else T.UINT8
            if et == T.ARRAY:
                continue  # no real file nests; the hand-made seeds do
            items = f.contents()
            kvs.append((k, T.ARRAY, (et, items)))
        else:
            kvs.append((k, ty, f.contents()))
    return kvs


def sources():
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "**", "*.gguf"), recursive=True))
    cache = os.environ.get("NOMOAT_CACHE", os.path.expanduser("~/.cache/nomoat"))
    files += sorted(glob.glob(os.path.join(cache, "models", "*.gguf")))
    return files


def short_name(path):
    return os.path.basename(path).replace(".gguf", "").replace(".", "_")


SAVED = set()


def save(target, name, data):
    """Writes fuzz/corpus/<target>/seed-<name>, unless the same bytes were saved already."""
    if (target, data) in SAVED:
        return
    SAVED.add((target, data))
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    assert len(data) <= MAX_LEN, (name, len(data))
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- gguf_reader ----------------------------------------------------------------------------

def shrink(kvs, n=16):
    return [(k, ty, (v[0], v[1][:n]) if ty == T.ARRAY else v) for k, ty, v in kvs]


def mini_tensors(reader, limit=24):
    out = []
    for t in reader.tensors[:limit]:
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        dims = [block] + [1] * (len(t.shape) - 1)
        out.append((t.name, dims, int(t.tensor_type), bytes(size)))
    return out


def reader_seeds():
    for path in sources():
        r = GGUFReader(path)
        name = short_name(path)
        with open(path, "rb") as f:
            save("gguf_reader", "prefix-" + name, f.read(min(r.data_offset + 64, MAX_LEN)))
        kvs = [kv for kv in shrink(fields(r)) if kv[0] != "general.alignment"]
        data = write_gguf(kvs, mini_tensors(r))
        if len(data) <= MAX_LEN:
            save("gguf_reader", "mini-" + name, data)

    save("gguf_reader", "empty", b"")
    save("gguf_reader", "magic", b"GGUF")
    save("gguf_reader", "v3-empty", write_gguf([]))
    save("gguf_reader", "v2-empty", write_gguf([], version=2))
    every_type = [
        ("t.u8", T.UINT8, 200), ("t.i8", T.INT8, -5), ("t.u16", T.UINT16, 60000),
        ("t.i16", T.INT16, -300), ("t.u32", T.UINT32, 4000000000), ("t.i32", T.INT32, -7),
        ("t.f32", T.FLOAT32, 1.5), ("t.bool", T.BOOL, True), ("t.str", T.STRING, "héllo"),
        ("t.u64", T.UINT64, 2**63), ("t.i64", T.INT64, -(2**40)), ("t.f64", T.FLOAT64, -2.25),
        ("t.arr_u8", T.ARRAY, (T.UINT8, [1, 2, 3])),
        ("t.arr_str", T.ARRAY, (T.STRING, ["a", "", "ccc"])),
        ("t.arr_f64", T.ARRAY, (T.FLOAT64, [0.5])),
        ("t.empty", T.ARRAY, (T.INT32, [])),
        ("t.nested", T.ARRAY, (T.ARRAY, [(T.UINT16, [1, 2]), (T.UINT16, [])])),
        ("t.deep", T.ARRAY, (T.ARRAY, [(T.ARRAY, [(T.ARRAY, [(T.BOOL, [False])])])])),
        ("general.architecture", T.STRING, "llama"),
        ("general.alignment", T.UINT32, 64),
    ]
    save("gguf_reader", "every-value-type", write_gguf(every_type, alignment=64))
    tensors = []
    for ty, (block, size) in sorted(GGML_QUANT_SIZES.items(), key=lambda kv: int(kv[0])):
        tensors.append((f"t{int(ty)}", [block * 2, 2], int(ty), bytes(4 * size)))
    save("gguf_reader", "every-tensor-type", write_gguf([("general.architecture", T.STRING, "x")], tensors))
    four_d = [("a", [32, 1, 2, 3], 0, bytes(32 * 6 * 4)), ("b", [8], 1, bytes(16))]
    save("gguf_reader", "4d-tensors", write_gguf([], four_d, version=2))


# --- tokenizer_from_gguf --------------------------------------------------------------------

def escape(s):
    out = []
    for c in s:
        if c == "\\":
            out.append("\\\\")
        elif c == " ":
            out.append("\\s")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append("\\x%02X" % ord(c))
        else:
            out.append(c)
    return "".join(out)


def cut_vocab(kvs, n):
    """The tokenizer keys with the vocabulary cut to ids < n, merges kept where all three
    tokens survive; ids beyond n dropped."""
    d = {k: (ty, v) for k, ty, v in kvs}
    tokens = d["tokenizer.ggml.tokens"][1][1][:n]
    keep = set(tokens)
    out = []
    for k, ty, v in kvs:
        if not k.startswith("tokenizer.ggml."):
            continue
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            v = (v[0], v[1][:n])
        elif k == "tokenizer.ggml.merges":
            merges = []
            for m in v[1]:
                a, _, b = m.partition(" ")
                if a in keep and b in keep and a + b in keep:
                    merges.append(m)
            v = (v[0], merges)
        elif k.endswith("_token_id") and v >= n:
            continue
        out.append((k, ty, v))
    return out


def to_text_format(kvs, texts):
    d = {k: (ty, v) for k, ty, v in kvs}
    lines = []
    tokens = d["tokenizer.ggml.tokens"][1][1]
    scores = d.get("tokenizer.ggml.scores", (None, (None, [])))[1][1]
    types = d.get("tokenizer.ggml.token_type", (None, (None, [])))[1][1]
    for k, ty, v in kvs:
        short = k[len("tokenizer.ggml."):]
        if short in ("tokens", "scores", "token_type", "merges"):
            continue
        name = {T.STRING: "str", T.BOOL: "bool", T.UINT32: "u32", T.INT32: "i32",
                T.FLOAT32: "f32", T.UINT64: "u64"}.get(ty)
        if name is None:
            continue
        value = escape(v) if ty == T.STRING else ("true" if v is True else "false" if v is False else v)
        lines.append(f"{name} {short} {value}")
    if "tokenizer.ggml.scores" not in d:
        lines.append("scores none")
    for i, t in enumerate(tokens):
        s = scores[i] if i < len(scores) else 0.0
        ty = types[i] if i < len(types) else 1
        lines.append(f"tok {escape(t)} {s:g} {ty}")
    for m in d.get("tokenizer.ggml.merges", (None, (None, [])))[1][1]:
        a, _, b = m.partition(" ")
        lines.append(f"merge {escape(a)} {escape(b)}")
    for t in texts:
        lines.append("text " + escape(t))
    return ("\n".join(lines) + "\n").encode("utf-8")


TEXTS = ["Hello, world! 123 4567", "  <start_of_turn>user\nhi<end_of_turn>\n", "naïve 日本 \t x"]


def tokenizer_seeds():
    for path in sources():
        r = GGUFReader(path)
        kvs = fields(r)
        if not any(k == "tokenizer.ggml.tokens" for k, _, _ in kvs):
            continue
        name = short_name(path)
        for n in (300, 700):
            cut = cut_vocab(kvs, n)
            raw = write_gguf(cut)
            text = to_text_format(cut, TEXTS)
            if len(raw) <= MAX_LEN:
                save("tokenizer_from_gguf", f"gguf-{name}-{n}", raw)
            if len(text) <= MAX_LEN:
                save("tokenizer_from_gguf", f"text-{name}-{n}", text)

    hand = {
        "spm-minimal": "model llama\ntok <unk> 0 2\ntok <s> 0 3\ntok </s> 0 3\ntok \u2581 -1\n"
                       "tok a -2\ntok b -3\ntok \u2581a -1.5\ntok ab -1\nbyte_toks\ntext a ab ba\n",
        "spm-no-bytes": "model llama\nbool add_space_prefix false\ntok <unk> 0 2\ntok <s> 0 3\n"
                        "tok </s> 0 3\ntok x\ntok y\ntok xy 1\ntext xyxz\n",
        "spm-add-eos": "model llama\nbool add_eos_token true\nu32 eos_token_id 2\ntok <unk> 0 2\n"
                       "tok <s> 0 3\ntok </s> 0 3\nbyte_toks\ntext hi\nids 1 5 300 2\n",
        "bpe-alphabet": "model gpt2\npre qwen2\ngpt2_alphabet\ntok Ġt\ntok he\ntok Ġthe\n"
                        "tok <|im_start|> 0 3\ntok <|im_end|> 0 3\ntok <|endoftext|> 0 3\n"
                        "auto_merges\ntext the cat\n",
        "bpe-llama3": "model gpt2\npre llama-bpe\ngpt2_alphabet\ntok <|begin_of_text|> 0 3\n"
                      "u32 bos_token_id 256\ntok <|eot_id|> 0 3\ntok in\ntok ing\nauto_merges\n"
                      "text thinking 12345\n",
        "bpe-default-pre": "model gpt2\ngpt2_alphabet\ntok ab\ntok abc\nmerge a b\nmerge ab c\n"
                           "bool add_bos_token true\nu32 bos_token_id 97\ntext abc, abc. 1000000\n",
        "bpe-smollm-user-defined": "model gpt2\npre smollm\ngpt2_alphabet\ntok <tool> 0 4\n"
                                   "tok <|call|> 0 3\ntok <|return|> 0 3\ntok <|end|> 0 3\n"
                                   "text a<tool>b<|end|>\n",
        "bpe-gemma4-markers": "model gpt2\npre gpt-2\ngpt2_alphabet\ntok <|tool_response> 0 3\n"
                              "tok </s> 0 4\ntok <|channel|> 0 3\ntok <unused1> 0 3\ntext x</s>\n",
        "hostile-dup-tokens": "model llama\ntok a\ntok b\ntok a\n",
        "hostile-empty-tokens": "model llama\ntok \ntok \ntok [EMPTY_0]\n",
        "hostile-bad-merges": "model gpt2\npre gpt2\ntok a\ntok b\nmerge a c\nmerge_raw ab\nmerge_raw \\sb\n",
        "hostile-bos-out-of-range": "model llama\nu32 bos_token_id 4000000000\ni64 eos_token_id -1\n"
                                    "tok <unk>\ntok x\n",
        "hostile-types": "model llama\ntypes u8\nscores i32\ntok <unk> 7 200\ntok x 1 -1\ntok y 2 6\n"
                         "trunc types 1\n",
        "hostile-wrong-types": "model llama\narr tokens u32 1 2 3\nnest scores 9 f32 1\nstr add_bos_token yes\n",
        "hostile-flip": "model llama\ntok <unk>\ntok x\nflip 16 255\nflip 40 9\n",
        "hostile-model": "model bert\ntok x\n",
        "hostile-pre": "model gpt2\npre no-such-pre\ngpt2_alphabet\n",
    }
    for name, text in hand.items():
        save("tokenizer_from_gguf", "hand-" + name, text.encode("utf-8"))


def main():
    if "--clean" in sys.argv:
        for f in glob.glob(os.path.join(CORPUS, "*", "seed-*")):
            os.remove(f)
    reader_seeds()
    tokenizer_seeds()


if __name__ == "__main__":
    main()
