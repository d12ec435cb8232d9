"""Streamed extraction (`--stream`): one decoder block in memory at a time, the same result as the
in-memory engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carve.errors import UsageError
from carve.masks.mask import Mask
from carve.pipeline import Recipe, extract
from tests.conftest import ARCHS, MORE_ARCHS, tiny_model


def _recipe(model: Path, corpus: Path, method: str, stream: bool, **kw) -> Recipe:
    return Recipe(
        model=str(model), domain=str(corpus), general=str(corpus), method=method, calib_blocks=4, block_len=32,
        eval_blocks=2, cloze_items=0, speed=False, batch_size=2, stream=stream, **{"sparsity": 0.5, **kw},
    )  # fmt: skip


def _saved(tmp_path: Path, arch: str, tokenizer, shard: str | None = None) -> Path:
    out = tmp_path / f"src-{arch}"
    model = tiny_model(arch)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(out)
    return out


def _any_saved(tmp_path: Path, kind: str, tokenizer) -> Path:
    """A tiny model of any transformers `kind` (conftest's any_tiny_config, seed 0) saved with the
    tokenizer at tmp_path/src-<kind>."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import any_tiny_config

    torch.manual_seed(0)
    src = tmp_path / f"src-{kind}"
    AutoModelForCausalLM.from_config(any_tiny_config(kind)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(
    "arch, method",
    [(a, m) for a in ARCHS for m in ("sparsegpt", "wanda", "magnitude", "dual-obs", "fisher")]
    + [(a, "dual-obs") for a in MORE_ARCHS]
    + [("llama", "dual"), ("gemma3", "dual"), ("gpt_neox", "sparsegpt"), ("gpt_neox", "dual-obs")],
)
def test_streamed_equals_in_memory(tmp_path: Path, tokenizer, small_corpus: Path, arch: str, method: str) -> None:
    src = _saved(tmp_path, arch, tokenizer)
    mem = extract(_recipe(src, small_corpus, method, False), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, method, True), tmp_path / "stream")
    assert streamed["streamed"]["why"] == "--stream" and "streamed" not in mem
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    ma, mb = load_file(tmp_path / "mem" / "mask.safetensors"), load_file(tmp_path / "stream" / "mask.safetensors")
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    for when in ("before", "after"):
        for key in ("domain_ppl", "general_ppl"):
            assert streamed["metrics"][when][key] == pytest.approx(mem["metrics"][when][key], rel=1e-4)
    assert streamed["sparsity"]["linear"] == mem["sparsity"]["linear"]
    assert streamed["sparsity"]["all_parameters"] == mem["sparsity"]["all_parameters"]


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("mistral", {"method": "taylor", "reconstruct_mix": 0.3}),
        ("mistral", {"method": "fisher", "pattern": "2:4"}),
        ("llama", {"method": "wanda", "granularity": "global"}),
        ("gpt2", {"method": "magnitude", "granularity": "global"}),
        ("gemma3", {"method": "fisher", "granularity": "global"}),
        ("qwen2", {"method": "dual", "granularity": "global"}),
        ("opt", {"method": "wanda", "granularity": "global", "reconstruct_mix": 0.5}),
        ("llama", {"method": "wanda", "reconstruct_mix": 0.3}),
    ],
)
def test_streamed_score_then_mask_equals_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str, kw: dict
) -> None:
    """A mask chosen from streamed scores (a gradient method's, an activation method's from the streamed
    layer-wise pass, magnitude's block by block), per row or matrix, as N:M or over all matrices at
    once (global: the out-of-core selection), with or without the kept weights updated through the
    streamed OBS sweep: the in-memory result bit for bit."""
    src = _saved(tmp_path, arch, tokenizer)
    kw = dict(kw)
    method = kw.pop("method")
    extract(_recipe(src, small_corpus, method, False, **kw), tmp_path / "mem")
    m = extract(_recipe(src, small_corpus, method, True, **kw), tmp_path / "stream")
    assert m["streamed"]["why"] == "--stream"
    for name in ("model.safetensors", "mask.safetensors"):
        a, b = load_file(tmp_path / "mem" / name), load_file(tmp_path / "stream" / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_streamed_reads_shards_one_block_at_a_time(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from carve.models.skeleton import SkeletonModel

    src = _saved(tmp_path, "llama", tokenizer, shard="60KB")
    assert len(list(src.glob("model-*.safetensors"))) > 2  # a sharded source
    most = []
    load = SkeletonModel.load_block

    def counting(self: SkeletonModel, i: int) -> None:
        load(self, i)
        real = sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks)
        most.append(real)

    monkeypatch.setattr(SkeletonModel, "load_block", counting)
    manifest = extract(_recipe(src, small_corpus, "sparsegpt", True), tmp_path / "out")
    assert most and max(most) == 1  # never two decoder blocks in memory
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock loading of the output
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert manifest["sparsity"]["linear"] == pytest.approx(0.5, abs=0.01)


def test_streamed_save_dtype(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    src = _saved(tmp_path, "qwen2", tokenizer)
    m = extract(_recipe(src, small_corpus, "sparsegpt", True, save_dtype="bfloat16"), tmp_path / "out")
    assert m["saved"]["dtype"] == "bfloat16"
    assert {t.dtype for t in _weights(tmp_path / "out").values()} == {torch.bfloat16}


@pytest.mark.parametrize("arch", [*ARCHS, "gpt_neox"])  # gpt_neox: its head stored as `embed_out`
def test_streamed_sparse_format_equals_in_memory(tmp_path: Path, tokenizer, small_corpus: Path, arch: str) -> None:
    """`--stream --save-format sparse`: the sparse model written tensor by tensor as the blocks leave
    holds the in-memory extraction's weights bit for bit under the model's own names (tied ones
    too; a tensor the checkpoint stores under another name as well), and carve loads it."""
    from carve.models.load import load_model
    from carve.models.sparse import read_sparse_state

    src = _saved(tmp_path, arch, tokenizer)
    kw = {"save_format": "sparse", "save_dtype": "bfloat16"}
    extract(_recipe(src, small_corpus, "sparsegpt", False, **kw), tmp_path / "mem")
    m = extract(_recipe(src, small_corpus, "sparsegpt", True, **kw), tmp_path / "stream")
    assert m["saved"]["format"] == "sparse" and m["size"]["sparse"]["masked_tensors"] > 0
    (a, tied_a), (b, tied_b) = read_sparse_state(tmp_path / "mem"), read_sparse_state(tmp_path / "stream")
    assert sorted(a) == sorted(b) and tied_a == tied_b
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(str(tmp_path / "stream")).model.state_dict()
    assert all(torch.equal(loaded[k].to(a[k].dtype), a[k]) for k in a)


@pytest.mark.parametrize("arch, method", [("llama", "dual-obs"), ("gpt2", "wanda"), ("qwen2", "fisher")])
def test_streamed_with_a_reused_map_equals_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--importance FILE --stream`: the map's matrices read from the file as their blocks come (never
    the whole map: a lazy map), the in-memory result with the same map bit for bit."""
    from carve.masks.mask import ImportanceMap

    src = _saved(tmp_path, arch, tokenizer)
    saved = tmp_path / "map.safetensors"
    first = {"granularity": "global"} if method == "wanda" else {}  # wanda keeps a map at global granularity
    extract(_recipe(src, small_corpus, method, False, **first), tmp_path / "first", save_importance=saved)
    mem = extract(_recipe(src, small_corpus, method, False, importance=str(saved)), tmp_path / "mem")
    loads, load = [], ImportanceMap.load
    monkeypatch.setattr(ImportanceMap, "load", lambda path, lazy=False: loads.append(lazy) or load(path, lazy))
    streamed = extract(_recipe(src, small_corpus, method, True, importance=str(saved)), tmp_path / "stream")
    assert loads == [True]  # the streamed job read the map lazily
    assert streamed["importance"] == {"reused_from": str(saved)} and mem["importance"]["reused_from"] == str(saved)
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(tmp_path / "mem" / "mask.safetensors"), load_file(tmp_path / "stream" / "mask.safetensors")
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    lazy, eager = ImportanceMap.load(saved, lazy=True), ImportanceMap.load(saved)
    assert list(lazy) == list(eager) and all(torch.equal(lazy[k], eager[k]) for k in eager)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"method": "dual", "sparsity": 0.5, "lr": 1e-4}, "grad-lr"),
        ({"method": "dual-obs", "granularity": "global"}, "row or matrix"),
        ({"method": "sparsegpt", "propagation": "fused"}, "fused"),
        ({"method": "dual", "structure": True, "sparsity": None, "keep": 0.5, "lr": 1e-4}, "grad-lr"),
    ],
)
def test_streamed_refusals(tmp_path: Path, tokenizer, small_corpus: Path, kw: dict, words: str) -> None:
    src = _saved(tmp_path, "llama", tokenizer)
    kw = dict(kw)
    method = kw.pop("method")
    with pytest.raises(UsageError, match=words):
        extract(_recipe(src, small_corpus, method, True, **kw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


MOE_ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss"]


@pytest.mark.parametrize(
    "arch, method, kw",
    [(a, m, {}) for a in MOE_ARCHS for m in ("sparsegpt", "dual-obs")]
    + [("mixtral", m, {}) for m in ("wanda", "magnitude", "fisher")]
    + [("qwen3_moe", "fisher", {"pattern": "2:4"}), ("gpt_oss", "wanda", {"granularity": "global"})]
    + [("llama4_text", "sparsegpt", {})],  # experts outside transformers' interface, [E, in, out], pre-routed
)
def test_streamed_moe_equals_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str, method: str, kw: dict
) -> None:
    """An MoE whose checkpoint holds each expert's matrices (Mixtral, Qwen-MoE; transformers fuses them
    into one 3-D tensor on load) or the fused tensors (gpt-oss), streamed: each block's fused tensors
    built with transformers' conversion, each expert pruned as its own Linear on its routed tokens,
    and the block written back split as save_pretrained writes it; the in-memory result bit for bit,
    under the source checkpoint's tensor names."""
    src = _saved(tmp_path, arch, tokenizer)
    mem = extract(_recipe(src, small_corpus, method, False, **kw), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, method, True, **kw), tmp_path / "stream")
    assert streamed["streamed"]["why"] == "--stream"
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(b) == sorted(_weights(src))  # the source's own layout (per-expert names where it had them)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(tmp_path / "mem" / "mask.safetensors"), load_file(tmp_path / "stream" / "mask.safetensors")
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    moe = "feed_forward" if arch == "llama4_text" else "mlp"
    assert f"model.layers.1.{moe}.experts.down_proj" in mb  # the experts pruned, each as its own matrix
    assert streamed["experts"] == mem["experts"] and len(mem["experts"]["unfused"]) == 2
    assert streamed["sparsity"]["linear"] == mem["sparsity"]["linear"]
    for when in ("before", "after"):
        assert streamed["metrics"][when]["domain_ppl"] == pytest.approx(mem["metrics"][when]["domain_ppl"], rel=1e-4)


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_streamed_experts_stacked_in_2d_weights_equal_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch, dtype: str
) -> None:
    """DBRX's experts (stacked along the rows of 2-D weights) streamed: each block's experts re-bound
    as views when it is read, each pruned as its own matrix; the in-memory result bit for bit.  Under
    `auto` both calibrate in bfloat16 (made native here): transformers' DBRX experts stop under
    bfloat16 autocast (they add bfloat16 into float32), carve's unfused ones cast, and the in-memory
    job's trial forward runs them as calibration does (it once ran the model's own: float32 in
    memory, bfloat16 streamed)."""
    monkeypatch.setattr("carve.models.load.native_bfloat16", lambda device: torch.device(device).type == "cpu")
    src = _any_saved(tmp_path, "dbrx", tokenizer)
    kw = {"calib_dtype": dtype}
    mem = extract(_recipe(src, small_corpus, "sparsegpt", False, **kw), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, "sparsegpt", True, **kw), tmp_path / "stream")
    want = "bfloat16" if dtype == "auto" else "float32"
    assert mem["data"]["calibration"]["dtype"] == streamed["data"]["calibration"]["dtype"] == want
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(tmp_path / "mem" / "mask.safetensors"), load_file(tmp_path / "stream" / "mask.safetensors")
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    w2 = Mask.load(tmp_path / "stream" / "mask.safetensors")["transformer.blocks.2.ffn.experts.mlp.w2"].view(4, 96, 64)
    assert all(w2[e].float().mean().item() == 0.5 for e in range(4))  # each expert's own matrix halved
    assert streamed["experts"] == mem["experts"] and len(mem["experts"]["unfused"]) == 3
    assert streamed["sparsity"]["linear"] == mem["sparsity"]["linear"]


def test_streamed_parameters_cut_from_one_checkpoint_tensor_equal_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path
) -> None:
    """HRM's checkpoint holds fused `attn.gqkv_proj` / `mlp.gate_up_proj` tensors that transformers
    cuts into its attention's gate, q, k, v and its MLP's gate and up on load (a one-to-many
    conversion): streamed, each is read once for all its parts and written back joined once all are
    pruned; the in-memory output bit for bit, under the checkpoint's names."""
    src = _any_saved(tmp_path, "hrm_text", tokenizer)
    stored = _weights(src)
    assert any(k.endswith("attn.gqkv_proj.weight") for k in stored) and any(
        k.endswith("mlp.gate_up_proj.weight") for k in stored
    )
    mem = extract(_recipe(src, small_corpus, "sparsegpt", False), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, "sparsegpt", True), tmp_path / "stream")
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(b) == sorted(stored) and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(tmp_path / "mem" / "mask.safetensors"), load_file(tmp_path / "stream" / "mask.safetensors")
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert streamed["sparsity"]["linear"] == mem["sparsity"]["linear"] == pytest.approx(0.5)
    for when in ("before", "after"):
        assert streamed["metrics"][when]["domain_ppl"] == pytest.approx(mem["metrics"][when]["domain_ppl"], rel=1e-4)


def test_streamed_moe_reads_one_block_at_a_time_and_writes_the_sparse_format(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sharded Mixtral streamed: never two blocks read, each expert's views freed with its block;
    the sparse format (bfloat16: the experts re-bound to the rounded tensors) holds the fused
    tensors as a model's state dict does, bit for bit the in-memory sparse output's."""
    from carve.models.load import load_model
    from carve.models.skeleton import SkeletonModel
    from carve.models.sparse import read_sparse_state

    src = _saved(tmp_path, "mixtral", tokenizer, shard="100KB")
    assert len(list(src.glob("model-*.safetensors"))) > 2
    kw = {"save_format": "sparse", "save_dtype": "bfloat16"}
    extract(_recipe(src, small_corpus, "sparsegpt", False, **kw), tmp_path / "mem")
    most = []
    load = SkeletonModel.load_block

    def counting(self: SkeletonModel, i: int) -> None:
        load(self, i)
        most.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks))

    monkeypatch.setattr(SkeletonModel, "load_block", counting)
    extract(_recipe(src, small_corpus, "sparsegpt", True, **kw), tmp_path / "stream")
    assert most and max(most) == 1  # the unfused experts' views count: freed blocks hold nothing
    (a, tied_a), (b, tied_b) = read_sparse_state(tmp_path / "mem"), read_sparse_state(tmp_path / "stream")
    assert "model.layers.0.mlp.experts.gate_up_proj" in b
    assert sorted(a) == sorted(b) and tied_a == tied_b
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(str(tmp_path / "stream")).model.state_dict()
    assert all(torch.equal(loaded[k].to(a[k].dtype), a[k]) for k in a)


def test_streamed_moe_refuses_a_checkpoint_missing_an_expert(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """A Mixtral checkpoint without one expert's w1: the fused tensor could not be written back as it
    was read, so the streamed job says so before any work and writes nothing."""
    from safetensors.torch import save_file

    src = _saved(tmp_path, "mixtral", tokenizer)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="would not be saved to the tensors it is read from"):
        extract(_recipe(src, small_corpus, "sparsegpt", True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streamed_moe_with_a_reused_map_and_eval(tmp_path: Path, tokenizer, small_corpus: Path, capsys) -> None:
    """A Qwen3-MoE map saved in memory (keyed by the fused tensors) reused by a streamed job gives the
    in-memory result; `carve eval --stream` on the MoE gives the in-memory perplexities."""

    src = _saved(tmp_path, "qwen3_moe", tokenizer)
    saved = tmp_path / "map.safetensors"
    extract(_recipe(src, small_corpus, "dual-obs", False), tmp_path / "first", save_importance=saved)
    extract(_recipe(src, small_corpus, "dual-obs", False, importance=str(saved)), tmp_path / "mem")
    extract(_recipe(src, small_corpus, "dual-obs", True, importance=str(saved)), tmp_path / "stream")
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    _streamed_eval_equals_in_memory(src, small_corpus, capsys)


def test_streamed_dual_obs_refuses_save_importance(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    src = _saved(tmp_path, "llama", tokenizer)
    with pytest.raises(UsageError, match="--save-importance"):
        extract(_recipe(src, small_corpus, "dual-obs", True), tmp_path / "out", save_importance=tmp_path / "imp")
    assert not (tmp_path / "out").exists() and not (tmp_path / "imp").exists()


def test_stream_needs_a_safetensors_directory(tmp_path: Path, small_corpus: Path) -> None:
    with pytest.raises(UsageError, match="local model directory"):
        Recipe(model="default", domain=str(small_corpus), method="sparsegpt", stream=True).resolved()


def test_streams_by_itself_when_the_model_would_not_fit(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carve.streamed

    src = _saved(tmp_path, "llama", tokenizer)
    monkeypatch.setattr(carve.streamed, "available_memory", lambda: 100_000)  # bytes: less than the tiny model
    m = extract(_recipe(src, small_corpus, "sparsegpt", False), tmp_path / "auto")
    assert "more than half" in m["streamed"]["why"]
    # a method that cannot stream still runs in memory, as before
    m = extract(_recipe(src, small_corpus, "dual", False, lr=1e-4), tmp_path / "mem")
    assert "streamed" not in m
    monkeypatch.setattr(carve.streamed, "available_memory", lambda: 1 << 40)
    assert "streamed" not in extract(_recipe(src, small_corpus, "sparsegpt", False), tmp_path / "fits")


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_perplexity_equals_full_logits(arch: str) -> None:
    """Perplexity with the head and cross-entropy over chunks of positions equals the one from the
    full logits (the memory fix for large vocabularies)."""
    import torch.nn.functional as F

    from carve.evaluation.perplexity import nll_sum

    model = tiny_model(arch)
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
    assert nll_sum(model, ids, chunk=16) == pytest.approx(full, rel=1e-5)


def test_interrupted_streamed_run_leaves_nothing(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after the first block was written: no output, no temporary directory, no shard."""
    from carve.streamed import BlockStream

    src = _saved(tmp_path, "llama", tokenizer)
    leave = BlockStream.leave

    def interrupted(self: BlockStream, i: int) -> None:
        leave(self, i)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(BlockStream, "leave", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        extract(_recipe(src, small_corpus, "sparsegpt", True), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written beside the source
    assert not list(tmp_path.rglob("*.safetensors.index.json")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batches", [0, 1.5])  # everything spilled; some batches in memory, the rest spilled
def test_spilled_activations_give_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, batches: float
) -> None:
    """Calibration activations past --max-memory go to a temporary file and come back bit for bit:
    the same masks and weights as with no limit; the files are gone afterwards."""
    import tempfile

    from carve.ops.prune import prune
    from carve.settings import Calibration
    from tests.conftest import VOCAB

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calib = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    model = tiny_model("llama")
    budget = int(batches * 2 * 16 * model.config.hidden_size * torch.finfo(dtype).bits // 8)  # batch: 2 x 16 tokens
    for limit in (None, budget):
        model = tiny_model("llama").to(dtype)
        result = prune(model, "sparsegpt", 0.5, calib, calib=Calibration(batch_size=2, max_memory=limit))
        runs.append((result, {k: v.clone() for k, v in model.state_dict().items()}))
    (free, free_weights), (spilled, spilled_weights) = runs
    assert spilled.engine_seconds is not None and spilled.engine_seconds["spilled_mb"] > 0
    assert "spilled_mb" not in (free.engine_seconds or {})
    assert all(torch.equal(free.mask[k], spilled.mask[k]) for k in free.mask.keys())
    assert all(torch.equal(free_weights[k], spilled_weights[k]) for k in free_weights)
    assert not list(tmp_path.glob("carve-activations-*"))


def test_activations_budget_counts_every_live_list() -> None:
    from carve.engines.activations import Budget

    budget = Budget(limit=3 * 4 * 10)  # three float32 [10] tensors
    a, b = budget.new(), budget.new()
    for _ in range(2):
        a.append(torch.ones(10))
        b.append(torch.ones(10))
    assert budget.used == 3 * 40 and budget.spilled == 40  # the fourth went to a file
    assert [t.sum().item() for t in b] == [10.0, 10.0]
    a.release()
    assert budget.used == 40
    b.append(torch.ones(10))  # room again
    assert budget.spilled == 40
    budget.close()


@pytest.mark.parametrize(
    "text, size", [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gb", 1_500_000_000), ("0", 0), ("2kib", 2048)]
)
def test_parse_size(text: str, size: int) -> None:
    from carve.engines.activations import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "4XB", "nan", "inf"])
def test_parse_size_refuses(text: str) -> None:
    from carve.engines.activations import parse_size

    with pytest.raises(UsageError, match="--max-memory"):
        parse_size(text)


@pytest.mark.parametrize(
    "kw, words", [({"max_memory": "lots"}, "give a size"), ({"max_memory": "1GB", "propagation": "fused"}, "fused")]
)
def test_max_memory_refusals_write_nothing(tmp_path: Path, tokenizer, small_corpus: Path, kw: dict, words: str) -> None:
    src = _saved(tmp_path, "llama", tokenizer)
    with pytest.raises(UsageError, match=words):
        extract(_recipe(src, small_corpus, "sparsegpt", False, **kw), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_eval_equals_in_memory(tmp_path: Path, tokenizer, small_corpus: Path, capsys, arch: str) -> None:
    """`carve eval --stream` reads one block at a time (sharded source) and gives the in-memory
    evaluation's perplexities; lm-eval tasks need the whole model and are refused."""
    import json

    from carve.cli.main import main

    src = _saved(tmp_path, arch, tokenizer, shard="200KB")
    flags = ["eval", str(src), "--domain", str(small_corpus), "--block-len", "32", "--eval-blocks", "3", "--json",
             "--quiet", "--cloze-items", "0"]  # fmt: skip
    found = []
    for extra in ([], ["--stream"]):
        assert main([*flags, *extra]) == 0
        found.append(json.loads(capsys.readouterr().out))
    memory, streamed = found
    assert streamed["metrics"]["streamed"]["why"] == "--stream" and "streamed" not in memory["metrics"]
    assert streamed["fingerprint"] == memory["fingerprint"]
    for key in ("domain_ppl", "general_ppl"):
        assert streamed["metrics"][key] == pytest.approx(memory["metrics"][key], rel=1e-4)
    assert main([*flags, "--stream", "--tasks", "carve_cloze_legal"]) == 2
    assert "--tasks" in capsys.readouterr().err


def test_streamed_dual_obs_within_a_memory_budget(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dual-obs streamed with every block input, gradient and score spilled to temporary files
    (--max-memory 0): the in-memory result bit for bit, and no temporary file left afterwards."""
    import gc
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from carve.engines import activations

    src = _saved(tmp_path, "qwen2", tokenizer)
    extract(_recipe(src, small_corpus, "dual-obs", False), tmp_path / "mem")
    written = []
    on_disk = activations._OnDisk.__init__

    def counted(self, path: Path, t: torch.Tensor) -> None:
        written.append(path.parent.name)
        on_disk(self, path, t)

    monkeypatch.setattr(activations._OnDisk, "__init__", counted)
    m = extract(_recipe(src, small_corpus, "dual-obs", True, max_memory="0"), tmp_path / "stream")
    assert len(written) > 10  # the gradient pass's block inputs and gradients, the scores, the sweep's inputs
    assert m["streamed"]["why"] == "--stream"
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    gc.collect()
    assert not list(scratch.glob("carve-*"))


def test_spilled_tensors_mapping(tmp_path: Path) -> None:
    import gc

    from carve.engines.activations import SpilledTensors

    m = SpilledTensors(tmp_path)
    m["a"], m["b"] = torch.arange(6.0).reshape(2, 3), torch.ones(2, dtype=torch.bfloat16)
    m["a"] = torch.full((2, 3), 7.0)  # replaced: the old file goes
    assert sorted(m) == ["a", "b"] and len(m) == 2
    assert torch.equal(m["a"], torch.full((2, 3), 7.0)) and m["b"].dtype == torch.bfloat16
    (directory,) = tmp_path.iterdir()
    assert len(list(directory.iterdir())) == 2
    del m["b"]
    assert len(list(directory.iterdir())) == 1 and "b" not in m
    del m
    gc.collect()
    assert not directory.exists()


STRUCTURED_STREAMS = [("llama", {"keep": 0.5}), ("gemma3", {"keep": 0.5}),
                      ("qwen2", {"drop_blocks": 1, "mlp_keep": 0.5, "heads_keep": 1.0}),
                      ("llama", {"keep": 0.6, "bias_compensation": True}),
                      ("gemma3", {"mlp_keep": 0.5, "heads_keep": 0.5, "bias_compensation": True}),
                      ("mistral", {"keep": 0.5, "method": "magnitude"}), ("llama", {"keep": 0.5, "method": "fisher"}),
                      ("gemma3", {"keep": 0.5, "method": "dual-obs"}), ("qwen2", {"keep": 0.5, "method": "dual"}), ("llama", {"keep": 0.5, "drop_rule": "greedy"}),
                      ("gemma3", {"drop_blocks": 1, "mlp_keep": 1.0, "heads_keep": 1.0, "drop_rule": "greedy"})] + [(a, {"keep": 0.5}) for a in MORE_ARCHS] + [("phi3", {"keep": 0.5, "drop_rule": "greedy", "method": "dual-obs"})] + [
    (a, {"keep": 0.5}) for a in ("olmo2", "stablelm")] + [("phi", {"keep": 0.5}),
    ("starcoder2", {"keep": 0.5, "method": "dual-obs"})]  # fmt: skip  # olmo2, stablelm: every head kept
# hybrids (their DeltaNet and Mamba blocks kept whole), Gemma 4 (every head kept, its last block pinned)
STRUCTURED_STREAMS += [
    ("any:qwen3_5_text", {"keep": 0.5}),
    ("any:bamba", {"drop_blocks": 1, "mlp_keep": 0.5, "drop_rule": "greedy"}),
    ("gemma4", {"keep": 0.6}),
    ("gemma4", {"drop_blocks": 2, "mlp_keep": 0.5, "drop_rule": "greedy"}),
]


@pytest.mark.parametrize("arch, kw", STRUCTURED_STREAMS)
def test_streamed_structured_equals_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str, kw: dict
) -> None:
    """A streamed structured extraction (unit importance block by block, block distances, mean inputs
    and every candidate split's loss in streamed passes, each kept block sliced as it is written):
    the in-memory plan, config and weights bit for bit, and the same perplexities."""
    import json

    if arch == "gemma4":
        from tests.test_structure import _gemma4

        src = tmp_path / "src-gemma4"
        _gemma4().save_pretrained(src)
        tokenizer.save_pretrained(src)
    else:
        src = (
            _any_saved(tmp_path, arch[4:], tokenizer) if arch.startswith("any:") else _saved(tmp_path, arch, tokenizer)
        )
    kw = {"method": "wanda", **kw}
    method = kw.pop("method")
    mem = extract(_recipe(src, small_corpus, method, False, structure=True, sparsity=None, **kw), tmp_path / "mem")
    streamed = extract(
        _recipe(src, small_corpus, method, True, structure=True, sparsity=None, **kw), tmp_path / "stream"
    )
    assert streamed["streamed"]["why"] == "--stream"
    assert streamed["structure"] == mem["structure"]
    assert streamed["size"]["parameters_after"] == mem["size"]["parameters_after"] < mem["size"]["parameters_before"]
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "stream"))
    assert {k: v for k, v in ca.items() if k != "transformers_version"} == {
        k: v for k, v in cb.items() if k != "transformers_version"}  # fmt: skip
    for when in ("before", "after"):
        for key in ("domain_ppl", "general_ppl"):
            assert streamed["metrics"][when][key] == pytest.approx(mem["metrics"][when][key], rel=1e-4)
    if arch == "gemma4":  # its manifest holds key/value heads by block, which a reader must accept
        from carve.manifest import read_manifest

        assert isinstance(read_manifest(tmp_path / "mem")["structure"]["config"]["num_key_value_heads"], list)


@pytest.mark.parametrize(
    "arch, layers, kw",
    [("gemma2", 6, {"drop_blocks": 2, "drop_run": 2, "drop_rule": "greedy"}),
     ("smollm3", 8, {"drop_blocks": 4, "drop_run": 4})],
)  # fmt: skip
def test_streamed_runs_equal_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str, layers: int, kw: dict
) -> None:
    """`--drop-run`: blocks dropped in runs of consecutive blocks (greedy and distance), streamed as in
    memory, bit for bit; the kept blocks keep the model's layer pattern, so the output exports to GGUF
    (Gemma 2 alternating sliding and global, SmolLM3 without RoPE in every fourth layer)."""
    import json

    from carve.cli.main import main
    from tests.test_structure import deep_model

    src = tmp_path / f"src-{arch}"
    deep_model(arch, layers).save_pretrained(src)
    tokenizer.save_pretrained(src)
    kw = {"structure": True, "sparsity": None, "mlp_keep": 1.0, "heads_keep": 1.0, **kw}
    mem = extract(_recipe(src, small_corpus, "wanda", False, **kw), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, "wanda", True, **kw), tmp_path / "stream")
    assert streamed["structure"] == mem["structure"]
    dropped = mem["structure"]["dropped_blocks"]
    assert len(dropped) == kw["drop_blocks"] and dropped == list(range(dropped[0], dropped[0] + kw["drop_run"]))
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "mem" / "config.json").read_text())
    assert config["num_hidden_layers"] == layers - kw["drop_blocks"]
    assert main(["export", str(tmp_path / "mem"), "--gguf", str(tmp_path / "out.gguf"), "--quiet"]) == 0


def test_streamed_structured_with_a_reused_map_equals_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--structure --importance FILE --stream`: each block's units reduced from the map's matrices read
    lazily, the in-memory plan and weights with the same map bit for bit."""
    from carve.masks.mask import ImportanceMap

    src = _saved(tmp_path, "llama", tokenizer)
    saved = tmp_path / "map.safetensors"
    kw = {"structure": True, "sparsity": None, "keep": 0.5}
    extract(_recipe(src, small_corpus, "fisher", False, **kw), tmp_path / "first", save_importance=saved)
    mem = extract(_recipe(src, small_corpus, "fisher", False, importance=str(saved), **kw), tmp_path / "mem")
    loads, load = [], ImportanceMap.load
    monkeypatch.setattr(ImportanceMap, "load", lambda path, lazy=False: loads.append(lazy) or load(path, lazy))
    streamed = extract(_recipe(src, small_corpus, "fisher", True, importance=str(saved), **kw), tmp_path / "stream")
    assert loads == [True] and streamed["importance"] == {"reused_from": str(saved)}
    assert streamed["structure"] == mem["structure"]
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "arch, method, kw",
    [("mixtral", "sparsegpt", {}), ("qwen3_moe", "dual-obs", {}),
     ("llama", "sparsegpt", {"structure": True, "sparsity": None, "keep": 0.5})],
)  # fmt: skip
def test_streamed_in_rounds_equals_in_memory(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch, arch: str, method: str, kw: dict
) -> None:
    """`--stream --max-memory 0`: activations spilled and every block calibrated in rounds, one
    Linear group each (an MoE's: one per expert matrix; a structured plan's unit importance gathered
    over a block's rounds): the weights of the in-memory run without a budget, bit for bit."""
    import importlib

    engine = importlib.import_module("carve.engines.layerwise")
    src = _saved(tmp_path, arch, tokenizer)
    mem = extract(_recipe(src, small_corpus, method, False, **kw), tmp_path / "mem")
    parts: list[int] = []
    real = engine.rounds
    monkeypatch.setattr(engine, "rounds", lambda *a: parts.append(len(found := real(*a))) or found)
    streamed = extract(_recipe(src, small_corpus, method, True, max_memory="0", **kw), tmp_path / "stream")
    assert streamed["streamed"]["statistics_in_memory_mb"] == 0 and min(parts) >= 4  # each block in rounds
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    if not kw:
        # without --max-memory: a block's Hessians within half the free memory, in one round here
        assert streamed["engine_seconds"]["most_rounds"] == max(parts) and mem["engine_seconds"]["most_rounds"] == 1
        ma, mb = (load_file(tmp_path / d / "mask.safetensors") for d in ("mem", "stream"))
        assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    else:
        assert streamed["structure"] == mem["structure"]


@pytest.mark.parametrize(
    "arch, stored", [("mixtral", torch.float32), ("qwen2_moe", torch.float32), ("qwen3_moe", torch.bfloat16)]
)
def test_fused_experts_are_read_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, stored: torch.dtype
) -> None:
    """A streamed block's fused expert tensors are filled in place, each checkpoint tensor copied into
    the view transformers' reverse conversion gives it (no stacked copies): transformers' converter's
    result bit for bit, and the converter not called.  Views that do not tile the tensor exactly are
    refused with nothing written (the converter then builds it)."""
    from carve.models.skeleton import Conversions, SkeletonModel

    src = tmp_path / "src"
    tiny_model(arch).to(stored).save_pretrained(src)
    with SkeletonModel(src, torch.float32, "cpu") as sk:  # a bfloat16 checkpoint computed in float32
        fused = sorted(sk.conversions.fused)
        wanted = {name: sk.conversions.read(name, sk.source.get).float() for name in fused}
        for name, want in wanted.items():
            out = torch.empty_like(want)
            assert sk.conversions.read_into(name, out, sk.source.get) and torch.equal(out, want), name

        def refused(*_a: object) -> torch.Tensor:
            raise AssertionError("the converter was called")

        monkeypatch.setattr(Conversions, "read", refused)
        sk.load_block(1)
        for name in (n for n in fused if ".layers.1." in n):
            assert torch.equal(sk.parameter(name), wanted[name]), name
        real = sk.conversions.checkpoint_tensors
        overlapping = lambda n, t: {k: t.reshape(-1)[: v.numel()].view(v.shape) for k, v in real(n, t).items()}  # noqa: E731
        monkeypatch.setattr(sk.conversions, "checkpoint_tensors", overlapping)
        out = torch.zeros_like(wanted[fused[0]])
        assert not sk.conversions.read_into(fused[0], out, sk.source.get) and not out.any()


@pytest.mark.parametrize(
    ("model_type", "save_format"), [("deepseek_v3", "dense"), ("deepseek_v3", "sparse"), ("kimi_linear", "dense")]
)
def test_a_streamed_model_keeps_the_persistent_buffers_its_checkpoint_holds(
    tmp_path: Path, tokenizer, small_corpus: Path, model_type: str, save_format: str
) -> None:
    """DeepSeek-V3's routers hold a per-expert `e_score_correction_bias`, a persistent buffer its
    checkpoint stores (Kimi-Linear's under `block_sparse_moe`, which transformers renames `mlp` on
    load): streamed, it is read with its block (not left at the zeros the config builds: routing, so
    the perplexities, would differ) and written back under its stored name, so the output is the
    in-memory job's bit for bit.  Until 2026-12-04 a streamed output lacked it (reloaded as zeros)."""
    from transformers import AutoModelForCausalLM

    from carve.models.load import load_model
    from tests.conftest import any_tiny_config

    config = any_tiny_config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.5, -0.5, 0.3, -0.2]))
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    kw = {"save_format": save_format}
    mem = extract(_recipe(src, small_corpus, "sparsegpt", False, **kw), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, "sparsegpt", True, **kw), tmp_path / "stream")
    for when in ("before", "after"):
        assert streamed["metrics"][when]["domain_ppl"] == pytest.approx(mem["metrics"][when]["domain_ppl"], rel=1e-4)
    a, b = (load_model(str(tmp_path / d)).model.state_dict() for d in ("mem", "stream"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    if save_format == "dense":  # the same tensors under the same (stored) names
        assert sorted(_weights(tmp_path / "mem")) == sorted(_weights(tmp_path / "stream"))
    assert b["model.layers.1.mlp.gate.e_score_correction_bias"].tolist() == pytest.approx([0.5, -0.5, 0.3, -0.2])


def test_blocks_returning_more_than_the_hidden_states_stream(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """GLM-MoE-DSA's blocks return (hidden states, top-k indices), the model unpacking both: where
    carve stands in for the blocks (streamed perplexities, final losses) it returns that structure
    (`layerwise.as_block_output`), so the streamed job runs and equals the in-memory one (it stopped
    on "not enough values to unpack" before)."""
    src = _any_saved(tmp_path, "glm_moe_dsa", tokenizer)
    mem = extract(_recipe(src, small_corpus, "sparsegpt", False), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, "sparsegpt", True), tmp_path / "stream")
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for when in ("before", "after"):
        assert streamed["metrics"][when]["domain_ppl"] == pytest.approx(mem["metrics"][when]["domain_ppl"], rel=1e-4)


def test_a_tokenizer_larger_than_the_embedding_is_refused_in_one_line(
    tmp_path: Path, tokenizer, small_corpus: Path, capsys
) -> None:
    """A tokenizer with more ordinary tokens than the model has embedding rows (another model's):
    in memory, streamed and in a streamed evaluation, one line naming both counts, nothing written
    (before: an IndexError deep in the embedding's forward)."""
    from carve.models.load import load_model
    from tests.conftest import byte_level_tokenizer

    src = _saved(tmp_path, "llama", tokenizer)
    rows = tiny_model("llama").get_input_embeddings().num_embeddings
    byte_level_tokenizer(None, size=rows + 40).save_pretrained(src)
    said = rf"gives token ids up to {rows + 39} but the model embeds only {rows} tokens"
    with pytest.raises(UsageError, match=said):
        load_model(str(src))
    _refused_everywhere(src, small_corpus, said, tmp_path, capsys)


def test_text_spelling_out_an_added_token_the_model_does_not_embed_is_refused_in_one_line(
    tmp_path: Path, tokenizer, small_corpus: Path, capsys
) -> None:
    """A tokenizer may add a token past the embedding rows (transformers' GGUF reader adds an
    <|endoftext|> that way): loading works, but a corpus that spells it out is refused in one line
    naming the token, in memory, streamed and in a streamed evaluation, nothing written (before:
    an IndexError deep in the embedding's forward)."""
    import json

    from carve.models.load import load_model

    src = _saved(tmp_path, "llama", tokenizer)
    rows = tiny_model("llama").get_input_embeddings().num_embeddings
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") >= rows
    tokenizer.save_pretrained(src)
    load_model(str(src))  # the added token alone is let be
    spelled = tmp_path / "spelled.jsonl"
    docs = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    spelled.write_text("".join(json.dumps({"text": d + " <|endoftext|>"}) + "\n" for d in docs))
    said = rf"spells out '<\|endoftext\|>', token id {rows}, which the tokenizer adds but the model does not embed"
    _refused_everywhere(src, spelled, said, tmp_path, capsys)


def _refused_everywhere(src: Path, corpus: Path, said: str, tmp_path: Path, capsys) -> None:
    """Extraction in memory and streamed raises UsageError matching `said`, writing nothing, and a
    streamed `carve eval` exits with that one line."""
    import re

    from carve.cli.main import main

    for stream in (False, True):
        with pytest.raises(UsageError, match=said):
            extract(_recipe(src, corpus, "sparsegpt", stream), tmp_path / f"out{stream}")
        assert not (tmp_path / f"out{stream}").exists()
    flags = ["eval", str(src), "--domain", str(corpus), "--block-len", "32", "--eval-blocks", "2", "--stream"]
    capsys.readouterr()
    assert main(flags) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(said, err[0]), err


@pytest.mark.parametrize("method", ["sparsegpt", "dual-obs"])
def test_streamed_passes_on_what_blocks_hand_each_other(tmp_path: Path, tokenizer, small_corpus: Path, method: str,
                                                        capsys) -> None:  # fmt: skip
    """GLM-MoE-DSA's shared layers take the top-k indices the last full layer computed, handed on in
    the blocks' outputs: streamed (calibration, gradient pass, before / after perplexities) they are
    passed on as in the whole model, so the output equals the in-memory one bit for bit, and a
    streamed evaluation gives the in-memory perplexity (before: the recorded indices of block 0)."""
    from tests.conftest import dsa_shared_model

    src = tmp_path / "src-dsa"
    dsa_shared_model().save_pretrained(src)
    tokenizer.save_pretrained(src)
    mem = extract(_recipe(src, small_corpus, method, False), tmp_path / "mem")
    streamed = extract(_recipe(src, small_corpus, method, True), tmp_path / "stream")
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for when in ("before", "after"):
        assert streamed["metrics"][when]["domain_ppl"] == pytest.approx(mem["metrics"][when]["domain_ppl"], rel=1e-4)
    _streamed_eval_equals_in_memory(src, small_corpus, capsys)


def _streamed_eval_equals_in_memory(src: Path, corpus: Path, capsys) -> None:
    """`carve eval` of `src` in memory and with --stream: the same held-out perplexity."""
    from carve.cli.main import main

    flags = ["eval", str(src), "--domain", str(corpus), "--block-len", "32", "--eval-blocks", "3", "--json",
             "--quiet", "--cloze-items", "0"]  # fmt: skip
    found = []
    for extra in ([], ["--stream"]):
        assert main([*flags, *extra]) == 0
        found.append(json.loads(capsys.readouterr().out)["metrics"])
    assert found[1]["domain_ppl"] == pytest.approx(found[0]["domain_ppl"], rel=1e-4)


def _streamed_against_in_memory(tmp_path: Path, tokenizer, corpus: Path, kind: str, method: str) -> tuple[dict, list]:
    """A tiny model of any transformers `kind` extracted with `method` in memory and streamed: the
    streamed manifest and the weights that differ between the two outputs."""
    src = _any_saved(tmp_path, kind, tokenizer)
    mem = extract(_recipe(src, corpus, method, False), tmp_path / "mem")
    streamed = extract(_recipe(src, corpus, method, True), tmp_path / "stream")
    assert streamed["data"]["calibration"] == mem["data"]["calibration"]
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    return streamed, [k for k in a if not torch.equal(a[k], b[k])]


def test_streamed_gradients_flow_back_through_what_blocks_hand_each_other(tmp_path: Path, tokenizer,
                                                                         small_corpus: Path) -> None:  # fmt: skip
    """ZAYA's blocks hand the next one floating router states that the next block computes with:
    the streamed gradient pass takes the loss's gradient back through them too, as the whole
    model's backward does, so Fisher (and dual-obs) streamed equals the in-memory run."""
    _, differ = _streamed_against_in_memory(tmp_path, tokenizer, small_corpus, "zaya", "fisher")
    assert not differ, differ


def test_streamed_calibration_dtype_is_read_off_a_loaded_parameter(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch
) -> None:
    """CPM-Ant lists a block's parameters before its embeddings, so a streamed skeleton's first
    parameter is on the meta device: `--calib-dtype auto` read there calibrated in float32 streamed
    and in bfloat16 in memory.  It is read off the first loaded parameter (bfloat16 made native here
    so the test means the same on any CPU)."""
    monkeypatch.setattr("carve.models.load.native_bfloat16", lambda device: torch.device(device).type == "cpu")
    streamed, differ = _streamed_against_in_memory(tmp_path, tokenizer, small_corpus, "cpmant", "sparsegpt")
    assert streamed["data"]["calibration"]["dtype"] == "bfloat16"
    assert not differ, differ


def test_weights_tied_across_blocks_are_pruned_once(tmp_path: Path, tokenizer, small_corpus: Path, capsys) -> None:
    """Zamba's shared transformer is one set of weights tied into several blocks: its Linears are
    pruned once, in the first block holding them (before: pruned again at each depth, and the
    manifest's count stopped on a KeyError), streamed as in memory; a streamed evaluation of the
    output reads the tied weights for every block holding them."""
    streamed, differ = _streamed_against_in_memory(tmp_path, tokenizer, small_corpus, "zamba", "sparsegpt")
    assert not differ, differ
    mask = load_file(tmp_path / "mem" / "mask.safetensors")
    assert any(".0.shared_transf." in k for k in mask) and not any(".2.shared_transf." in k for k in mask)
    weights = _weights(tmp_path / "mem")
    shared = [k for k in weights if ".0.shared_transf." in k and k.endswith("proj.weight")]
    assert shared and all((weights[k] == 0).float().mean() == 0.5 for k in shared)
    assert streamed["sparsity"]["linear"] == pytest.approx(0.5)
    _streamed_eval_equals_in_memory(tmp_path / "mem", small_corpus, capsys)


def test_a_forward_that_fails_under_16_bit_autocast_calibrates_in_float32(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch, capsys
) -> None:
    """A model whose forward adds a bfloat16 output into a float32 buffer (here a Llama MLP made to,
    as transformers' DBRX experts do) stops under bfloat16 autocast: `--calib-dtype auto` tries the
    forward and calibrates in float32 (said on stderr, recorded in the manifest) where a model that
    runs under it gets bfloat16; an explicit bfloat16 is refused in one line naming float32, nothing
    written (bfloat16 made native here so the test means the same on any CPU)."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr("carve.models.load.native_bfloat16", lambda device: torch.device(device).type == "cpu")
    src = _saved(tmp_path, "llama", tokenizer)
    assert extract(_recipe(src, small_corpus, "sparsegpt", False), tmp_path / "llama")["data"]["calibration"][
        "dtype"] == "bfloat16"  # fmt: skip
    forward = modeling_llama.LlamaMLP.forward

    def into_float32(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = forward(self, x)
        return torch.zeros(x.shape, dtype=torch.float32).index_add_(0, torch.arange(x.shape[0]), y)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", into_float32)
    with pytest.raises(UsageError, match=r"scalar type.*try --calib-dtype float32"):
        extract(_recipe(src, small_corpus, "sparsegpt", False, calib_dtype="bfloat16"), tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()
    capsys.readouterr()
    done = extract(_recipe(src, small_corpus, "sparsegpt", False), tmp_path / "auto")
    assert "stops under bfloat16 autocast" in capsys.readouterr().err
    assert done["data"]["calibration"]["dtype"] == "float32" and done["sparsity"]["linear"] == pytest.approx(0.5)
