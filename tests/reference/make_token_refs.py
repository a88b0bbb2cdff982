#!/usr/bin/env python3
"""Reference tokenizations for nomoat's tokenizer, produced by llama.cpp (through llama-cpp-python).

How to run (from the repository root):

    pip install llama-cpp-python gguf    # tested with llama-cpp-python 0.3.36, gguf 0.19.0
    scripts/fetch-models.sh               # the two test models, into $NOMOAT_CACHE/models
    python3 tests/reference/make_token_refs.py

What it writes (committed; rerunning with the same llama.cpp reproduces it byte for byte):

  tests/data/token_refs.json
      {"generator": {...}, "vocabs": [VOCAB, ...]} where each VOCAB is
        name     a label ("smollm2", "smollm2-pre-qwen2", ...)
        file     the test model its metadata comes from
        patch    metadata keys replaced (or added) before loading: variants of the two real
                 vocabularies that exercise the other pre-tokenizers ("tokenizer.ggml.pre")
                 and SentencePiece's space prefix, which no small test model has. The script
                 writes each variant as a tensor-less GGUF into a temporary folder and loads it
                 with vocab_only=True; the Rust test applies the same patch to the parsed file.
        facts    n_vocab, bos, eos, add_bos, add_eos, eog (every id llama_vocab_is_eog
                 accepts), n_control and control_hash (FNV-1a 64 of the little-endian u32 ids
                 llama_vocab_is_control accepts), pieces_hash (FNV-1a 64 over every id of
                 u32-LE length + bytes of llama_token_to_piece(id, lstrip=0, special=true))
        cases    [{text, add_special, parse_special, ids, detok, detok_skip}] where
                   ids        llama_tokenize(text, add_special, parse_special)
                   detok      llama_detokenize(ids, remove_special=false, unparse_special=true)
                   detok_skip llama_detokenize(ids, remove_special=true, unparse_special=false)
                 detok strings are the bytes decoded as UTF-8 with U+FFFD for invalid
                 sequences; where the bytes are not valid UTF-8, detok_hex / detok_skip_hex
                 hold them exactly.

The texts: a fixed list (TEXTS) covering whitespace, digits, punctuation, contractions, code,
URLs, many scripts, emoji and ZWJ sequences, combining marks, characters that need byte
fallback, and chat special tokens, each with (add_special, parse_special) in COMBOS; plus
FUZZ_PER_VOCAB pseudo-random strings (Python's random, fixed seed) per vocabulary.

Model location: $NOMOAT_CACHE/models (default ~/.cache/nomoat/models), as in tests/src/support.rs.
"""

import ctypes
import json
import os
import random
import struct
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "token_refs.json"

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m-q4_k_m.gguf"

# (name, model file, metadata patch)
VOCABS = [
    ("smollm2", SMOLLM2, {}),
    ("gemma3", GEMMA3, {}),
    # the same byte-level BPE vocabulary under llama.cpp's other pre-tokenizers
    ("smollm2-pre-gpt2", SMOLLM2, {"tokenizer.ggml.pre": "gpt-2"}),
    ("smollm2-pre-llama3", SMOLLM2, {"tokenizer.ggml.pre": "llama-bpe"}),
    ("smollm2-pre-qwen2", SMOLLM2, {"tokenizer.ggml.pre": "qwen2"}),
    ("smollm2-pre-default", SMOLLM2, {"tokenizer.ggml.pre": "default"}),
    # classic SentencePiece behaviour (Llama 1/2, Mistral): a space prefix, and an EOS added
    ("gemma3-space-prefix", GEMMA3, {
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.add_eos_token": True,
    }),
]

# (add_special, parse_special) for every fixed text; only the real models get all three
COMBOS_FULL = [(True, False), (True, True), (False, False)]
COMBOS_VARIANT = [(True, True), (False, False)]
FUZZ_PER_VOCAB = 40
SEED = 0x746F6B  # "tok"

TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   spaces    between     words",
    "   ",
    "tab\tseparated\tvalues\t",
    "\t\tindented with tabs",
    "line one\nline two",
    "paragraph one\n\nparagraph two\n\n\nthree",
    "windows\r\nline endings\r\n",
    "\n",
    "\n\n\n\n",
    " \n \n ",
    "1234567890",
    "pi is 3.14159 and e is 2.71828",
    "Numbers: 1, 22, 333, 4444, 55555, 666666, 1234567",
    "$1,000,000.00 and 50% off",
    "!!! ??? ... --- *** ### ((( ))) [[]] {{}}",
    "Wait... what?! Really?!?",
    # runs where SentencePiece merges tie (equal scores): llama.cpp merges the leftmost first
    "aaaaa bbbbbbb zzzzz eeeeee ooooooo",
    "~~~~~ ♥♥♥ ااا ーーー ababab !!!!!!!!!",
    "don't, I'll, we're, they've, she'd, it's, I'm",
    "DON'T SHOUT, I'LL HEAR YOU'RE HERE",
    "'s 're 've 'll ' '",
    "He said ' hello ' and 'bye'",
    "def f(x):\n    return x**2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "if a != b && c >= d || !e { x <<= 2; }",
    "https://example.com/path/to/page?query=1&b=two#frag",
    "mail me at user.name+tag@example.org",
    "café naïve résumé façade",
    "日本語のテキストです。",
    "中文文本测试，你好世界！",
    "Ελληνικά κείμενο",
    "Русский текст, привет мир",
    "عربى مرحبا بالعالم",
    "हिन्दी पाठ नमस्ते",
    "한국어 텍스트",
    "👍🏽 🇫🇷 👨‍👩‍👧 🎉",
    "a\u200db zero\u200dwidth\u200bspace",
    "e\u0301 vs \u00e9, n\u0303 vs \u00f1",
    "\u00a0nbsp\u2003emspace\u3000ideographic",
    "ﬁ ligature, ＦＵＬＬ width, ①②③, ٣٤٥, x² y³",
    "rare: \U0010FFFD \ue000 \U000130b8 \u2fff \U0001fae8",
    "control: \x01\x02\x7f end",
    "▁already▁escaped ▁",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|><|endoftext|>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>",
    "<s>html</s> <b>bold</b> <table><tr><td>1</td></tr></table>",
    "<unused5> <mask> <pad> <unk> <eos>",
    "almost special: <|im_start| <start_of_turn <|im_end|>>",
    "<|endoftext|><|endoftext|>",
    "text<reponame>repo<file_sep>file",
    "The quick brown fox jumps over the lazy dog. " * 3
    + "Pack my box with five dozen liquor jugs! 0123456789\n"
    + "Über café — “quotes” ‘single’ – dashes… ellipsis © ® ™ € £ ¥",
]

# building blocks for the pseudo-random strings
FUZZ_ATOMS = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    + list("0123456789")
    + [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r"]
    + list("'.,!?;:-_()[]{}<>/\\\"@#$%^&*+=|~`")
    + ["'s", "'t", "'re", "'ll", "'S", "n't"]
    + ["é", "ß", "Ж", "ж", "日", "本", "한", "ñ", "ø", "Ω", "ع", "क", "ि"]
    + ["٣", "①", "²", "Ⅻ", "½"]
    + ["👍", "🏽", "\u200d", "\u0301", "\u00a0", "\u3000", "\u2581", "\ue000", "\U0010FFFD"]
    + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>",
       "<s>", "</s>", "<b>", "<bos>", "<eos>"]
    + ["hello", " world", " the", "ing", " 1234", "3.14", "  \n"]
)


def fnv1a64(chunks):
    h = 0xCBF29CE484222325
    for chunk in chunks:
        for b in chunk:
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def encode_kv(key, value):
    out = struct.pack("<Q", len(key.encode())) + key.encode()
    if isinstance(value, bool):
        out += struct.pack("<I", 7) + struct.pack("<B", int(value))
    elif isinstance(value, str):
        out += struct.pack("<I", 8) + struct.pack("<Q", len(value.encode())) + value.encode()
    else:
        raise TypeError(value)
    return out


