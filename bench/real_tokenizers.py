"""Real tokenizers through carve, offline: llama.cpp's own tokenizer test files, which ship in the
llama-cpp-python source distribution on PyPI (`vendor/llama.cpp/models/ggml-vocab-NAME.gguf`: a
vocabulary-only GGUF converted from a real model's Hugging Face tokenizer; `.gguf.inp`: test texts;
`.gguf.out`: the token ids that Hugging Face tokenizer gives each text, without special tokens).

    .venv/bin/python bench/real_tokenizers.py [--vocabs qwen2 llama-bpe ...]

Per vocabulary, two checks against the Hugging Face ids:
- carve's reading of a GGUF's tokenizer (`carve.models.pretokenize.gguf_tokenizer`, what `carve extract
  model.gguf` tokenizes with: transformers' GGUF tokenizer with what it leaves out restored), and the
  same saved and loaded again (as carve's cache of a GGUF and its outputs hold it): texts the same;
- `carve export` (the CLI) of a tiny random Llama that carries that tokenizer (as many embedding rows as
  the vocabulary has tokens), then llama.cpp itself (bench/llamacpp.py) tokenizing the texts with the
  exported file (its BOS, where the file says to add one, set aside): texts the same, and the
  pre-tokenizer name carve wrote.
A vocabulary transformers cannot read, or carve refuses to export, is a row that says so; except gemma-4
(llama.cpp's own `gemma4` tokenizer model, which neither transformers nor carve reads): its Hugging Face
tokenizer is rebuilt by hand from the file (`gemma4_tokenizer`, checked against the ids as carve's reading
is), and the exported model is a tiny Gemma 4, which carve writes with that tokenizer model.
Results: bench/results/real_tokenizers.jsonl; the table: the `real-tokenizers` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, OUT, commit, load_results, save_result, write_section
from llamacpp import PACKAGES, run_gguf

CARVE = str(Path(sys.executable).with_name("carve"))
RESULTS = HERE / "results" / "real_tokenizers.jsonl"
SDIST = HERE / ".cache" / "llama-cpp-sdist"
# llama.cpp's vocabularies with test texts whose tokenizer is BPE or SentencePiece (carve's export writes
# those; bert-bge's WordPiece is an encoder's)
VOCABS = ("llama-spm", "llama-bpe", "qwen2", "qwen35", "phi-3", "deepseek-llm", "deepseek-coder", "falcon",
          "gpt-2", "mpt", "starcoder", "refact", "command-r", "gemma-4")  # fmt: skip


def vocab_files() -> Path:
    """The models/ directory of the pinned llama-cpp-python sdist (downloaded from PyPI once)."""
    version = next(p for p in PACKAGES if p.startswith("llama-cpp-python")).split("==")[1]
    models = SDIST / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "models"
    if not models.is_dir():
        SDIST.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        str(SDIST), f"llama-cpp-python=={version}"], check=True)  # fmt: skip
        with tarfile.open(SDIST / f"llama_cpp_python-{version}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/models/ggml-vocab-" in m.name]
            tar.extractall(SDIST, members=members, filter="data")
    return models


def cases(models: Path, name: str) -> tuple[list[str], list[list[int]]]:
    """The test texts and the Hugging Face ids of each (llama.cpp's test-tokenizer-0 format)."""
    texts = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    texts = texts[:-1] if texts and texts[-1] == "" else texts
    return texts, [[int(i) for i in line.split()] for line in ids[: len(texts)]]


def gemma4_tokenizer(path: Path) -> Any:
    """Gemma 4's Hugging Face tokenizer rebuilt from its vocabulary GGUF, which transformers cannot read
    (llama.cpp's `gemma4` tokenizer model): transformers' GemmaTokenizer (what it gives Gemma 4) over the
    file's tokens and merges, its control and user-defined tokens special, a BOS before the text.  Not
    carve's reading (carve reads no GGUF of this tokenizer model): checked against the Hugging Face ids
    like it."""
    from gguf import GGUFReader
    from transformers import GemmaTokenizer

    fields = GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [(m[: m.find(" ", 1)], m[m.find(" ", 1) + 1 :]) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, add_bos_token=True)
    named = {tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token, tok.mask_token}
    special = [t for t, k in zip(tokens, types, strict=True) if k in (3, 4) and t not in named]  # control, user
    tok.add_special_tokens({"additional_special_tokens": special})
    return tok


def row(models: Path, name: str) -> dict[str, Any]:
    import transformers as tf

    from carve.models.gguf_header import read_gguf_header
    from carve.models.pretokenize import gguf_tokenizer

    path = models / f"ggml-vocab-{name}.gguf"
    header = read_gguf_header(path)
    texts, want = cases(models, name)
    r: dict[str, Any] = {"id": name, "texts": len(texts), "tokenizer_model": header.get("tokenizer.ggml.model"),
                         "pre": header.get("tokenizer.ggml.pre")}  # fmt: skip
    gemma4 = header.get("tokenizer.ggml.model") == "gemma4"
    try:
        tok = gemma4_tokenizer(path) if gemma4 else gguf_tokenizer(path, header)
    except Exception as e:  # a row that says what failed
        return {**r, "read_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "commit": commit()}
    got = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    r["rebuilt_same" if gemma4 else "carve_read_same"] = sum(a == b for a, b in zip(got, want, strict=True))
    src, gguf = OUT / f"real-tokenizer-{name}", OUT / f"real-tokenizer-{name}.gguf"
    rows = len(header.get("tokenizer.ggml.tokens") or []) or len(tok)
    torch.manual_seed(0)
    if gemma4:  # a tiny Gemma 4 (the export writes llama.cpp's gemma4 tokenizer model for it)
        config = tf.Gemma4TextConfig(vocab_size=rows, vocab_size_per_layer_input=rows, hidden_size=64,
                                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                     hidden_size_per_layer_input=0, max_position_embeddings=512,
                                     layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    else:
        config = tf.LlamaConfig(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tok.save_pretrained(src)  # as carve's cache of a GGUF and its outputs hold it, loaded again
    saved = tf.AutoTokenizer.from_pretrained(src)
    r["saved_same"] = sum(
        saved(t, add_special_tokens=False)["input_ids"] == w for t, w in zip(texts, want, strict=True)
    )
    done = subprocess.run([CARVE, "export", str(src), "--gguf", str(gguf), "--type", "f16", "--overwrite", "--json",
                           "--quiet"], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return {**r, "export_error": (done.stderr.strip().splitlines() or ["?"])[-1][:300], "commit": commit()}
    exported = json.loads(done.stdout[done.stdout.index("{") :])
    written = read_gguf_header(gguf)
    bos = written.get("tokenizer.ggml.bos_token_id") if written.get("tokenizer.ggml.add_bos_token") else None
    cpp = run_gguf(gguf, [[0, 1, 2]], decode_tokens=1, quality=False, texts=texts)["tokenized"]
    cpp = [ids[1:] if bos is not None and ids[:1] == [bos] else ids for ids in cpp]
    r.update(written_pre=written.get("tokenizer.ggml.pre"), written_model=written.get("tokenizer.ggml.model"),
             llamacpp_same=sum(a == b for a, b in zip(cpp, want, strict=True)),
             first_differing=next((t for t, a, b in zip(texts, cpp, want, strict=True) if a != b), None),
             notes=[n for n in exported.get("notes", []) if "pre-tokenizer" in n or "token" in n])  # fmt: skip
    return {**r, "commit": commit()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Real tokenizers: carve's GGUF reading and `carve export` in llama.cpp (bench/real_tokenizers.py)",
        "",
        "llama.cpp's own tokenizer test files from the llama-cpp-python sdist on PyPI (the vocabulary-only GGUF of "
        "each real model's tokenizer, its test texts and the ids the Hugging Face tokenizer gives them, without "
        "special tokens). *carve reads*: carve's tokenizer of that GGUF (transformers' GGUF tokenizer, the split "
        "rule restored), texts tokenized as Hugging Face does; *saved*: the same saved and loaded again (carve's "
        "cache of a GGUF, its outputs; gemma-4, which carve does not read: the Hugging Face tokenizer rebuilt by "
        "hand from the file, GemmaTokenizer over its tokens and merges). *llama.cpp*: `carve export` of a tiny "
        "random Llama (gemma-4: a tiny Gemma 4, written with llama.cpp's gemma4 tokenizer model) "
        "carrying that tokenizer, tokenized by llama.cpp itself (llama-cpp-python 0.3.36; a BOS it adds as the "
        "file says set aside), texts tokenized as Hugging Face does; *pre written*: the pre-tokenizer name the "
        "export wrote (the source vocabulary's in brackets).",
        "",
        "| vocabulary | tokenizer | texts | carve reads | saved | llama.cpp (carve's export) | pre written (source's) "
        "| first text llama.cpp tokenizes otherwise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "read_error" in r or "export_error" in r:
            what = r.get("read_error") or f"export refused: {r['export_error']}"
            read = f"{r['carve_read_same']} / {r['texts']}" if "carve_read_same" in r else "-"
            saved = f"{r['saved_same']} / {r['texts']}" if "saved_same" in r else "-"
            lines.append(f"| {r['id']} | {r['tokenizer_model']} | {r['texts']} | {read} | {saved} | {what} "
                         f"| ({r['pre']}) | - |")  # fmt: skip
            continue
        first = json.dumps(r["first_differing"], ensure_ascii=False)[:60] if r["first_differing"] is not None else "-"
        read = (f"{r['carve_read_same']} / {r['texts']}" if "carve_read_same" in r else
                f"not read (rebuilt by hand: {r['rebuilt_same']} / {r['texts']})")  # fmt: skip
        lines.append(f"| {r['id']} | {r['tokenizer_model']} | {r['texts']} | {read} | "
                     f"{r['saved_same']} / {r['texts']} | {r['llamacpp_same']} / {r['texts']} | {r['written_pre']} "
                     f"({r['pre']}) | {first} |")  # fmt: skip
    lines += [
        "",
        f"Commit {', '.join(sorted({r['commit'] for r in rows}))}; one run each (tokenization is deterministic).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", nargs="+", default=VOCABS, choices=VOCABS, help="rows to (re)run; the others kept")
    args = ap.parse_args()
    models = vocab_files()
    OUT.mkdir(exist_ok=True)
    for name in args.vocabs:
        r = row(models, name)
        save_result(RESULTS, r)
        print(json.dumps(r, ensure_ascii=False), flush=True)
    rows = load_results(RESULTS)
    text = table([rows[k] for k in VOCABS if k in rows])
    write_section("real-tokenizers", text)
    print(text)


if __name__ == "__main__":
    main()
