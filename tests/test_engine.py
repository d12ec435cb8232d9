"""The layer-wise engine on tiny random models of several architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import carve
from carve.engines import layerwise
from carve.models import all_prunable_linears, find_blocks
from carve.scorers import RowNorms
from carve.settings import Calibration
from tests.conftest import ARCHS, VOCAB, any_tiny_config, dsa_shared_model, tiny_model


def _calib(n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _reference_norms(model: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input statistics of every prunable Linear from plain full-model forwards."""
    stats: dict[str, RowNorms] = {}
    handles = []
    for name, lin in all_prunable_linears(model).items():

        def hook(_m: nn.Module, inp: Any, _o: Any, name: str = name) -> None:
            stats.setdefault(name, RowNorms(inp[0].shape[-1])).update(inp[0])

        handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    return {k: v.norms for k, v in stats.items()}


@pytest.mark.parametrize("propagation", ["dense", "pruned", "fused"])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_feeds_each_linear_what_the_full_model_does(arch: str, propagation: str) -> None:
    """With "pruned", later batches stop each block after its last Linear's input; "fused" runs
    the model once with every Linear handed over from its pre-hook: the statistics must not
    change."""
    _feeds_what_the_model_does(tiny_model(arch), propagation)


@pytest.mark.parametrize("propagation", ["dense", "pruned", "fused"])
def test_blocks_the_model_computes_between_are_not_run_one_at_a_time(propagation: str) -> None:
    """XLM's blocks are its attention layers' list; its layer norms and feed-forward layers run in
    the model's own loop between them (and it hands them a key/value cache under use_cache=False).
    Fed from block 0's input one block at a time, block i got block i-1's output (before: wrong
    statistics from block 1 on, silently); now that is refused in one line naming --propagation
    fused, which runs the whole model and feeds every Linear what the model does."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config("xlm")).eval()
    if propagation == "fused":
        _feeds_what_the_model_does(model, propagation)
    else:
        with pytest.raises(carve.UsageError, match=r"blocks \(transformer.attentions\) do not chain.*fused"):
            layerwise(model, _calib(), lambda *_: None, RowNorms, calib=Calibration(2, propagation))


def test_a_model_that_reads_its_blocks_own_output_type_is_refused_in_one_line() -> None:
    """Reformer's reversible blocks pass a second stream and the model reads it off each block's
    own output type, so carve's stand-in blocks break its forward (before: an AttributeError
    traceback), and its blocks run inside its own autograd function, whose backward needs training
    mode (before: "element 0 of tensors does not require grad").  Both refused in one line; fused
    propagation feeds every Linear what the model does."""
    from transformers import AutoModelForCausalLM

    from carve.engines import accumulate_gradients

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config("reformer")).eval()
    with pytest.raises(carve.UsageError, match=r"does not take its blocks run one at a time.*--propagation fused"):
        layerwise(model, _calib(), lambda *_: None, RowNorms, calib=Calibration(2, "pruned"))
    names = [f"{n}.weight" for n in all_prunable_linears(model)]
    with pytest.raises(carve.UsageError, match=r"does not reach its weights through autograd.*sparsegpt"):
        accumulate_gradients(model, _calib(2), names, ("grad",))
    _feeds_what_the_model_does(model, "fused")


@pytest.mark.parametrize("propagation", ["dense", "pruned", "fused"])
def test_what_blocks_pass_each_other_besides_the_hidden_states_is_passed_on(propagation: str) -> None:
    """GLM-MoE-DSA's shared layers take the top-k indices of the last full layer, handed from block
    to block in the blocks' outputs.  Replayed from the recording, block 3 got block 0's indices,
    not block 2's (before: its Linears' statistics wrong); the engine now passes them on."""
    _feeds_what_the_model_does(dsa_shared_model(), propagation)


@pytest.mark.parametrize("model_type", ["openai-gpt", "hy_v4"])
@pytest.mark.parametrize("propagation", ["dense", "pruned"])
def test_blocks_returning_a_list_or_passing_indices_on(model_type: str, propagation: str) -> None:
    """OpenAI GPT's blocks return a list: the recording pass's stand-in blocks returned the bare
    tensor, which the model then indexed (a batch row for the hidden states: taken for blocks that
    do not chain); HunYuan v4 passes top-k indices on as GLM-MoE-DSA does."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    _feeds_what_the_model_does(AutoModelForCausalLM.from_config(any_tiny_config(model_type)).eval(), propagation)


