"""Property-based fuzzing (hypothesis) of every reader of a user's file (issue 20): recipes,
manifests, masks, importance maps, safetensors headers, GGUF headers and corpora.  Each generated
input is read or refused with a UsageError, never another exception.  Generation is derandomized
(the same examples on every run, no example database written); FUZZ_COUNTS records how many
examples each property ran, and the session's summary prints them."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carve
from carve.finetune import FinetuneRecipe
from carve.recover import RecoverRecipe

FUZZ_COUNTS: dict[str, int] = {}
EXAMPLES = 1000
fuzz = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def _read_or_refuse(name: str, read: Callable[[], Any]) -> Any:
    FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + 1
    try:
        return read()
    except carve.UsageError:
        return None


_WORK = tempfile.TemporaryDirectory(prefix="carve-fuzz-")  # removed at exit


def _file(data: bytes, suffix: str) -> Path:
    """The generated input as a file (one name per suffix, rewritten for each example)."""
    p = Path(_WORK.name) / f"input{suffix}"
    p.write_bytes(data)
    return p


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid file cut short, with bytes overwritten, or with bytes inserted."""
    n = len(valid)
    cut = st.integers(0, n).map(lambda i: valid[:i])
    flip = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: _apply(valid, edits)
    )
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(
        lambda t: valid[: t[0]] + t[1] + valid[t[0] :]
    )
    return st.one_of(cut, flip, insert)


def _apply(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for i, v in edits:
        b[i] = v
    return bytes(b)


# ---- recipes -------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _recipe_dicts(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    from dataclasses import fields

    names = [f.name for f in fields(cls)]
    plausible = st.sampled_from(["legal", "code", "0.5", "*", "2:4", "row", "wanda", "lift", "auto", ""])
    value = st.one_of(json_values, plausible, st.lists(plausible, max_size=3), st.floats(-2, 2), st.integers(-3, 100))
    return st.dictionaries(st.sampled_from(names), value, max_size=6)


@fuzz
@given(st.one_of(_recipe_dicts(carve.Recipe).map(json.dumps), st.text(max_size=200)))
def test_recipe_files(text: str) -> None:
    path = _file(text.encode("utf-8", "surrogatepass") if text else b"", ".yaml")
    _read_or_refuse("recipe files (extract)", lambda: carve.Recipe.load(path).resolved())


@fuzz
@given(_recipe_dicts(FinetuneRecipe), _recipe_dicts(RecoverRecipe))
def test_finetune_and_recover_recipes(ft: dict[str, Any], rc: dict[str, Any]) -> None:
    _read_or_refuse("recipes (finetune)", lambda: FinetuneRecipe(**ft).validate())
    rc.setdefault("model", "no-such-model")
    _read_or_refuse("recipes (recover)", lambda: RecoverRecipe(**rc).resolved())


# ---- manifests -----------------------------------------------------------------------------------------------------


def _manifests() -> st.SearchStrategy[Any]:
    metrics = st.dictionaries(
        st.sampled_from(["domain_ppl", "general_ppl", "domain_cloze", "block_len", "forget_ppl", "privleak"]),
        json_values | st.floats(0, 100) | st.fixed_dictionaries({"accuracy": json_values}),
        max_size=4,
    )
    sections = {
        "job": json_values | st.sampled_from(["extract", "recover", "finetune", "unlearn", "merge"]),
        "recipe": json_values | _recipe_dicts(carve.Recipe),
        "source": json_values | st.fixed_dictionaries({"model": json_values}),
        "metrics": json_values | st.dictionaries(st.sampled_from(["before", "after", "dense"]), metrics | json_values),
        "size": json_values
        | st.dictionaries(st.sampled_from(["parameters", "parameters_after", "file_mb"]), json_values),
        "structure": json_values | st.fixed_dictionaries({"config": json_values}),
        "training": json_values | st.fixed_dictionaries({"steps": json_values}),
        "trainable": json_values | st.dictionaries(st.sampled_from(["kind", "density", "lora_rank"]), json_values),
        "mask": json_values | st.dictionaries(st.sampled_from(["kind", "density"]), json_values),
        "timings_s": json_values,
        "tasks": json_values | st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({"acc": json_values})),
        "speed": json_values,
        "sparsity": json_values,
        "peak_rss_mb": json_values,
    }
    return st.one_of(json_values, st.fixed_dictionaries({}, optional=sections))


@fuzz
@given(st.one_of(_manifests().map(lambda m: json.dumps(m).encode()), st.binary(max_size=200)))
def test_manifests(data: bytes) -> None:
    from carve.inspect import Run
    from carve.manifest import read_manifest
    from carve.report import run_row

    path = _file(data, ".json")
    manifest = _read_or_refuse("manifests", lambda: read_manifest(path))
    if manifest is not None:  # a manifest carve accepts is one its readers can use
        from carve.report import _cells

        _cells(run_row(Run("fuzz", manifest=manifest)))


# ---- masks and importance maps -------------------------------------------------------------------------------------


