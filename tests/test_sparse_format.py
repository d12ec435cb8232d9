"""carve's sparse model format and the saved precision (issue 21): kept values plus a bit-packed
mask, bit for bit, on every architecture, unstructured and N:M; `carve densify` gives plain weights
for stock from_pretrained; `--save-dtype` is honoured, recorded, and the metrics are the saved
model's; damaged files are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import carve
from carve.cli.main import main
from carve.models.sparse import SPARSE_FILE, read_sparse_state, save_sparse_model
from tests.conftest import tiny_model

FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed", "--cloze-items", "0"]
ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2", "opt"]


def _pruned(arch: str, pattern: str | None) -> torch.nn.Module:
    """A tiny model with its decoder Linear weights half zero (by magnitude; N:M when given)."""
    model = tiny_model(arch)
    scores = carve.score(model, "magnitude")
    carve.apply_mask(model, carve.select_mask(scores, None if pattern else 0.5, "row", pattern))
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_bit_for_bit(arch: str, pattern: str | None, dtype: torch.dtype, tmp_path: Path) -> None:
    model = _pruned(arch, pattern)
    with torch.no_grad():  # a negative zero is a value: kept bit for bit
        next(p for p in model.parameters() if p.dim() == 2).view(-1)[0] = -0.0
    info = save_sparse_model(tmp_path, model, dtype)
    state, aliases = read_sparse_state(tmp_path)
    expected = model.state_dict()
    for name, t in expected.items():
        got = state[aliases.get(name, name)]
        want = t.to(dtype) if t.is_floating_point() else t
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), name
    assert info["masked_tensors"] > 0
    # what carve.load_model builds from it is the same model
    for f in ("config.json",):
        assert (tmp_path / f).is_file()


def test_half_sparse_bfloat16_is_smaller(tmp_path: Path) -> None:
    """Masked matrices at 50% in bfloat16: 1 bit of mask + half the values = 9/16 of dense."""
    model = _pruned("llama", None)
    info = save_sparse_model(tmp_path, model, torch.bfloat16)
    masked_dense = masked_file = 0
    with safe_open(str(tmp_path / SPARSE_FILE), framework="pt") as f:
        for k in f.keys():
            if k.startswith(("mask/", "value/")):
                t = f.get_tensor(k)
                masked_file += t.numel() * t.element_size()
        shapes = json.loads(f.metadata()["carve_mask_shapes"])
    masked_dense = sum(2 * torch.Size(s).numel() for s in shapes.values())
    assert masked_file <= 0.6 * masked_dense
    assert info["file_bytes"] < info["dense_bytes"]


def test_extract_sparse_load_and_densify(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, dense = tmp_path / "out", tmp_path / "dense"
    assert main(["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
                 "--method", "magnitude", "--out", str(out), "--save-format", "sparse", "--save-dtype", "bfloat16",
                 *FAST]) == 0  # fmt: skip
    assert (out / SPARSE_FILE).is_file() and not (out / "model.safetensors").exists()
    manifest = json.loads((out / "carve.json").read_text())
    assert manifest["saved"]["dtype"] == "bfloat16" and manifest["saved"]["format"] == "sparse"
    loaded = carve.load_model(str(out), dtype="bfloat16")
    assert main(["densify", str(out), "--out", str(dense)]) == 0
    stock = AutoModelForCausalLM.from_pretrained(dense)  # stock transformers, no carve
    assert stock.dtype == torch.bfloat16
    ref = dict(loaded.model.named_parameters())
    for name, p in stock.named_parameters():
        assert torch.equal(_bits(p.data), _bits(ref[name].data)), name
    assert json.loads((dense / "carve.json").read_text())["saved"]["format"] == "dense"
    assert main(["densify", str(dense), "--out", str(tmp_path / "again")]) == 2  # not a sparse output


def test_convert_between_precisions_and_formats(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    out = tmp_path / "out"
    assert main(["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
                 "--method", "magnitude", "--out", str(out), "--save-dtype", "float32", *FAST]) == 0  # fmt: skip
    f32 = carve.load_model(str(out))
    bf16, sparse = tmp_path / "bf16", tmp_path / "sparse"
    assert main(["convert", str(out), "--out", str(bf16), "--save-dtype", "bfloat16", "--quiet"]) == 0
    assert main(["convert", str(bf16), "--out", str(sparse), "--save-format", "sparse", "--quiet"]) == 0
    manifest = json.loads((sparse / "carve.json").read_text())
    assert manifest["saved"]["dtype"] == "bfloat16" and manifest["saved"]["format"] == "sparse"
    assert manifest["saved"]["metrics_measured"].startswith("before conversion")  # the metrics are float32's
    assert manifest["recipe"]["method"] == "magnitude" and (sparse / "mask.safetensors").is_file()
    assert (sparse / SPARSE_FILE).is_file() and not (sparse / "model.safetensors").exists()
    back = carve.load_model(str(sparse))
    ref = dict(f32.model.named_parameters())
    for name, p in back.model.named_parameters():  # float32 -> bfloat16 once, then lossless
        assert torch.equal(p.data, ref[name].data.to(torch.bfloat16).float()), name
    assert main(["convert", str(out), "--out", str(out), "--quiet"]) == 2  # onto itself: refused
    plain = tmp_path / "plain"
    assert main(["convert", str(model_dir), "--out", str(plain), "--save-dtype", "bfloat16", "--quiet"]) == 0
    head = json.loads((plain / "carve.json").read_text())  # a model that was no carve output gets a manifest
    assert (
        head["job"] == "convert"
        and head["source"]["model"] == str(model_dir)
        and len(head["source"]["fingerprint"]) == 16
    )


def test_save_dtype_is_honoured_and_the_metrics_are_the_saved_models(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    out = tmp_path / "out"
    argv = ["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--method", "magnitude", "--out", str(out), *FAST]  # fmt: skip
    assert main([*argv, "--save-dtype", "float16"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    manifest = json.loads((out / "carve.json").read_text())
    assert manifest["saved"]["dtype"] == "float16" and "float16" in manifest["saved"]["metrics_measured"]
    # the "after" perplexity is the saved model's: evaluating the saved file (in float32) gives it back
    reloaded = carve.load_model(str(out))
    corpus = carve.Corpus(str(small_corpus))
    m = carve.evaluate(reloaded, corpus, corpus, blocks=2, block_len=32, cloze_items=0)
    assert m["domain_ppl"] == pytest.approx(manifest["metrics"]["after"]["domain_ppl"], rel=1e-5)
    # the source's precision by default: the tiny model is float32
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "carve.json").read_text())["saved"]["dtype"] == "float32"


def test_finetune_and_recover_record_the_saved_dtype(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    train = ["--domain", str(small_corpus), "--general", str(small_corpus), "--steps", "2", "--block-len", "32",
             "--eval-blocks", "2", "--cloze-items", "0", "--quiet", "--save-dtype", "bfloat16"]  # fmt: skip
    assert main(["finetune", str(model_dir), "--trainable", "random", "--out", str(tmp_path / "ft"), *train]) == 0
    assert main(["recover", str(model_dir), "--teacher", str(model_dir), "--out", str(tmp_path / "rc"), *train]) == 0
    for d in ("ft", "rc"):
        assert json.loads((tmp_path / d / "carve.json").read_text())["saved"]["dtype"] == "bfloat16"
        with safe_open(str(tmp_path / d / "model.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_precision_class_of_gguf_tensor_types() -> None:
    from carve.models.gguf_header import precision_class

    assert precision_class([0]) == "float32"
    assert precision_class([0, 1]) == "float16"
    assert precision_class([0, 30]) == "bfloat16"
    assert precision_class([0, 3]) == "bfloat16"  # Q4_1, as the embedded default: quantized
    assert precision_class([2, 8]) == "bfloat16"


DAMAGE = [
    ("truncated", lambda b: b[: len(b) // 2]),
    ("not safetensors", lambda b: b"garbage" * 10),
]


@pytest.mark.parametrize(("label", "damage"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_sparse_file_is_one_clear_error(label, damage, tmp_path: Path, capsys) -> None:
    model = _pruned("llama", None)
    save_sparse_model(tmp_path, model, torch.bfloat16)
    path = tmp_path / SPARSE_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(carve.UsageError, match=r"is not a carve sparse model|damaged"):
        read_sparse_state(tmp_path)


def test_sparse_file_with_values_of_the_wrong_count(tmp_path: Path) -> None:
    from carve.models.sparse import read_entries, write_entries

    model = _pruned("llama", None)
    save_sparse_model(tmp_path, model, torch.bfloat16)
    masked, dense, meta = read_entries(tmp_path / SPARSE_FILE, "x")
    name = next(iter(masked))
    keep, values = masked[name]
    masked[name] = (keep, values[:-1])
    write_entries(tmp_path / SPARSE_FILE, masked, dense, meta, planes=True)
    with pytest.raises(carve.UsageError, match=f"{name} holds"):
        read_sparse_state(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_byte_planes_give_back_every_bit(dtype: torch.dtype) -> None:
    from carve.models.sparse import from_planes, to_planes

    t = (torch.randn(37, 53) * 0.02).to(dtype)
    t[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0]).to(dtype)
    blob, info = to_planes(t)
    back = from_planes(blob, json.loads(json.dumps(info)))  # as the metadata holds it
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(_bits(back), _bits(t))
    assert blob.numel() < t.numel() * t.element_size()  # the top bytes of trained-like weights compress


def test_sparse_2_is_smaller_than_sparse_1_and_both_load_bit_for_bit(tmp_path: Path) -> None:
    from carve.models.sparse import read_entries, write_entries

    model = _pruned("llama", None)
    save_sparse_model(tmp_path, model, torch.bfloat16)
    new_state, _ = read_sparse_state(tmp_path)
    masked, dense, meta = read_entries(tmp_path / SPARSE_FILE, "x")
    assert json.loads(meta["carve_planes"])  # byte planes were written
    old = tmp_path / "old"
    old.mkdir()
    write_entries(old / SPARSE_FILE, masked, dense, {**meta, "carve_format": "sparse-1", "carve_planes": "{}"})
    old_state, _ = read_sparse_state(old)
    assert (tmp_path / SPARSE_FILE).stat().st_size < (old / SPARSE_FILE).stat().st_size
    assert new_state.keys() == old_state.keys()
    for k, v in new_state.items():
        assert v.dtype == old_state[k].dtype and torch.equal(_bits(v), _bits(old_state[k]))
    from carve.models.stream import TensorSource

    with TensorSource(tmp_path) as src:  # the lazy reader (merge, streamed extraction) decodes alike
        for k, v in new_state.items():
            assert src.dtype(k) == v.dtype and src.shape(k) == list(v.shape) and torch.equal(src.get(k), v)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


@pytest.mark.parametrize("damage", ["stream", "length", "metadata"])
def test_damaged_byte_planes_are_one_clear_error(tmp_path: Path, damage: str) -> None:
    from safetensors.torch import load_file, save_file

    model = _pruned("llama", None)
    save_sparse_model(tmp_path, model, torch.bfloat16)
    path = tmp_path / SPARSE_FILE
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    planes = json.loads(meta["carve_planes"])
    key = next(iter(planes))
    blob = tensors[key].clone()
    if damage == "stream":
        blob[2:12] ^= 0x5A  # inside the deflate stream
    elif damage == "length":
        planes[key][2] += 1
    else:
        planes[key] = ["bfloat16", "not a shape", 3]
    meta["carve_planes"] = json.dumps(planes)
    tensors[key] = blob
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(carve.UsageError, match=r"damaged|is not a carve sparse model"):
        read_sparse_state(tmp_path)
    from carve.models.stream import TensorSource

    with pytest.raises(carve.UsageError, match="damaged"):  # the lazy reader: at open or at the read
        with TensorSource(tmp_path) as src:
            for name in src.names():
                src.get(name)


def test_sharded_sparse_model_round_trips(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past a shard's size the sparse format is numbered shards with an index: read back (eagerly,
    lazily, by carve.load_model and after `carve densify`) bit for bit; a missing shard or a damaged
    index is one clear error."""
    from transformers import AutoModelForCausalLM

    from carve.models import sparse
    from carve.models.stream import TensorSource

    model = _pruned("llama", None)
    monkeypatch.setattr(sparse, "SHARD_BYTES", 20_000)  # a shard every few tensors
    src = tmp_path / "src"
    tokenizer.save_pretrained(src)
    info = save_sparse_model(src, model, torch.bfloat16)
    shards = sorted(src.glob("model.sparse-*-of-*.safetensors"))
    assert info["shards"] == len(shards) > 2 and not (src / SPARSE_FILE).exists()
    assert not [f for f in src.iterdir() if "partial" in f.name]  # no half-written leftovers
    assert info["file_bytes"] == sum(f.stat().st_size for f in shards)
    state, aliases = read_sparse_state(src)
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert set(state) | set(aliases) == set(want)
    for name, t in want.items():
        assert torch.equal(_bits(state[aliases.get(name, name)]), _bits(t)), name
    with TensorSource(src) as lazy:
        assert sorted(lazy.names()) == sorted(want)
        assert all(torch.equal(_bits(lazy.get(k)), _bits(t)) for k, t in want.items())
    loaded = carve.load_model(str(src), dtype="bfloat16").model.state_dict()
    assert all(torch.equal(_bits(loaded[k]), _bits(t)) for k, t in want.items())
    assert main(["densify", str(src), "--out", str(tmp_path / "dense")]) == 0
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").state_dict()
    assert all(torch.equal(_bits(stock[k]), _bits(t)) for k, t in want.items())
    index = src / sparse.SPARSE_INDEX
    shards[1].rename(tmp_path / "away")
    with pytest.raises(carve.UsageError, match="missing the sparse shard"):
        read_sparse_state(src)
    index.write_text("{not json")
    with pytest.raises(carve.UsageError, match="is damaged: no weight_map"):
        TensorSource(src)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_streams_and_equals_load_and_save(
    arch: str, tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`carve convert` of a safetensors or sparse directory reads and writes one tensor at a time
    (the model is never loaded), and writes what loading the model and saving it writes, bit for
    bit: dense to bfloat16, dense to sparse, sparse back to dense."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from carve import convert as convert_module
    from carve.job import save_model_files
    from carve.models.load import load_model

    src = tmp_path / "src"
    _pruned(arch, None).save_pretrained(src)
    tokenizer.save_pretrained(src)
    expected = {}
    for name, source, fmt in (("bf16", src, "dense"), ("sparse", src, "sparse")):
        lm = load_model(str(source))
        expected[name] = tmp_path / f"expected-{name}"
        expected[name].mkdir()
        save_model_files(expected[name], lm.model, lm.tokenizer, {}, "bfloat16", sparse=fmt == "sparse")

    def no_loading(*a, **k):
        raise AssertionError("convert loaded the whole model")

    monkeypatch.setattr(convert_module, "load_model", no_loading)
    assert main(["convert", str(src), "--out", str(tmp_path / "bf16"), "--save-dtype", "bfloat16", "--quiet"]) == 0
    assert main(["convert", str(src), "--out", str(tmp_path / "sparse"), "--save-dtype", "bfloat16",
                 "--save-format", "sparse", "--quiet"]) == 0  # fmt: skip
    assert main(["densify", str(tmp_path / "sparse"), "--out", str(tmp_path / "back")]) == 0
    a, b = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(expected["bf16"] / "model.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    c = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(c) == sorted(b) and all(torch.equal(c[k], b[k]) for k in b)
    (s1, t1), (s2, t2) = read_sparse_state(tmp_path / "sparse"), read_sparse_state(expected["sparse"])
    assert t1 == t2 and sorted(s1) == sorted(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert stock.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