def _feeds_what_the_model_does(model: nn.Module, propagation: str) -> None:
    calib = _calib()
    ref = _reference_norms(model, calib)
    got: dict[str, torch.Tensor] = {}

    def on_block(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        got.update({name: stats[name].norms.clone() for name in linears})

    layerwise(model, calib, on_block, RowNorms, calib=Calibration(2, propagation))  # 3 batches unless fused
    assert got.keys() == ref.keys() and len(got) >= 8
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("propagation", ["pruned", "fused"])
def test_linears_fed_the_same_input_share_one_statistic(propagation: str) -> None:
    model = tiny_model("llama")
    seen: dict[str, Any] = {}

    def on_block(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        seen.update({name.split(".", 3)[-1]: stats[name] for name in linears if ".layers.0." in name})

    layerwise(model, _calib(), on_block, RowNorms, calib=Calibration(2, propagation))
    assert seen["self_attn.q_proj"] is seen["self_attn.k_proj"] is seen["self_attn.v_proj"]
    assert seen["mlp.gate_proj"] is seen["mlp.up_proj"]
    shared = {id(seen[k]) for k in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert len(shared) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_propagation_sees_earlier_pruned_blocks(arch: str) -> None:
    """The first Linears of block i are calibrated on the outputs of the already-pruned
    blocks < i: their statistics equal those of the final pruned model."""
    model = tiny_model(arch)
    calib = _calib()
    first_in_block: dict[str, torch.Tensor] = {}

    def capture(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        name = next(iter(linears))
        first_in_block[name] = stats[name].norms.clone()

    # prune with wanda, then run the engine again on the pruned model, without pruning
    result = carve.prune(model, "wanda", 0.5, calib, calib=Calibration(4))
    layerwise(model, calib, capture, RowNorms, calib=Calibration(4, "dense"))
    ref = _reference_norms(model, calib)
    for name, norms in first_in_block.items():
        torch.testing.assert_close(norms, ref[name], rtol=1e-4, atol=1e-5)
    assert result.mask.sparsity() == pytest.approx(0.5, abs=1e-6)
    # and pruning block by block differs from pruning every block with dense inputs
    dense_scored = carve.select_mask(carve.score(tiny_model(arch), "wanda", calib), 0.5, "row")
    prefix, _ = find_blocks(model)
    later = [k for k in result.mask if k.startswith(f"{prefix}.1.")]
    assert later and any(not torch.equal(result.mask[k], dense_scored[k]) for k in later)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_propagation_calibrates_every_block_on_the_dense_model(arch: str) -> None:
    """propagation="dense": every block sees the dense model's activations, so Wanda's mask is
    exactly the one scored on the dense model in one go."""
    calib = _calib()
    result = carve.prune(tiny_model(arch), "wanda", 0.5, calib, calib=Calibration(4, "dense"))
    dense_scored = carve.select_mask(carve.score(tiny_model(arch), "wanda", calib), 0.5, "row")
    assert set(result.mask) == set(dense_scored)
    for k in dense_scored:
        assert torch.equal(result.mask[k], dense_scored[k]), k
    with pytest.raises(carve.UsageError, match="propagation 'lazy' is not one of"):
        carve.prune(tiny_model(arch), "wanda", 0.5, calib, calib=Calibration(propagation="lazy"))


def _true_sequential_sparsegpt(model: nn.Module, calib: torch.Tensor, sparsity: float) -> None:
    """SparseGPT with GPTQ's "true sequential" order, naively: every Linear in the order the
    forward calls it, its Hessian from a fresh full-model forward with all earlier Linears
    already pruned."""
    from carve.models.arch import weight_matrix
    from carve.scorers import Hessian, get_scorer

    class Stop(Exception):
        pass

    linears = all_prunable_linears(model)
    order: list[str] = []
    handles = [
        lin.register_forward_pre_hook(lambda _m, _a, n=name: None if n in order else order.append(n))
        for name, lin in linears.items()
    ]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    assert sorted(order) == sorted(linears)
    for name in order:
        stat = Hessian(weight_matrix(linears[name]).shape[1])

        def grab(_m: nn.Module, args: Any, stat: Hessian = stat) -> None:
            stat.update(args[0])
            raise Stop

        handle = linears[name].register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                model(input_ids=calib, use_cache=False)
        except Stop:
            pass
        handle.remove()
        W = weight_matrix(linears[name])
        with torch.no_grad():
            W.copy_(get_scorer("sparsegpt").prune_weight(W, stat, sparsity, "matrix", None)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_propagation_is_true_sequential_sparsegpt_in_one_pass(arch: str) -> None:
    calib = _calib()
    fused = tiny_model(arch)
    res = carve.prune(fused, "sparsegpt", 0.5, calib, calib=Calibration(propagation="fused"))
    ref = tiny_model(arch)
    _true_sequential_sparsegpt(ref, calib, 0.5)
    got, expected = dict(fused.named_parameters()), dict(ref.named_parameters())
    for n in res.mask:
        torch.testing.assert_close(got[n], expected[n])
    assert res.mask.sparsity() == pytest.approx(0.5, abs=1e-6)
    # block by block ("pruned") calibrates a block's later Linears on its dense earlier ones
    blockwise = tiny_model(arch)
    carve.prune(blockwise, "sparsegpt", 0.5, calib, calib=Calibration(propagation="pruned"))
    first = next(iter(res.mask))
    torch.testing.assert_close(dict(blockwise.named_parameters())[first], got[first])  # same inputs
    assert any(not torch.allclose(dict(blockwise.named_parameters())[n], got[n]) for n in res.mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("method", "pattern"), [("sparsegpt", None), ("sparsegpt", "2:4"), ("wanda", "2:4"), ("magnitude", None)]
)
def test_prune_reaches_exact_sparsity_and_model_still_runs(arch: str, method: str, pattern: str | None) -> None:
    model = tiny_model(arch)
    calib = _calib()
    res = carve.prune(model, method, None if pattern else 0.5, calib, pattern=pattern)
    params = dict(model.named_parameters())
    for name, keep in res.mask.items():
        assert keep.shape == params[name].shape
        assert torch.equal(params[name].detach() == 0, ~keep) or (params[name][~keep] == 0).all()
    assert res.mask.sparsity() == pytest.approx(0.5, abs=1e-6)
    if pattern:
        for name, keep in res.mask.items():
            rows = keep if isinstance(dict(model.named_modules())[name[:-7]], nn.Linear) else keep.t()
            assert (rows.reshape(rows.shape[0], -1, 4).sum(-1) == 2).all()
    with torch.no_grad():
        out = model(input_ids=calib[:1], use_cache=False).logits
    assert torch.isfinite(out).all()


def test_gemma3_gets_a_different_mask_per_layer_type() -> None:
    """Sliding-window and global layers receive different attention masks; the engine must
    replay each block's own call, not block 0's."""
    model = tiny_model("gemma3")
    calib = _calib(n=2, length=24)
    from carve.engines.layerwise import capture_inputs

    _, blocks = find_blocks(model)
    _, calls = capture_inputs(model, blocks, [calib])
    (per_block,) = calls.values()
    masks = [c[1].get("attention_mask") for c in per_block]
    assert masks[0] is not None  # the sliding-window layer gets an explicit banded mask
    assert masks[1] is None or not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("kind, linears", [("roberta-prelayernorm", 6), ("dbrx", 2)])
def test_default_exclusions_name_what_a_linear_is_not_where_it_sits(kind: str, linears: int) -> None:
    """The default `*norm*` exclusion (norms are never pruned) is matched against a Linear's own
    name: RoBERTa-PreLayerNorm's every module sits under `roberta_prelayernorm.`, DBRX's attention
    under `norm_attn_norm.attn` (a module holding both norms and the attention), and their Linears
    are pruned (before: "no Linear layers to prune"); a pattern the user gives still matches full
    names."""
    from transformers import AutoModelForCausalLM

    from carve.settings import Targets

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config(kind)).eval()
    prefix, blocks = find_blocks(model)
    found = all_prunable_linears(model)
    assert len(found) == linears * len(blocks) and all(n.startswith(prefix) for n in found)
    assert any("norm" in n.removeprefix(prefix) or "norm" in prefix for n in found)
    everything = f"{prefix.split('.')[0]}.*"
    with pytest.raises(carve.UsageError, match="no Linear layers"):
        all_prunable_linears(model, exclude=(everything,))
    carve.prune(model, "magnitude", 0.5, targets=Targets())
    assert all((m.weight == 0).float().mean() == 0.5 for m in found.values())


def test_no_blocks_is_a_usage_error() -> None:
    with pytest.raises(carve.UsageError, match="no decoder blocks found"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_global_granularity_ranks_all_layers_together() -> None:
    model = tiny_model("llama")
    res = carve.prune(model, "wanda", 0.5, _calib(), granularity="global")
    per_layer = res.mask.sparsity_per_param()
    assert res.mask.sparsity() == pytest.approx(0.5, abs=1e-6)
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # layers are not forced equal
    with pytest.raises(carve.UsageError, match="prunes and updates weights block by block"):
        carve.prune(tiny_model("llama"), "sparsegpt", 0.5, _calib(), granularity="global")


class _Recorded(RowNorms):
    """RowNorms that also records the dtype it is fed and whether autocast was on."""

    seen: ClassVar[list[tuple[torch.dtype, bool]]] = []

    def update(self, x: torch.Tensor) -> None:
        _Recorded.seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        super().update(x)


@pytest.mark.parametrize("propagation", ["dense", "fused"])
def test_bfloat16_calibration_feeds_what_the_model_computes_under_autocast(propagation: str) -> None:
    """calib_dtype=bfloat16 on a float32 model: each Linear's statistic gets the input the full
    model computes under autocast (bfloat16 where a matmul produced it), and updates outside
    autocast; the weights stay float32."""
    model = tiny_model("llama")
    calib = _calib()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference_norms(model, calib)
    fp32 = _reference_norms(model, calib)
    got: dict[str, torch.Tensor] = {}
    autocast_in_on_block: list[bool] = []

    def on_block(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        autocast_in_on_block.append(torch.is_autocast_enabled("cpu"))
        got.update({name: stats[name].norms.clone() for name in linears})

    _Recorded.seen = []
    layerwise(model, calib, on_block, _Recorded, calib=Calibration(2, propagation, torch.bfloat16))
    assert got.keys() == ref.keys()
    assert not any(on for _d, on in _Recorded.seen) and not any(autocast_in_on_block)
    assert {d for d, _on in _Recorded.seen} == {torch.bfloat16, torch.float32}  # o/down; the norms' outputs
    off = 0.0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=2e-2, atol=1e-3)
        off = max(off, ((got[name] - fp32[name]).abs() / fp32[name].abs().clamp_min(1e-3)).max().item())
    assert off > 1e-4  # the statistics did come from bfloat16 activations, not float32 ones
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("propagation", ["pruned", "fused"])
def test_hessians_multiply_in_the_calibration_s_products_dtype(propagation: str) -> None:
    """Calibration.products reaches every Hessian the engine builds; a statistic without products
    (Wanda's RowNorms) is built as before."""
    from carve.scorers import Hessian

    model, calib = tiny_model("llama"), _calib()
    for products in (None, torch.bfloat16):
        seen: set[torch.dtype] = set()
        settings = Calibration(2, propagation, torch.bfloat16, products=products)
        layerwise(model, calib, lambda _i, lin, st, seen=seen: seen.update(st[n].products for n in lin), Hessian,
                  calib=settings)  # fmt: skip
        assert seen == {products or torch.float32}
        layerwise(model, calib, lambda _i, lin, st: None, RowNorms, calib=settings)


@pytest.mark.parametrize("propagation", ["pruned", "fused"])
def test_bfloat16_calibrated_sparsegpt_is_close_to_float32(propagation: str) -> None:
    """The bfloat16-calibrated SparseGPT model differs from the float32-calibrated one by much
    less than pruning changed the model, at the same exact sparsity, with float32 weights."""
    calib = _calib(n=8, length=32)
    dense = tiny_model("llama")
    with torch.no_grad():
        ref_out = dense(input_ids=calib, use_cache=False).logits
    outs = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_model("llama")
        res = carve.prune(model, "sparsegpt", 0.5, calib, calib=Calibration(propagation=propagation, dtype=dtype))
        assert res.mask.sparsity() == pytest.approx(0.5, abs=1e-6)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            outs[dtype] = model(input_ids=calib, use_cache=False).logits
    pruning = (outs[None] - ref_out).norm()
    assert 0 < (outs[torch.bfloat16] - outs[None]).norm() < 0.3 * pruning  # 0.18-0.20 here


def test_calibration_dtype_must_be_lower_than_the_model_s() -> None:
    from carve.engines.layerwise import check_calib_dtype
    from carve.errors import UsageError

    assert check_calib_dtype(torch.float32, torch.bfloat16) == torch.bfloat16
    assert check_calib_dtype(torch.float32, torch.float32) is None
    assert check_calib_dtype(torch.bfloat16, torch.bfloat16) is None
    with pytest.raises(UsageError, match="not a lower precision than the model's bfloat16"):
        check_calib_dtype(torch.bfloat16, torch.float32)
    with pytest.raises(UsageError, match="not a lower precision"):
        check_calib_dtype(torch.float16, torch.bfloat16)


def test_auto_calibration_dtype_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import carve.models.load as load

    model = tiny_model("llama")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(load, "native_bfloat16", lambda _d, n=native: n)
        assert load.resolve_calib_dtype("auto", model) == expected
    assert load.resolve_calib_dtype("float16", model) == torch.float16
    monkeypatch.setattr(load, "native_bfloat16", lambda _d: True)
    assert load.resolve_calib_dtype("auto", model.to(torch.bfloat16)) == torch.bfloat16  # the model's own


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recording_block_calls_runs_no_block_but_the_first(arch: str) -> None:
    """The calls are recorded with blocks 1.. passing their input through (their maths is not
    needed), then every block's own forward is back."""
    from carve.engines.layerwise import capture_inputs

    model = tiny_model(arch)
    _prefix, blocks = find_blocks(model)
    ran: list[str] = []
    handles = [
        lin.register_forward_pre_hook(lambda _m, _a, name=name: ran.append(name))
        for name, lin in all_prunable_linears(model).items()
    ]
    calib = _calib()
    _hidden, calls = capture_inputs(model, blocks, list(calib.split(2)))
    for h in handles:
        h.remove()
    assert ran and all(".0." in name for name in ran)
    assert len(calls[(2, calib.shape[1])]) == len(blocks)
    assert all("forward" not in b.__dict__ for b in blocks)


def test_the_manifest_names_the_block_weights_left_dense() -> None:
    """Weight matrices of the blocks that are not pruned, by name and share of the blocks' parameters:
    an MoE's router (not a Linear layer; its experts are pruned one by one, tests/test_moe.py) and
    what the targets leave out, its fused 3-D experts too."""
    from carve.models.arch import DEFAULT_EXCLUDE
    from carve.settings import Targets

    moe = tiny_model("mixtral")
    blocks = sum(p.numel() for n, p in moe.named_parameters() if n.startswith("model.layers."))
    router = sum(p.numel() for n, p in moe.named_parameters() if n.endswith("mlp.gate.weight"))
    dense = carve.prune(moe, "magnitude", 0.5).describe(moe)["sparsity"]["not_pruned_in_blocks"]
    assert dense == {"model.layers.*.mlp.gate.weight": round(router / blocks, 4)}
    moe = tiny_model("mixtral")
    no_experts = Targets(exclude=(*DEFAULT_EXCLUDE, "*experts*"))
    dense = carve.prune(moe, "magnitude", 0.5, targets=no_experts).describe(moe)["sparsity"]["not_pruned_in_blocks"]
    assert {"model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj"} <= set(dense)
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    share = dense["model.layers.*.mlp.experts.gate_up_proj"] + dense["model.layers.*.mlp.experts.down_proj"]
    assert share == pytest.approx(experts / blocks, abs=2e-4)
    llama = tiny_model("llama")
    assert carve.prune(llama, "magnitude", 0.5).describe(llama)["sparsity"]["not_pruned_in_blocks"] == {}
    targets = Targets(exclude=(*DEFAULT_EXCLUDE, "*o_proj*"))
    left = carve.prune(llama, "magnitude", 0.5, targets=targets).describe(llama)["sparsity"]["not_pruned_in_blocks"]
    o_proj = sum(p.numel() for n, p in llama.named_parameters() if "o_proj" in n)
    in_blocks = sum(p.numel() for n, p in llama.named_parameters() if n.startswith("model.layers."))
    assert left == {"model.layers.*.self_attn.o_proj.weight": round(o_proj / in_blocks, 4)}


def test_rounds_take_the_linears_last_called_first_within_the_budget() -> None:
    """A block's Linears parted into rounds in the reverse of their call order, those that share an
    input together, each round's statistics within the budget; everything at once when it fits."""
    from carve.engines.layerwise import capture_inputs, rounds
    from carve.models import prunable_linears
    from carve.scorers import Hessian

    model = tiny_model("llama")
    prefix, blocks = find_blocks(model)
    hidden, calls = capture_inputs(model, blocks, [_calib(2)])
    linears = prunable_linears(blocks[0], f"{prefix}.0", ("*",), ())
    call = calls[(2, 24)][0]
    short = lambda parts: [sorted(n.split(".")[-1] for n in p) for p in parts]  # noqa: E731
    assert short(rounds(blocks[0], linears, hidden, call, Hessian.nbytes, 0)) == [
        ["down_proj"], ["gate_proj", "up_proj"], ["o_proj"], ["k_proj", "q_proj", "v_proj"]]  # fmt: skip
    h, i = model.config.hidden_size, model.config.intermediate_size
    two = Hessian.nbytes(h) * 2  # room for two of the hidden-wide statistics
    assert short(rounds(blocks[0], linears, hidden, call, Hessian.nbytes, Hessian.nbytes(i) + two)) == [
        ["down_proj", "gate_proj", "o_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"]]  # fmt: skip
    everything = Hessian.nbytes(i) + 6 * Hessian.nbytes(h)  # without sharing: no pass needed to see it fits
    assert rounds(blocks[0], linears, hidden, call, Hessian.nbytes, everything)[0] is linears


def _pruned(model: nn.Module, method: str, calib: torch.Tensor, settings: Calibration):
    result = carve.prune(model, method, 0.5, calib, calib=settings)
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "arch, method, propagation",
    [("llama", "sparsegpt", "pruned"), ("llama", "sparsegpt", "dense"), ("gpt2", "sparsegpt", "pruned"),
     ("gemma3", "wanda", "pruned"), ("mixtral", "sparsegpt", "pruned"), ("qwen2_moe", "sparsegpt", "dense"),
     ("gpt_oss", "sparsegpt", "pruned")],
)  # fmt: skip
def test_calibrating_in_rounds_gives_the_same_masks_and_weights(
    arch: str, method: str, propagation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statistics budget so small that every Linear group is a round of its own (an MoE block: one
    round per expert matrix): each block is calibrated again per round, and the masks and weights
    are the one-round run's bit for bit."""
    import importlib

    from tests.test_moe import MOE, moe_model

    engine = importlib.import_module("carve.engines.layerwise")
    make = (lambda: moe_model(arch)) if arch in MOE else (lambda: tiny_model(arch))
    vocab = 128 if arch in MOE else VOCAB
    calib = torch.randint(0, vocab, (6, 16), generator=torch.Generator().manual_seed(0))
    seen: list[int] = []
    real = engine.rounds

    def counted(*args: Any) -> Any:
        parts = real(*args)
        seen.append(len(parts))
        return parts

    one, one_weights = _pruned(make(), method, calib, Calibration(2, propagation))
    monkeypatch.setattr(engine, "rounds", counted)
    parted, parted_weights = _pruned(make(), method, calib, Calibration(2, propagation, statistics_memory=0))
    assert parted.engine_seconds is not None and parted.engine_seconds["most_rounds"] == max(seen) >= 4
    assert "most_rounds" not in (one.engine_seconds or {})
    assert sorted(one.mask.keys()) == sorted(parted.mask.keys())
    assert all(torch.equal(one.mask[k], parted.mask[k]) for k in one.mask.keys())
    assert all(torch.equal(one_weights[k], parted_weights[k]) for k in one_weights)


@pytest.mark.parametrize("model_type", ["jamba", "olmo_hybrid"])
def test_a_hybrid_whose_layers_are_of_two_classes_is_pruned_block_by_block(model_type: str) -> None:
    """Jamba's attention and Mamba layers, OLMo-Hybrid's attention and gated-delta-net layers, are
    two decoder-layer classes in one ModuleList: they are the blocks (the config counts them), and
    the block-by-block engine calls each with its own recorded arguments, so Wanda on dense
    propagation selects exactly the mask scored on the whole model in one go."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import any_tiny_config

    def model() -> nn.Module:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(any_tiny_config(model_type)).eval()

    prefix, blocks = find_blocks(model())
    assert prefix == "model.layers" and len(blocks) == 3 and len({type(b) for b in blocks}) == 2
    calib = _calib(n=4)
    result = carve.prune(model(), "wanda", 0.5, calib, calib=Calibration(2, "dense"))
    whole = carve.select_mask(carve.score(model(), "wanda", calib), 0.5, "row")
    assert set(result.mask) == set(whole) and {k.split(".")[2] for k in whole} == {"0", "1", "2"}
    assert all(torch.equal(result.mask[k], whole[k]) for k in whole)
    # Jamba's Mamba layers read dt_proj's weight without calling it: no input reaches its statistic,
    # which reads as the identity (pruned by magnitude, by SparseGPT too), and the manifest says so
    never = [f"model.layers.{i}.mamba.dt_proj.weight" for i in (0, 1)] if model_type == "jamba" else []
    for method in ("wanda", "sparsegpt"):
        m = model()
        result = carve.prune(m, method, 0.5, calib)
        assert result.describe(m)["method_notes"]["without_calibration_input"] == never
        for name in never:  # the larger half kept unchanged: of each row (Wanda), of the matrix (SparseGPT's
            # selection over a block of columns, here all of them)
            W, orig = m.get_parameter(name).detach(), model().get_parameter(name).detach()
            kept = W != 0
            assert torch.equal(W[kept], orig[kept]) and kept.sum() == W.numel() // 2
            dim = 1 if method == "wanda" else None
            small = orig.abs().masked_fill(~kept, float("inf")).amin(dim)
            assert (small >= orig.abs().masked_fill(kept, 0).amax(dim)).all(), (method, name)


@pytest.mark.parametrize(
    ("model_type", "prefix"),
    [("phi4_multimodal", "model.layers"), ("git", "git.encoder.layer"), ("llama", "model.layers")],
)
def test_the_blocks_are_the_list_the_config_counts_not_a_deeper_tower(model_type: str, prefix: str) -> None:
    """A tiny Phi-4-multimodal's vision tower (27 layers) and GIT's image encoder (12) are longer than
    the 3-block text model: the blocks are the list `num_hidden_layers` counts, not the longest."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import any_tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(any_tiny_config(model_type))
    assert find_blocks(model)[0] == prefix


def test_the_cli_names_the_matrices_no_calibration_input_reached(
    tmp_path: Path, tokenizer, small_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`carve extract` on a saved Jamba: its Mamba layers' dt_proj, whose weight they read without
    calling it, is pruned by magnitude; the manifest lists it and the CLI says so on stderr."""
    from transformers import AutoModelForCausalLM

    from carve.cli.main import main
    from tests.conftest import any_tiny_config

    src, out = tmp_path / "jamba", tmp_path / "out"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(any_tiny_config("jamba")).save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["extract", str(src), "--domain", str(small_corpus), "--general", str(small_corpus), "--method",
            "sparsegpt", "--sparsity", "0.5", "--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2",
            "--cloze-items", "0", "--no-speed", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    notes = json.loads((out / "carve.json").read_text())["method_notes"]
    assert notes["without_calibration_input"] == [f"model.layers.{i}.mamba.dt_proj.weight" for i in (0, 1)]
    err = capsys.readouterr().err
    assert "no calibration input reached" in err and "model.layers.N.mamba.dt_proj.weight" in err