def _valid_mask() -> bytes:
    from carve.masks.mask import Mask

    p = _file(b"", ".safetensors")
    Mask({"a": torch.rand(5, 7) > 0.5, "b": torch.rand(3) > 0.5}).save(p)
    return p.read_bytes()


def _valid_importance() -> bytes:
    from carve.masks.mask import ImportanceMap

    p = _file(b"", ".safetensors")
    ImportanceMap({"a": torch.rand(5, 7), "b": torch.rand(3)}, {"scorer": "wanda"}).save(p)
    return p.read_bytes()


def _safetensors_with_metadata(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=meta)


mask_metadata = st.builds(
    lambda shapes, n, dtype: _safetensors_with_metadata(
        {"carve_mask_shapes": json.dumps(shapes)}, {"a": torch.zeros(n, dtype=dtype)}
    ),
    json_values | st.fixed_dictionaries({"a": st.lists(st.integers(-5, 50), max_size=3)}),
    st.integers(0, 10),
    st.sampled_from([torch.uint8, torch.float32, torch.bool, torch.int64]),
)


@fuzz
@given(st.one_of(_mutations(_valid_mask()), mask_metadata, st.binary(max_size=300)))
def test_masks(data: bytes) -> None:
    from carve.inspect import load_run

    path = _file(data, ".safetensors")
    _read_or_refuse("masks", lambda: carve.Mask.load(path))
    _read_or_refuse("masks or maps (inspect)", lambda: load_run(path))


@fuzz
@given(
    st.one_of(
        _mutations(_valid_importance()),
        st.builds(
            lambda meta, dtype: _safetensors_with_metadata({"carve": meta}, {"a": torch.zeros(3, dtype=dtype)}),
            st.text(max_size=30) | json_values.map(json.dumps),
            st.sampled_from([torch.float32, torch.bfloat16, torch.int32, torch.bool]),
        ),
        st.binary(max_size=300),
    )
)
def test_importance_maps(data: bytes) -> None:
    from carve.masks.mask import ImportanceMap

    path = _file(data, ".safetensors")
    _read_or_refuse("importance maps", lambda: ImportanceMap.load(path))


# ---- model files ---------------------------------------------------------------------------------------------------

headers = st.dictionaries(
    st.text(max_size=6),
    json_values
    | st.fixed_dictionaries(
        {"dtype": st.sampled_from(["F32", "BF16", "x"]), "shape": json_values, "data_offsets": json_values}
    )
    | st.fixed_dictionaries(
        {"data_offsets": st.lists(st.integers(-10, 2**62) | st.floats() | st.text(max_size=3), max_size=3)}
    ),
    max_size=4,
)


@fuzz
@given(st.one_of(headers, json_values), st.binary(max_size=64), st.integers(-2, 2**64 - 1) | st.none())
def test_safetensors_headers(header: Any, body: bytes, length: int | None) -> None:
    from carve.models.load import _check_safetensors

    raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    path = _file((n % 2**64).to_bytes(8, "little") + raw + body, ".safetensors")
    _read_or_refuse("safetensors headers", lambda: _check_safetensors(path.parent))


def _valid_gguf() -> bytes:
    import numpy as np
    from gguf import GGUFWriter

    p = _file(b"", ".gguf")
    w = GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    w.add_string("general.name", "fuzz")
    w.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.read_bytes()


@fuzz
@given(st.one_of(_mutations(_valid_gguf()), st.binary(max_size=200).map(lambda b: b"GGUF" + b), st.binary(max_size=64)))
def test_gguf_headers(data: bytes) -> None:
    from carve.models.gguf_header import read_gguf_header

    path = _file(data, ".gguf")
    _read_or_refuse("GGUF headers", lambda: read_gguf_header(path))


# ---- corpora -------------------------------------------------------------------------------------------------------


def _parquet(texts: list[Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [str(t) for t in texts]}), buf)
    return buf.getvalue()


jsonl_lines = st.lists(
    st.one_of(json_values.map(json.dumps), st.fixed_dictionaries({"text": json_values}).map(json.dumps)), max_size=6
).map(lambda lines: "\n".join(lines).encode())
corpus_files = st.one_of(
    st.tuples(st.just(".jsonl"), jsonl_lines | st.binary(max_size=300)),
    st.tuples(
        st.just(".jsonl.gz"), (jsonl_lines | st.binary(max_size=200)).map(gzip.compress) | st.binary(max_size=200)
    ),
    st.tuples(st.just(".jsonl.gz"), _mutations(gzip.compress(b'{"text": "some words here"}\n' * 20))),
    st.tuples(st.just(".parquet"), _mutations(_parquet(["some legal text " * 5] * 4)) | st.binary(max_size=200)),
    st.tuples(st.just(".txt"), st.binary(max_size=300)),
)


@fuzz
@given(corpus_files)
def test_corpora(suffix_and_data: tuple[str, bytes]) -> None:
    suffix, data = suffix_and_data
    path = _file(data, suffix)
    _read_or_refuse(f"corpora ({suffix})", lambda: carve.Corpus(str(path)).documents)