def write_patched(src, dst, patch):
    """A copy of src's metadata with `patch` applied, and no tensors (enough for vocab_only)."""
    r = gguf.GGUFReader(src)
    fields = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
    names = {f.name for f in fields}
    added = [k for k in patch if k not in names]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields) + len(added)))
    for f in fields:
        if f.name in patch:
            out += encode_kv(f.name, patch[f.name])
        else:
            out += b"".join(bytes(p) for p in f.parts)
    for k in added:
        out += encode_kv(k, patch[k])
    out += b"\0" * (-len(out) % 32)
    Path(dst).write_bytes(bytes(out))


def tokenize(vocab, text, add_special, parse_special):
    data = text.encode()
    cap = len(data) + 8
    while True:
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        cap = -n


def detokenize(vocab, ids, remove_special, unparse_special):
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 8 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        if n >= 0:
            return buf.raw[:n]
        cap = -n


def piece(vocab, token):
    cap = 64
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, cap, 0, True)
        if n >= 0:
            return buf.raw[:n]
        cap = -n


def facts(vocab):
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    control = [i for i in range(n) if llama_cpp.llama_vocab_is_control(vocab, i)]
    pieces = []
    for i in range(n):
        p = piece(vocab, i)
        pieces.append(struct.pack("<I", len(p)))
        pieces.append(p)

    def opt(t):
        return None if t < 0 else t

    return {
        "n_vocab": n,
        "bos": opt(llama_cpp.llama_vocab_bos(vocab)),
        "eos": opt(llama_cpp.llama_vocab_eos(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "n_control": len(control),
        "control_hash": fnv1a64(struct.pack("<I", i) for i in control),
        "pieces_hash": fnv1a64(pieces),
    }


def case(vocab, text, add_special, parse_special):
    ids = tokenize(vocab, text, add_special, parse_special)
    c = {"text": text, "add_special": add_special, "parse_special": parse_special, "ids": ids}
    for key, remove, unparse in (("detok", False, True), ("detok_skip", True, False)):
        raw = detokenize(vocab, ids, remove, unparse)
        c[key] = raw.decode("utf-8", errors="replace")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            c[key + "_hex"] = raw.hex()
    return c


def fuzz_texts(rng, n):
    out = []
    for _ in range(n):
        k = rng.randint(1, 24)
        out.append("".join(rng.choice(FUZZ_ATOMS) for _ in range(k)))
    return out


def main():
    cache = Path(os.environ.get("NOMOAT_CACHE", Path.home() / ".cache" / "nomoat"))
    models = cache / "models"
    rng = random.Random(SEED)
    vocabs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, file, patch in VOCABS:
            src = models / file
            if not src.exists():
                sys.exit(f"{src} missing: run scripts/fetch-models.sh")
            path = src
            if patch:
                path = Path(tmp) / f"{name}.gguf"
                write_patched(str(src), str(path), patch)
            llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            vocab = llm._model.vocab
            combos = COMBOS_VARIANT if patch else COMBOS_FULL
            cases = [case(vocab, t, a, p) for t in TEXTS for (a, p) in combos]
            for t in fuzz_texts(rng, FUZZ_PER_VOCAB):
                cases.append(case(vocab, t, rng.random() < 0.5, rng.random() < 0.5))
            vocabs.append({"name": name, "file": file, "patch": patch, "facts": facts(vocab), "cases": cases})
            print(f"{name}: {len(cases)} cases", file=sys.stderr)
            del llm

    # one case per line keeps diffs readable
    lines = ["{", f' "generator": {json.dumps({"llama_cpp_python": llama_cpp.__version__, "script": "tests/reference/make_token_refs.py"})},', ' "vocabs": [']
    for vi, v in enumerate(vocabs):
        head = {k: v[k] for k in ("name", "file", "patch", "facts")}
        lines.append("  {")
        for k, val in head.items():
            lines.append(f"   {json.dumps(k)}: {json.dumps(val, ensure_ascii=False)},")
        lines.append('   "cases": [')
        for ci, c in enumerate(v["cases"]):
            comma = "," if ci + 1 < len(v["cases"]) else ""
            lines.append("    " + json.dumps(c, ensure_ascii=False) + comma)
        lines.append("   ]")
        lines.append("  }" + ("," if vi + 1 < len(vocabs) else ""))
    lines.append(" ]")
    lines.append("}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
