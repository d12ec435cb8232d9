"""llama.cpp's pre-tokenizers (the rule text is split by before BPE, named in a GGUF's
`tokenizer.ggml.pre`) and Hugging Face's: the name of a tokenizer.json's rule for `carve export`;
and carve's reading of a GGUF's tokenizer (`gguf_tokenizer`: what transformers' GGUF loader leaves
out restored, special tokens at their ids, a class that keeps the rule), whose bytes key carve's
cache of de-quantized GGUFs (a change here reads every GGUF anew)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the split rule of a byte-level BPE tokenizer.json (its Split pre-tokenizer's regex, as Hugging Face
# writes it) -> llama.cpp's name for the pre-tokenizer that splits text the same way (llama-vocab.cpp)
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",  # Qwen2, Qwen2.5, Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen35",  # Qwen3.5: Qwen2's with combining marks kept in words
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",  # o200k: Phi-4-mini
}

# several Split regexes applied in turn (each splitting what the one before left), then the byte-level
# map -> llama.cpp's name for the pre-tokenizer that applies the same ones in the same order
SEQUENCES: dict[tuple[str, ...], str] = {
    (
        r"\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        # carriage return and line feed as characters, as the tokenizer.json's JSON escapes decode
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ): "deepseek-v3",  # DeepSeek V3 and R1 (digits, then CJK runs, then words and punctuation)
}


def name_of(data: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json (`data`), read off its
    split rule: a known Split regex, a known sequence of them (DeepSeek V3's), SmolLM's single digits
    before GPT-2's rule, or GPT-2's rule alone; None for a rule carve does not know."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    splits = [str((step.get("pattern") or {}).get("Regex")) for step in steps if step.get("type") == "Split"]
    isolated = all(str(step.get("behavior", "Isolated")).lower() == "isolated" for step in steps[:-1])
    if len(splits) == 1 and splits[0] in SPLITS and kinds[-1] == "ByteLevel" and len(kinds) == 2:
        return SPLITS[splits[0]]
    if kinds == ["Split"] * len(splits) + ["ByteLevel"] and isolated and tuple(splits) in SEQUENCES:
        return SEQUENCES[tuple(splits)]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


# llama.cpp's pre-tokenizers that split single digits off before GPT-2's rule (llama-vocab.cpp), as a
# tokenizer.json's Digits(individual_digits) then ByteLevel do
_SINGLE_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva", "mellum2")


def restore(tokenizer: Any, header: dict[str, Any]) -> None:
    """Give a tokenizer transformers built from a GGUF (its `header`) what transformers leaves out, so
    that it tokenizes as the model's own tokenizer (measured on llama.cpp's real vocabularies:
    bench/real_tokenizers.py):
    - `smollm` (the embedded default's) and the others llama.cpp splits the same way (`_SINGLE_DIGITS`:
      StarCoder, Command R, EXAONE, ...): single digits before GPT-2's rule (transformers restores the
      regex rules of Llama 3, Qwen2 and o200k itself);
    - `llama-bpe` (Llama 3): a word the vocabulary holds whole is that one token, merges or not
      (`ignore_merges`, as Llama 3's tokenizer.json and llama.cpp do; "Việt" was 3 tokens, not 1);
    - a SentencePiece vocabulary (`tokenizer.ggml.model` llama: Llama 2, Mistral 7B v0.1) with the dummy
      prefix (`add_space_prefix`, true unless said): "▁" before every text, even one that starts with a
      space, as SentencePiece and llama.cpp do (transformers' Metaspace leaves it off such text: " " was
      "▁", not "▁▁")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    from tokenizers import normalizers, pre_tokenizers

    name = header.get("tokenizer.ggml.pre")
    if name in _SINGLE_DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        )  # fmt: skip
    elif name == "llama-bpe" and hasattr(backend.model, "ignore_merges"):
        backend.model.ignore_merges = True
    spm = header.get("tokenizer.ggml.model") == "llama" and header.get("tokenizer.ggml.add_space_prefix", True)
    if spm and isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace) and backend.normalizer is None:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = pre_tokenizers.Sequence([])


def gguf_tokenizer(path: Path, header: dict[str, Any]) -> Any:
    """A GGUF file's tokenizer as the model was trained: transformers' GGUF tokenizer with what
    transformers leaves out restored (`restore`: SmolLM's digits, Llama 3's whole words,
    SentencePiece's dummy prefix)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    restore(tok, header)
    return _kept_as_read(_specials_at_their_ids(tok, header))


def _specials_at_their_ids(tok: Any, header: dict[str, Any]) -> Any:
    """`tok` with each token the file holds that transformers added again past the file's vocabulary put
    back at the file's id.  transformers' GGUF reader byte-level-encodes every token of a byte-level
    vocabulary, the special ones too: one spelled outside ASCII (DeepSeek's <｜begin▁of▁sentence｜>, in
    the R1 distills too) comes out garbled at its id and is added again, as itself, past the vocabulary,
    where its model has no embedding row (the model could not be loaded: its BOS and EOS past the rows).
    The garbled spelling, no text's bytes, gives way to the token itself in the vocabulary."""
    tokens = header.get("tokenizer.ggml.tokens") or []
    where = {text: i for i, text in reversed(list(enumerate(tokens)))}  # each text's first id in the file
    moved = {old: where[text] for text, old in tok.get_added_vocab().items() if old >= len(tokens) and text in where}
    if not moved or not hasattr(tok, "backend_tokenizer"):
        return tok

    def edit(saved: Path) -> None:
        path = saved / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        # tokenizers keeps an added token's id only where the vocabulary holds it
        data["added_tokens"] = [{**e, "id": moved.get(e["id"], e["id"])} for e in data.get("added_tokens", [])]
        vocab, targets = data["model"]["vocab"], set(moved.values())
        garbled = {i: text for text, i in vocab.items() if i in targets}
        for e in data["added_tokens"]:
            if e["id"] in garbled and e["content"] not in vocab:
                vocab[e["content"]] = vocab.pop(garbled[e["id"]])
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        path = saved / "tokenizer_config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["added_tokens_decoder"] = {str(moved.get(int(i), int(i))): e
                                        for i, e in (data.get("added_tokens_decoder") or {}).items()}  # fmt: skip
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    return _reloaded(tok, edit)  # under the generic class: the GGUF's own could rebuild another rule


def _kept_as_read(tok: Any) -> Any:
    """`tok`, or the same tokenizer under transformers' generic class where its own class would rebuild
    another split rule when a saved copy is loaded again: transformers reads a GGUF of Qwen2's
    architecture as a Qwen2Tokenizer, which loads any saved tokenizer with Qwen2's rule, though the
    file's (DeepSeek-R1-Distill-Qwen's, Qwen3.5's) differs.  carve's cache of the GGUF holds it under
    the generic class and reads it back as such (`cached_tokenizer`); AutoTokenizer, given the model's
    config, still picks Qwen2Tokenizer for a Qwen2 model's directory (transformers' choice)."""
    if type(tok).__name__ == "TokenizersBackend" or not hasattr(tok, "backend_tokenizer"):
        return tok
    same = _reloaded(tok, generic=False).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    return tok if same else _reloaded(tok)


def _reloaded(tok: Any, edit: Callable[[Path], None] | None = None, generic: bool = True) -> Any:
    """`tok` saved, its files changed by `edit`, and loaded again (`generic`: under transformers' generic
    class, which takes the saved tokenizer.json as it is)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        if edit is not None:
            edit(Path(tmp))
        if generic:
            settings = Path(tmp) / "tokenizer_config.json"
            settings.write_text(
                json.dumps({**json.loads(settings.read_text()), "tokenizer_class": "TokenizersBackend"})
            )
        return AutoTokenizer.from_pretrained(tmp)


def cached_tokenizer(entry: Path) -> Any:
    """A cache entry's tokenizer, under the class it was saved with where that is transformers' generic
    one (`_kept_as_read`): AutoTokenizer would take the class its config's model type names instead."""
    from transformers import AutoTokenizer

    settings = (
        json.loads((entry / "tokenizer_config.json").read_text()) if (entry / "tokenizer_config.json").is_file() else {}
    )
    if settings.get("tokenizer_class") == "TokenizersBackend":
        from transformers import TokenizersBackend

        return TokenizersBackend.from_pretrained(entry)
    return AutoTokenizer.from_pretrained(entry)
