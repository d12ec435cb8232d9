"""Mixture-of-experts models whose experts transformers fuses into 3-D tensors: each expert pruned as
its own Linear, on the tokens routed to it (carve.models.experts)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import carve
from carve.models.experts import fused_experts, unfused

MOE = {  # transformers class, config class, MoE settings; gpt-oss: [E, in, out] with biases, gate/up interleaved
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", {"num_local_experts": 4}),
}  # fmt: skip
# Llama 4: [E, in, out] experts outside transformers' experts interface, called on tokens already routed
LLAMA4 = ("Llama4ForCausalLM", "Llama4TextConfig", {"num_local_experts": 4, "intermediate_size_mlp": 64,
                                                    "interleave_moe_layer_step": 1})  # fmt: skip


def moe_model(arch: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    cls, config, extra = {**MOE, "llama4_text": LLAMA4}[arch]
    cfg = getattr(transformers, config)(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, pad_token_id=None, bos_token_id=None,
        eos_token_id=None, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():  # weights large enough that routing and pruning matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _ids(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(MOE))
def test_unfused_experts_compute_as_the_model_and_share_its_weights(arch: str) -> None:
    model = moe_model(arch)
    names = [n for n, _ in model.named_parameters()]
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        with unfused(model) as experts:
            assert len(experts.modules) == 2 and not fused_experts(model)  # one per block
            inside = model(ids).logits
            for e in range(4):  # views: written into the 3-D tensor
                model.get_submodule(f"model.layers.1.mlp.experts.{e}.down_proj").weight[0, 3] = 7.0
        after = model(ids).logits
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=0)
    assert [n for n, _ in model.named_parameters()] == names  # the model as it was
    fused = model.get_submodule("model.layers.1.mlp.experts")
    row, col = (3, 0) if fused.is_transposed else (0, 3)
    assert fused.down_proj[2, row, col].item() == 7.0
    assert not torch.equal(after, before)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_fold_is_the_inverse_of_unfold(arch: str) -> None:
    model = moe_model(arch)
    with unfused(model) as experts:
        per_param = {n: torch.randn(p.shape) for n, p in model.get_submodule("model.layers.0.mlp.experts").fused
                     .named_parameters(prefix="model.layers.0.mlp.experts") if not n.endswith("bias")}  # fmt: skip
        per_linear = experts.unfold(per_param)
        w = model.get_submodule("model.layers.0.mlp.experts.1.gate_up_proj").weight
        assert per_linear["model.layers.0.mlp.experts.1.gate_up_proj.weight"].shape == w.shape  # [out, in]
        back = experts.fold(per_linear, True)
    assert back.keys() == per_param.keys()
    assert all(torch.equal(back[k], per_param[k]) for k in per_param)


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it() -> None:
    """Wanda's masks of block 0's experts against a direct computation: |W|·‖X_j‖ over the tokens the
    router sent to that expert (gate_up: the block's MoE input; down: act(gate)·up of those tokens)."""
    model = moe_model("mixtral")
    ids = _ids()
    fused = model.get_submodule("model.layers.0.mlp.experts")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = fused.register_forward_pre_hook(lambda _m, args: seen.append((args[0].detach(), args[1].detach())))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x, index = seen[0]
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    result = carve.prune(model, "wanda", 0.5, ids)
    for e in range(4):
        xe = x[(index == e).any(-1)]
        assert 0 < len(xe) < len(x)
        h = xe @ gate_up[e].t()
        g, u = h.chunk(2, dim=-1)
        for name, W, inputs in (("gate_up_proj", gate_up[e], xe), ("down_proj", down[e], fused.act_fn(g) * u)):
            score = W.abs() * inputs.pow(2).sum(0).sqrt()
            keep = torch.zeros_like(W, dtype=torch.bool).scatter_(1, score.topk(W.shape[1] // 2, dim=1).indices, True)
            assert torch.equal(result.mask[f"model.layers.0.mlp.experts.{name}"][e], keep), (e, name)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4_text"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dual-obs"])
def test_every_method_prunes_each_expert(arch: str, method: str) -> None:
    model = moe_model(arch)
    extra = {"general_calibration": _ids(seed=2)} if method == "dual-obs" else {}
    result = carve.prune(model, method, 0.5, _ids(), **extra)
    moe = "feed_forward" if arch == "llama4_text" else "mlp"
    for i in range(2):
        fused = model.get_submodule(f"model.layers.{i}.{moe}.experts")
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.{moe}.experts.{proj}"
            W = getattr(fused, proj)
            assert result.mask[name].shape == W.shape  # keyed and shaped as the model's own parameter
            assert torch.equal(~result.mask[name], W == 0)
            for e in range(4):
                assert (W[e] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), (name, e)
    left = result.describe(model)["sparsity"]["not_pruned_in_blocks"]
    assert set(left) == {f"model.layers.*.{moe}.{'gate' if arch == 'mixtral' else 'router'}.weight"}  # the router
    assert result.experts is not None
    assert result.experts["unfused"] == [f"model.layers.{i}.{moe}.experts" for i in (0, 1)]


def test_llama4_experts_are_called_on_the_tokens_routed_to_them() -> None:
    """Llama 4's experts module takes every token once per expert, scaled by that expert's routing
    weight (zero outside its top-k): unfused, each expert's Linears are called on its rows that are
    not zero, the model computes what it did, and the Linears are views of the [E, in, out] tensors."""
    model = moe_model("llama4_text")
    ids = _ids()
    fused = model.get_submodule("model.layers.0.feed_forward.experts")
    given: list[torch.Tensor] = []
    hook = fused.register_forward_pre_hook(lambda _m, args: given.append(args[0].detach()))
    with torch.no_grad():
        before = model(ids).logits
    hook.remove()
    routed = given[0].view(4, -1, 32)  # [experts, tokens, hidden]
    with torch.no_grad(), unfused(model) as experts:
        assert list(experts.modules) == [f"model.layers.{i}.feed_forward.experts" for i in (0, 1)]
        seen: dict[int, torch.Tensor] = {}
        hooks = [
            model.get_submodule(f"model.layers.0.feed_forward.experts.{e}.gate_up_proj").register_forward_pre_hook(
                lambda _m, args, e=e: seen.setdefault(e, args[0])
            )
            for e in range(4)
        ]
        inside = model(ids).logits
        for h in hooks:
            h.remove()
        model.get_submodule("model.layers.1.feed_forward.experts.2.down_proj").weight[0, 3] = 7.0  # [out, in]
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=0)
    for e in range(4):
        rows = routed[e][routed[e].ne(0).any(-1)]
        assert 0 < len(rows) < routed.shape[1] and torch.equal(seen[e], rows), e
    assert model.get_submodule("model.layers.1.feed_forward.experts").down_proj[2, 3, 0].item() == 7.0  # [in, out]


@pytest.mark.parametrize("arch", ["phimoe", "llama4_text"])
def test_a_router_that_is_a_linear_stays_dense(arch: str) -> None:
    """PhiMoE's and Llama 4's routers subclass nn.Linear: carve keeps them dense as it keeps every
    MoE's router (pruning one reroutes tokens), while the other Linears are pruned."""
    from transformers import AutoModelForCausalLM

    from carve.models.arch import find_blocks, routers
    from tests.conftest import any_tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config(arch, layers=2)).eval()
    name = {"phimoe": "mlp.router", "llama4_text": "feed_forward.router"}[arch]
    before = {i: model.get_submodule(f"model.layers.{i}.{name}").weight.clone() for i in (0, 1)}
    _, blocks = find_blocks(model)
    assert [n for n, m in blocks[0].named_modules() if id(m) in routers(blocks[0])] == [name]
    carve.prune(model, "magnitude", 0.5, torch.randint(3, 100, (2, 16)))
    for i in (0, 1):
        assert torch.equal(model.get_submodule(f"model.layers.{i}.{name}").weight, before[i])
        q = model.get_submodule(f"model.layers.{i}.self_attn.q_proj").weight
        assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_a_shared_experts_projection_as_wide_as_the_expert_count_is_no_router() -> None:
    """GLM-4-MoE-Lite's tiny config has 64 experts and hidden size 64: its shared expert's down_proj
    has one output per expert, yet it sits among other Linears, so it is pruned, not kept as a router."""
    from transformers import AutoModelForCausalLM

    from carve.models.arch import all_prunable_linears, find_blocks, routers
    from tests.conftest import any_tiny_config

    model = AutoModelForCausalLM.from_config(any_tiny_config("glm4_moe_lite", layers=2))
    _, blocks = find_blocks(model)
    assert not routers(blocks[1])
    assert "model.layers.1.mlp.shared_experts.down_proj" in all_prunable_linears(model)


def test_n_m_runs_along_each_experts_input_dimension() -> None:
    """2:4 in the [E, in, out] layout of gpt-oss: every 4 consecutive inputs of an output keep 2."""
    model = moe_model("gpt_oss")
    result = carve.prune(model, "sparsegpt", None, _ids(), pattern="2:4")
    keep = result.mask["model.layers.0.mlp.experts.gate_up_proj"]  # [E, in, out]
    groups = keep.transpose(1, 2).reshape(4, keep.shape[2], -1, 4)
    assert (groups.sum(-1) == 2).all()


def test_a_saved_importance_map_selects_each_expert_and_is_reused(tmp_path: Path) -> None:
    """A map saved from an MoE is keyed by the fused [E, in, out] tensors of gpt-oss: `select_mask` on
    it keeps half of each expert's output rows (not half of the stacked tensor, nor along its stored
    rows), and pruning with it reused gives that mask."""
    imp = carve.score(moe_model("gpt_oss"), "wanda", _ids())
    imp.save(tmp_path / "importance.safetensors")
    loaded = carve.ImportanceMap.load(tmp_path / "importance.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert loaded[name].dim() == 3 and name in loaded.meta["transposed"]
    for granularity in ("row", "matrix"):
        keep = carve.select_mask(loaded, 0.5, granularity)[name]  # [E, in, out]
        per_expert = keep.float().mean(dim=(1, 2))
        assert torch.equal(per_expert, torch.full((4,), 0.5)), granularity
        if granularity == "row":
            assert (keep.sum(1) == keep.shape[1] // 2).all()  # each output's inputs halved
    pattern = carve.select_mask(loaded, None, pattern="2:4")[name]
    assert (pattern.transpose(1, 2).reshape(4, pattern.shape[2], -1, 4).sum(-1) == 2).all()
    model = moe_model("gpt_oss")
    result = carve.prune(model, "wanda", 0.5, _ids(), importance=loaded)
    assert torch.equal(result.mask[name], carve.select_mask(loaded, 0.5)[name])  # the same choice per expert
    assert torch.equal(~result.mask[name], model.get_submodule("model.layers.0.mlp.experts").gate_up_proj == 0)


def test_a_layerwise_mask_stays_bit_packed_when_folded() -> None:
    """SparseGPT's and Wanda's masks are kept bit-packed as they come (PackedKeep); folding the
    experts' into 3-D tensors keeps them packed, with the same bits as an unpacked fold."""
    from carve.masks.mask import PackedKeep

    model = moe_model("mixtral")
    result = carve.prune(model, "sparsegpt", 0.5, _ids())
    assert isinstance(result.mask.keep, PackedKeep)
    for name, keep in result.mask.items():
        W = model.get_parameter(name)
        assert keep.shape == W.shape and torch.equal(~keep, W == 0), name


def test_an_expert_given_no_token_is_pruned_by_magnitude() -> None:
    """An expert the router never picks has no inputs to weigh its weights by: its statistic reads as
    the identity, so SparseGPT keeps its largest weights unchanged (without it: every input 'dead',
    the whole expert zeroed), and the manifest names it."""
    model = moe_model("gpt_oss")
    with torch.no_grad():
        for i in range(2):
            model.get_submodule(f"model.layers.{i}.mlp.router").bias[3] = -1e4
    W = model.get_submodule("model.layers.1.mlp.experts").down_proj[3].detach().clone()  # [in, out]
    result = carve.prune(model, "sparsegpt", 0.5, _ids())
    after = model.get_submodule("model.layers.1.mlp.experts").down_proj[3]
    keep = after != 0
    assert keep.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(after[keep], W[keep])  # no compensation: nothing to compensate with
    assert W[keep].abs().min() >= W[~keep].abs().max()  # the largest kept
    assert result.experts is not None
    assert result.experts["without_calibration_tokens"] == [f"model.layers.{i}.mlp.experts.3" for i in (0, 1)]


def test_the_statistics_of_no_tokens_read_as_the_identity() -> None:
    from carve.scorers.stats import Hessian, RowNorms

    h, r = Hessian(5), RowNorms(5)
    h.update(torch.zeros(0, 5))
    r.update(torch.zeros(0, 5))
    assert torch.equal(h.H, torch.eye(5)) and torch.equal(r.sq, torch.ones(5))


def test_extract_and_recover_an_moe_from_the_command_line(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """`carve extract` on a saved Mixtral: the output loads with stock from_pretrained with each expert
    half zeros, its mask keyed by the fused tensors; `carve recover` trains it and keeps those zeros."""
    from transformers import AutoModelForCausalLM

    from carve.cli.main import main
    from tests.conftest import tiny_model

    src = tmp_path / "moe"
    tiny_model("mixtral").save_pretrained(src)
    tokenizer.save_pretrained(src)
    fast = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed"]
    out = tmp_path / "out"
    assert main(["extract", "--model", str(src), "--domain", str(small_corpus), "--general", "general",
                 "--method", "sparsegpt", "--sparsity", "0.5", "--out", str(out), *fast]) == 0  # fmt: skip
    manifest = json.loads((out / "carve.json").read_text())
    assert manifest["sparsity"]["linear"] == pytest.approx(0.5, abs=1e-3)
    assert set(manifest["sparsity"]["not_pruned_in_blocks"]) == {"model.layers.*.mlp.gate.weight"}
    assert manifest["experts"]["unfused"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    experts = loaded.get_submodule("model.layers.0.mlp.experts").gate_up_proj
    assert all((experts[e] == 0).float().mean().item() == pytest.approx(0.5, abs=0.01) for e in range(4))
    mask = carve.Mask.load(out / "mask.safetensors")
    assert torch.equal(~mask["model.layers.0.mlp.experts.gate_up_proj"], experts == 0)
    rec = tmp_path / "rec"
    assert main(["recover", str(out), "--domain", str(small_corpus), "--steps", "2", "--block-len", "32",
                 "--eval-blocks", "2", "--lr", "1e-3", "--out", str(rec), "--quiet"]) == 0  # fmt: skip
    trained = AutoModelForCausalLM.from_pretrained(rec).get_submodule("model.layers.0.mlp.experts").gate_up_proj
    assert torch.equal(trained == 0, experts == 0) and not torch.equal(trained, experts)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_importance_sources_score_each_expert_and_read_a_reference_per_expert(arch: str) -> None:
    """The registry's sources (what finetune, unlearn and merge select with) see each expert as a
    Linear: a task vector against a reference model is |Δ| of the fused tensors, in their layout."""
    from carve.importance import compute_importance, low_rank

    base, tuned = moe_model(arch, seed=0), moe_model(arch, seed=0)
    with torch.no_grad():
        tuned.get_submodule("model.layers.1.mlp.experts").down_proj[2].add_(1.0)
    tv = compute_importance("task-vector", tuned, reference=base)
    name = "model.layers.1.mlp.experts.down_proj"
    delta = (tuned.get_parameter(name) - base.get_parameter(name)).abs()
    assert torch.equal(tv[name], delta) and tv[name][[0, 1, 3]].max() == 0.0
    torch.testing.assert_close(tv[name][2], torch.ones_like(tv[name][2]))  # only expert 2 moved
    lift = compute_importance("lift", tuned, rank=2)  # each expert's own rank-2 approximation
    W = tuned.get_parameter(name)[0]
    W = W.t() if arch == "gpt_oss" else W
    expected = low_rank(W.detach(), 2).abs()
    torch.testing.assert_close(lift[name][0], expected.t() if arch == "gpt_oss" else expected)


def test_finetune_and_unlearn_update_the_experts_inside_their_masks(
    tmp_path: Path, tokenizer, small_corpus: Path
) -> None:
    """A sparse fine-tune (Fisher, 10%) and a masked unlearning run (SalUn, 10%) on a saved Mixtral
    train entries of every expert and leave every entry outside their masks bitwise unchanged."""
    from transformers import AutoModelForCausalLM

    from carve.cli.main import main
    from tests.conftest import tiny_model

    src = tmp_path / "moe"
    tiny_model("mixtral").save_pretrained(src)
    tokenizer.save_pretrained(src)
    fast = ["--steps", "2", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet"]
    assert main(["finetune", str(src), "--domain", str(small_corpus), "--trainable", "fisher", "--density", "0.1",
                 "--lr", "1e-3", "--out", str(tmp_path / "ft"), *fast]) == 0  # fmt: skip

    def fused(path: Path) -> torch.Tensor:
        return AutoModelForCausalLM.from_pretrained(path).get_submodule("model.layers.0.mlp.experts").gate_up_proj

    before, after = fused(src), fused(tmp_path / "ft")
    moved = after != before
    for e in range(4):  # every expert trained, on at most its own 10%
        assert 0 < moved[e].float().mean().item() <= 0.1 + 1e-3, e
    was, now = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (src, tmp_path / "ft"))
    untargeted = [k for k in was if not k.endswith("proj.weight") and not k.endswith(("gate_up_proj", "down_proj"))]
    assert any(k.endswith("mlp.gate.weight") for k in untargeted)  # the router among them
    assert all(torch.equal(was[k], now[k]) for k in untargeted)
    manifest = json.loads((tmp_path / "ft" / "carve.json").read_text())
    assert manifest["trainable"]["matrices"] == 2 * 6  # per block: q, k, v, o and the 2 fused expert tensors
    docs = carve.Corpus("legal").documents[:24]
    parts = {"forget": docs[:4], "retain": docs[4:20], "holdout": docs[20:24]}
    for name, ds in parts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d[:2500]}) + "\n" for d in ds))
    assert main(["unlearn", str(src), *(x for n in parts for x in (f"--{n}", str(tmp_path / f"{n}.jsonl"))),
                 "--mask", "salun", "--density", "0.1", "--lr", "3e-3", "--steps", "2", "--batch-size", "1",
                 "--block-len", "48", "--mia-len", "32", "--prompt-len", "8", "--verbatim-items", "4",
                 "--eval-blocks", "2", "--cloze-items", "0", "--mask-blocks", "4", "--out", str(tmp_path / "un"),
                 "--quiet"]) == 0  # fmt: skip
    moved = fused(tmp_path / "un") != before
    assert moved.any() and moved.float().mean().item() <= 0.1 + 1e-3  # SalUn's 10%, global over the matrices


def test_a_lazy_reference_reads_each_fused_tensor_once() -> None:
    """A reference given as a lazy reader (the merge's base model, read from its file) is read once
    per fused expert tensor, not once per expert."""
    from collections.abc import Iterator, Mapping

    from carve.importance import compute_importance

    base, tuned = moe_model("mixtral", seed=0), moe_model("mixtral", seed=1)
    tensors = {n: p.detach() for n, p in base.named_parameters()}
    reads: dict[str, int] = {}

    class Reader(Mapping[str, torch.Tensor]):
        def __getitem__(self, key: str) -> torch.Tensor:
            reads[key] = reads.get(key, 0) + 1
            return tensors[key]

        def __iter__(self) -> Iterator[str]:
            return iter(tensors)

        def __len__(self) -> int:
            return len(tensors)

    tv = compute_importance("task-vector", tuned, reference=Reader())
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(tv[name], (tuned.get_parameter(name) - base.get_parameter(name)).abs())
    assert reads[name] == 1 and reads["model.layers.1.mlp.experts.down_proj"] == 1


def test_lora_adapts_the_experts_at_a_matched_count(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """`--trainable lora` on an MoE puts a rank-r pair on each expert's matrices (PEFT's
    target_parameters), counted by lora_rank_for as a matrix each, and merges them into the fused
    tensors: the saved experts move, the router does not."""
    from transformers import AutoModelForCausalLM

    from carve.cli.main import main
    from carve.ops.finetune import add_lora, lora_rank_for
    from tests.conftest import tiny_model

    model = tiny_model("mixtral")
    rank = lora_rank_for(model, 0.1)
    per_block = 4 * (256 * 64 + 64 * 128) + 64 * 64 * 2 + 64 * 32 * 2  # experts, then q/o and k/v
    per_rank = 4 * (256 + 64 + 64 + 128) + 2 * (64 + 64) + 2 * (64 + 32)
    assert rank == round(0.1 * per_block / per_rank)
    lora = add_lora(tiny_model("mixtral"), rank)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == 2 * rank * per_rank  # 2 blocks

    src = tmp_path / "moe"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert main(["finetune", str(src), "--domain", str(small_corpus), "--trainable", "lora", "--density", "0.1",
                 "--steps", "2", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--lr", "1e-2",
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 0  # fmt: skip
    before = AutoModelForCausalLM.from_pretrained(src).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").state_dict()
    assert not any("lora" in k for k in after)
    for e in range(4):
        assert not torch.equal(
            after["model.layers.0.mlp.experts.gate_up_proj"][e], before["model.layers.0.mlp.experts.gate_up_proj"][e]
        )
    assert torch.equal(after["model.layers.0.mlp.gate.weight"], before["model.layers.0.mlp.gate.weight"])


def test_the_importance_merge_reads_an_moe_map_under_the_checkpoint_names(tmp_path: Path, tokenizer) -> None:
    """A saved Mixtral's checkpoint holds each expert's w1 / w3 / w2; an importance map holds the fused
    tensors. The streamed merge reads the map's experts under the checkpoint names (transformers'
    reverse conversion), so each expert's task vector is trimmed by its importance, not by magnitude:
    two copies of one expert with one map merge to base + τ ⊙ top_50%(I) in every tensor."""
    from safetensors.torch import load_file

    from carve.cli.main import main
    from carve.masks.mask import ImportanceMap
    from tests.conftest import tiny_model

    base, tuned = tiny_model("mixtral"), tiny_model("mixtral")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    for name, m in (("base", base), ("a", tuned), ("b", tuned)):
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    # importance the reverse of |τ|, so that trimming by it and by magnitude keep opposite halves
    scores = {n: -(p.detach() - base.get_parameter(n).detach()).abs() for n, p in tuned.named_parameters()
              if n.endswith(("proj", "proj.weight"))}  # fmt: skip
    ImportanceMap(scores, {}).save(tmp_path / "imp.safetensors")
    imp = str(tmp_path / "imp.safetensors")
    assert main(["merge", "--base", str(tmp_path / "base"), "--expert", f"a={tmp_path / 'a'}", "--expert",
                 f"b={tmp_path / 'b'}", "--method", "importance", "--density", "0.5", "--importance", f"a={imp}",
                 "--importance", f"b={imp}", "--out", str(tmp_path / "m"), "--eval-blocks", "0", "--quiet"]) == 0  # fmt: skip
    trimmed = json.loads((tmp_path / "m" / "carve.json").read_text())["method"]["trimmed_by_magnitude"]
    assert "model.layers.*.block_sparse_moe.gate.weight" in trimmed  # the router: in no map
    assert not any("experts" in n or "self_attn" in n for n in trimmed)
    b0, t0, merged = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("base", "a", "m"))
    w1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    assert w1 in merged  # the checkpoint's own names
    for name in (w1, "model.layers.1.block_sparse_moe.experts.2.w2.weight", "model.layers.0.self_attn.q_proj.weight"):
        tau = t0[name] - b0[name]
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[(-tau.abs()).reshape(-1).topk(tau.numel() // 2).indices] = True  # top half of I = -|τ|
        want = b0[name] + tau * keep.view_as(tau)
        torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=0)


def test_a_map_is_read_under_the_checkpoint_names(tmp_path: Path) -> None:
    """A merge reads an importance map or Fisher diagonals (keyed by the loaded model's parameters)
    under the checkpoint's names: a Mixtral's fused experts split per expert, its router renamed."""
    from contextlib import ExitStack

    from carve.masks.mask import ImportanceMap
    from carve.merge import _lazy_map
    from carve.models.stream import TensorSource
    from tests.conftest import tiny_model

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "base")
    entries = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
               for i, (n, p) in enumerate(model.named_parameters())}  # fmt: skip
    ImportanceMap(entries, {}).save(tmp_path / "map.safetensors")
    with ExitStack() as stack:
        with TensorSource(str(tmp_path / "base")) as checkpoint:
            held = checkpoint.names()
        lazy = _lazy_map(stack, tmp_path / "map.safetensors", str(tmp_path / "base"), held)
        fused = entries["model.layers.1.mlp.experts.gate_up_proj"]
        assert torch.equal(lazy.get("model.layers.1.block_sparse_moe.experts.3.w1.weight"), fused[3, :128])
        assert torch.equal(lazy.get("model.layers.1.block_sparse_moe.experts.3.w3.weight"), fused[3, 128:])
        down = entries["model.layers.0.mlp.experts.down_proj"]
        assert torch.equal(lazy.get("model.layers.0.block_sparse_moe.experts.1.w2.weight"), down[1])
        router = entries["model.layers.0.mlp.gate.weight"]
        assert torch.equal(lazy.get("model.layers.0.block_sparse_moe.gate.weight"), router)
        assert lazy.get("model.layers.0.block_sparse_moe.experts.9.w1.weight") is None


def test_evaluation_through_unfused_experts_is_not_counted_as_calibration() -> None:
    """A streamed job's held-out evaluation runs through the unfused experts: the tokens it routes are
    not counted, so an expert that saw no calibration token is still named."""
    from carve.models.experts import uncounted

    model = moe_model("mixtral")
    with unfused(model) as experts, torch.no_grad():
        with uncounted(model):
            model(_ids())
        assert all(int(m.routed.sum()) == 0 for m in experts.modules.values())
        model(_ids())
        assert all(int(m.routed.sum()) == 4 * 16 * 2 for m in experts.modules.values())  # tokens x top-2


@pytest.mark.parametrize("arch", sorted(MOE))
def test_structured_extraction_of_an_moe_cuts_heads_and_depth(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str
) -> None:
    """An MoE's blocks have no dense MLP to narrow (Qwen2-MoE's shared expert beside its routed ones
    included): structured extraction cuts its heads (gpt-oss's attention sinks keep them all) and drops
    whole blocks, leaving the experts as they are; slicing equals zeroing, and the job gives the same
    output streamed as in memory.  --mlp-keep is refused by name, pointing to --experts-keep."""
    from carve.errors import UsageError
    from carve.models.anatomy import anatomy
    from carve.ops.plan import Shape
    from carve.pipeline import Recipe, extract
    from tests.conftest import tiny_model
    from tests.test_structure import sliced_as_zeroed

    model = moe_model(arch)
    anat = anatomy(model)
    assert "--experts-keep" in anat.fixed["mlp"] and ("heads" in anat.fixed) == (arch == "gpt_oss")
    kv = anat.kv_heads if arch == "gpt_oss" else 1
    sliced_as_zeroed(model, Shape(kv, 0, 1), [1, 0], tmp_path / "sliced")
    src = tmp_path / "moe"
    tiny_model(arch).save_pretrained(src)
    tokenizer.save_pretrained(src)
    recipe = Recipe(model=str(src), domain=str(small_corpus), general=str(small_corpus), method="magnitude",
                    structure=True, heads_keep=1.0, drop_blocks=1, calib_blocks=4, block_len=32, eval_blocks=2,
                    cloze_items=0, speed=False)  # fmt: skip
    mem = extract(recipe, tmp_path / "mem")
    streamed = extract(replace(recipe, stream=True), tmp_path / "stream")
    assert streamed["structure"] == mem["structure"] and mem["structure"]["config"]["num_hidden_layers"] == 1
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("mem", "stream"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="--experts-keep F removes whole experts"):
        extract(replace(recipe, drop_blocks=None, heads_keep=None, mlp_keep=0.5), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _router_mass(model: torch.nn.Module, blocks: list, ids: torch.Tensor, read) -> torch.Tensor:
    """[MoE blocks, 4 experts]: `read(router output)` (each expert's routing weights, float64) summed
    over a forward of `ids`: the routing mass computed directly from the routers' outputs."""
    mass = torch.zeros(len(blocks), 4, dtype=torch.float64)

    def seen(i: int):
        def hook(_m, _args, out) -> None:
            mass[i] += read(out)

        return hook

    hooks = [b.router.register_forward_hook(seen(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return mass


@pytest.mark.parametrize("arch", sorted(MOE))
def test_dropping_experts_slices_the_router_and_the_experts(arch: str, tmp_path: Path) -> None:
    """`--experts-keep`: every MoE block keeps its heaviest experts by routing mass (the routing weights
    its router gave them, read here off the router's own output); the sliced router's logits are the
    kept rows of the original's, the sliced experts compute what the original's kept experts do, the
    config says how many remain and stock from_pretrained reloads the model."""
    import copy

    from transformers import AutoModelForCausalLM

    from carve.ops.expert_drop import drop_experts, moe_blocks

    model = moe_model(arch)
    original = copy.deepcopy(model)
    blocks = moe_blocks(original)
    ids = _ids(6)

    def read(out) -> torch.Tensor:  # (logits, top-k weights, top-k indices)
        return torch.zeros(4, dtype=torch.float64).index_add_(0, out[2].reshape(-1), out[1].reshape(-1).double())

    mass = _router_mass(original, blocks, ids, read)
    result = drop_experts(model, ids, 0.5, batch_size=2)
    torch.testing.assert_close(result.mass, mass)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(5))
    for block, old, kept, m in zip(moe_blocks(model), blocks, result.kept, mass, strict=True):
        assert kept == sorted(m.sort(descending=True, stable=True).indices[:2].tolist())
        with torch.no_grad():
            logits, weights, index = block.router(x)
            torch.testing.assert_close(logits, old.router(x)[0][:, kept])
            torch.testing.assert_close(block.experts(x, index, weights),
                                       old.experts(x, torch.tensor(kept)[index], weights))  # fmt: skip
    config = model.config
    assert getattr(config, "num_local_experts", None) == 2 or getattr(config, "num_experts", None) == 2
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())


def test_dropping_llama4_experts_ranks_them_by_the_routers_scores(tmp_path: Path) -> None:
    """Llama 4's experts take tokens already routed, so their routing mass is read off the router's
    output (sigmoid scores, zero outside the top-k); the sliced model computes what the original does
    with the dropped experts' router rows at -inf, and reloads with stock from_pretrained."""
    import copy

    from transformers import AutoModelForCausalLM

    from carve.ops.expert_drop import drop_experts, moe_blocks

    model = moe_model("llama4_text")
    original = copy.deepcopy(model)
    blocks = moe_blocks(original)
    ids = _ids(6)
    mass = _router_mass(original, blocks, ids, lambda out: out[0].double().sum(0))  # (scores, logits)
    result = drop_experts(model, ids, 0.5, batch_size=2)
    torch.testing.assert_close(result.mass, mass)
    assert result.kept == [sorted(m.sort(descending=True, stable=True).indices[:2].tolist()) for m in mass]

    def without(dropped: list[int]):
        def hook(m, _args, out):  # Llama4Router's own computation with the dropped experts' logits at -inf
            logits = out[1].masked_fill(torch.isin(torch.arange(4), torch.tensor(dropped)), float("-inf"))
            top, index = logits.topk(m.top_k, dim=1)
            return torch.full_like(logits, float("-inf")).scatter_(1, index, top).sigmoid(), logits

        return hook

    for b, kept in zip(blocks, result.kept, strict=True):
        b.router.register_forward_hook(without([e for e in range(4) if e not in kept]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.config.num_local_experts == 2
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_expert_weights_carve_cannot_see_stay_dense_and_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-D experts weight of no layout carve knows (JetMoE's banks, with their layout taken out of
    `LAYOUTS`) is left as it was and named among the blocks' matrices left dense (which the CLI prints)."""
    from transformers import AutoModelForCausalLM

    from carve.models import experts
    from tests.conftest import any_tiny_config

    monkeypatch.delitem(experts.LAYOUTS, "JetMoeParallelExperts")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config("jetmoe", layers=2)).eval()
    assert not fused_experts(model)
    unseen = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 3}
    assert len(unseen) == 8
    result = carve.prune(model, "wanda", 0.5, torch.randint(3, 100, (2, 16)))
    assert all(torch.equal(p, unseen[n]) for n, p in model.named_parameters() if n in unseen)
    left = result.describe(model)["sparsity"]["not_pruned_in_blocks"]
    assert {re.sub(r"\.\d+\.", ".*.", n, count=1) for n in unseen} <= set(left)


def test_experts_no_token_reaches_are_dropped_and_nothing_changes() -> None:
    """gpt-oss's router has a bias: at -1e4 two experts are never among a token's top-2 and have no
    routing mass, so they are the ones dropped, and the model computes what it did."""
    from carve.ops.expert_drop import drop_experts

    model = moe_model("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[[0, 2]] = -1e4
    ids = _ids(6)
    with torch.no_grad():
        before = model(ids).logits
    result = drop_experts(model, ids, 0.5, batch_size=2)
    assert result.kept == [[1, 3], [1, 3]] and result.mass[:, [0, 2]].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_drop_experts_from_the_command_line(tmp_path: Path, tokenizer, small_corpus: Path, capsys) -> None:
    """`carve extract --experts-keep 0.5` on a saved Mixtral: half the experts of every block go, the
    output loads with stock from_pretrained, exports to GGUF and replays from its manifest; bad requests are refused with one
    line and nothing written."""
    from transformers import AutoModelForCausalLM

    from carve.cli.main import main
    from tests.conftest import tiny_model

    src = tmp_path / "moe"
    tiny_model("mixtral").save_pretrained(src)
    tokenizer.save_pretrained(src)
    data = [str(src), "--domain", str(small_corpus), "--general", "general", "--calib-blocks", "4",
            "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed", "--cloze-items", "0"]  # fmt: skip
    out = tmp_path / "out"
    assert main(["extract", *data, "--experts-keep", "0.5", "--out", str(out)]) == 0
    manifest = json.loads((out / "carve.json").read_text())
    kept = manifest["experts_kept"]
    assert (kept["kept"], kept["of"]) == (2, 4) and len(kept["blocks"]) == 2
    assert manifest["size"]["parameters_after"] < manifest["size"]["parameters_before"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_local_experts == 2
    assert loaded.get_submodule("model.layers.0.mlp.experts").gate_up_proj.shape[0] == 2
    assert main(["export", str(out), "--gguf", str(tmp_path / "out.gguf"), "--quiet"]) == 0
    # the manifest names no scorer (the experts are ranked by routing mass) and replays as recorded
    assert manifest["recipe"]["method"] is None
    again = tmp_path / "again"
    assert main(["extract", "--recipe", str(out / "carve.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "carve.json").read_text())["experts_kept"] == kept
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    for args, message in [
        (["--experts-keep", "0.25"], "keeps 1 of 4 experts; every token is routed to 2"),
        (["--experts-keep", "0.5", "--keep", "0.5"], "--keep do not apply"),
        (["--experts-keep", "1.5"], "outside"),
    ]:
        capsys.readouterr()
        assert main(["extract", *data, *args, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    capsys.readouterr()
    assert main(["extract", str(dense), *data[1:], "--experts-keep", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "has none" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "llama4_text"])
def test_streamed_expert_dropping_equals_in_memory(arch: str, tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """`--experts-keep --stream`: the routing mass from a pass that reads one block at a time, each block's
    MoE sliced as it is written: the in-memory job's experts, weights (bit for bit, as stock from_pretrained
    loads each output), files (the tensors' names and shapes as save_pretrained writes them: the kept
    experts one by one, as the source holds them) and perplexities."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from carve.pipeline import Recipe, extract
    from tests.conftest import tiny_model

    src = tmp_path / "moe"
    tiny_model(arch).save_pretrained(src)
    tokenizer.save_pretrained(src)
    recipe = Recipe(model=str(src), domain=str(small_corpus), general=str(small_corpus), experts_keep=0.5,
                    calib_blocks=4, block_len=32, eval_blocks=2, cloze_items=0, speed=False, batch_size=2)  # fmt: skip
    mem = extract(recipe, tmp_path / "mem")
    streamed = extract(replace(recipe, stream=True), tmp_path / "stream")
    assert streamed["streamed"]["why"] == "--stream"
    assert streamed["experts_kept"] == mem["experts_kept"] and mem["experts_kept"]["kept"] == 2
    assert streamed["size"]["parameters_after"] == mem["size"]["parameters_after"] < mem["size"]["parameters_before"]
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("mem", "stream"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    def files(out: Path) -> dict[str, list[int]]:
        shapes = {}
        for f in sorted(out.glob("model*.safetensors")):
            with safe_open(f, "pt") as st:
                shapes |= {k: st.get_slice(k).get_shape() for k in st.keys()}
        return shapes

    with safe_open(src / "model.safetensors", "pt") as st:
        source = set(st.keys())
    written = files(tmp_path / "stream")
    assert written == files(tmp_path / "mem") and set(written) <= source
    for when in ("before", "after"):
        for key in ("domain_ppl", "general_ppl"):
            assert streamed["metrics"][when][key] == pytest.approx(mem["metrics"][when][key], rel=1e-4)


@pytest.mark.parametrize(("model_type", "bias"), [("deepseek_v3", "gate.e_score_correction_bias"),
                                                  ("lfm2_moe", "expert_bias")])  # fmt: skip
def test_dropping_experts_slices_their_routing_biases(
    model_type: str, bias: str, tmp_path: Path, tokenizer, small_corpus: Path
) -> None:
    """DeepSeek-V3's router and LFM2-MoE's MoE block hold a per-expert bias (a buffer) that steers the
    top-k choice: at -1e4 for experts 0 and 2 no token is routed to them, so --experts-keep 0.5 drops
    them, the biases are sliced with the experts, and the model computes what it did, in memory and
    streamed alike."""
    from transformers import AutoModelForCausalLM

    from carve.ops.expert_drop import drop_experts, moe_blocks
    from carve.pipeline import Recipe, extract
    from tests.conftest import any_tiny_config

    config = any_tiny_config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for b in moe_blocks(model):
            b.holder.get_buffer(bias)[[0, 2]] = -1e4
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    result = drop_experts(model, ids, 0.5, batch_size=2)
    assert all(k == [1, 3] for k in result.kept) and result.mass[:, [0, 2]].abs().max() == 0
    assert all(tuple(b.holder.get_buffer(bias).shape) == (2,) for b in moe_blocks(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    recipe = Recipe(model=str(src), domain=str(small_corpus), general=str(small_corpus), experts_keep=0.5,
                    calib_blocks=4, block_len=32, eval_blocks=2, cloze_items=0, speed=False, batch_size=2)  # fmt: skip
    extract(recipe, tmp_path / "mem")
    extract(replace(recipe, stream=True), tmp_path / "stream")
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d).eval() for d in ("mem", "stream"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_dropping_experts_under_group_limited_routing_keeps_each_groups_heaviest(tmp_path: Path) -> None:
    """DeepSeek-V3 routing within groups (2 groups of 4 experts; a token's 2 experts from its best
    group, groups ranked by their two best experts): --experts-keep 0.5 keeps the 2 heaviest of each
    group, and the sliced model computes what the original does with the dropped experts' choice
    scores at -inf (their correction bias), after a stock from_pretrained too; fewer than 2 per group
    is refused by name."""
    import copy

    from transformers import AutoModelForCausalLM

    from carve.ops.expert_drop import drop_experts, moe_blocks
    from tests.conftest import any_tiny_config

    config = any_tiny_config("deepseek_v3")
    config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok = 8, 2, 1, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    original, fresh = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    result = drop_experts(model, ids, 0.5, batch_size=2)
    assert result.groups == 2 and len(result.kept) == 2
    for kept, mass in zip(result.kept, result.mass, strict=True):
        by_group = [sorted(range(g * 4, g * 4 + 4), key=lambda e: (-mass[e].item(), e))[:2] for g in (0, 1)]
        assert kept == sorted(by_group[0] + by_group[1])
    assert any(k != sorted(m.sort(descending=True, stable=True).indices[:4].tolist())
               for k, m in zip(result.kept, result.mass, strict=True))  # not the blocks' heaviest 4 overall  # fmt: skip
    with torch.no_grad():
        for block, kept in zip(moe_blocks(original), result.kept, strict=True):
            bias = block.holder.get_buffer("gate.e_score_correction_bias")
            bias[[e for e in range(8) if e not in kept]] = float("-inf")
        reference = original(ids).logits
        torch.testing.assert_close(model(ids).logits, reference)
    assert (model.config.n_routed_experts, model.config.n_group) == (4, 2)
    assert "2 expert groups" in result.describe(model)["experts_kept"]["rule"]
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, reference)
    with pytest.raises(carve.UsageError, match=r"keeps 1 of each group's 4 experts.*keep at least 2 per group"):
        drop_experts(fresh, ids, 0.25)


def test_a_router_scoring_zero_compute_experts_too_stays_dense() -> None:
    """LongCat-Flash's router scores its routed experts and its zero-compute (identity) ones: its
    width is the count of all it routes to (the leading size of the experts' gate_up_proj), not the
    routed count, and it is kept dense like every router, while its experts are pruned."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import any_tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config("longcat_flash")).eval()
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "router.classifier" in n}
    assert routers and all(p.shape[0] == 6 for p in routers.values())  # 4 routed + 2 zero-compute experts
    dense = carve.prune(model, "magnitude", 0.5).describe(model)["sparsity"]["not_pruned_in_blocks"]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in routers.items())
    assert "model.layers.*.mlp.router.classifier.weight" in dense
    assert not any(".experts." in n for n in dense)


def test_a_router_that_is_a_network_stays_dense_whole() -> None:
    """ZAYA's router is a projection, a two-layer MLP and a last Linear scoring the 16 experts and a
    skip one (17 outputs): carve keeps all of it dense, as it keeps every router (before: its four
    Linears were pruned like any), while the other matrices are pruned; a module that returns to
    its input width stays a shared expert (GLM-4-MoE-Lite's, tested above)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import any_tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config("zaya")).eval()
    router = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.gate." in n}
    names = {n.split(".mlp.gate.")[1] for n in router if ".layers.0." in n}
    assert {"down_proj.weight", "router_mlp.fc1.weight", "router_mlp.fc2.weight", "router_mlp.out_proj.weight"} <= names
    carve.prune(model, "magnitude", 0.5)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in router.items())
    pruned = [n for n, p in after.items() if p.dim() >= 2 and (p == 0).float().mean() > 0.4]
    assert any(".experts." in n for n in pruned) and any(".self_attn." in n for n in pruned)


def dbrx_model(seed: int = 0) -> torch.nn.Module:
    """A tiny DBRX (conftest's any_tiny_config: 4 experts of width 96, top-1): its experts' matrices
    stacked along the rows of 2-D weights, w1 (gate) and v1 (up) [E·96, 64], w2 down's transpose."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import any_tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(any_tiny_config("dbrx")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


DBRX = "transformer.blocks.{}.ffn.experts"


def test_experts_stacked_in_2d_weights_compute_as_the_model_and_fold_back() -> None:
    """DBRX's experts, outside transformers' experts interface: unfused, each expert is three Linears
    (w1, v1: its rows of the stacked weight; w2: the transpose of its rows), views that write into the
    model's weights, computing what the model computes; fold is the inverse of unfold."""
    model = dbrx_model()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        with unfused(model) as experts:
            assert sorted(experts.modules) == [DBRX.format(i) for i in range(3)]
            inside = model(ids).logits
            down = model.get_submodule(DBRX.format(1) + ".2.w2")
            assert down.weight.shape == (64, 96)  # [out, in]: the hidden size out
            down.weight[0, 3] = 7.0
            per_param = {f"{DBRX.format(0)}.mlp.{p}": torch.randn(384, 64) for p in ("w1", "v1", "w2")}
            per_linear = experts.unfold(per_param)
            assert torch.equal(
                per_linear[DBRX.format(0) + ".1.v1.weight"], per_param[DBRX.format(0) + ".mlp.v1"][96:192]
            )
            assert torch.equal(
                per_linear[DBRX.format(0) + ".1.w2.weight"], per_param[DBRX.format(0) + ".mlp.w2"][96:192].t()
            )
            back = experts.fold(per_linear, True)
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=0)
    assert model.get_submodule(DBRX.format(1)).mlp.w2[2 * 96 + 3, 0].item() == 7.0
    assert back.keys() == per_param.keys() and all(torch.equal(back[k], per_param[k]) for k in per_param)


def test_each_stacked_expert_is_calibrated_on_its_tokens_and_pruned_as_its_own_matrix() -> None:
    """Wanda's masks of DBRX's block-0 experts against a direct computation: gate (w1) and up (v1)
    score |W|·‖X_j‖ over the tokens routed to the expert, down (w2ᵀ) over act(x·w1ᵀ)·(x·v1ᵀ) of those
    tokens, each keeping half of every output row of its own matrix."""
    model = dbrx_model()
    ids = _ids()
    fused = model.get_submodule(DBRX.format(0))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = fused.register_forward_pre_hook(lambda _m, args: seen.append((args[0].detach(), args[1].detach())))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x, index = seen[0][0].reshape(-1, 64), seen[0][1]
    w1, v1, w2 = (getattr(fused.mlp, p).detach().clone().view(4, 96, 64) for p in ("w1", "v1", "w2"))
    result = carve.prune(model, "wanda", 0.5, ids)

    def wanda(W: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        score = W.abs() * inputs.pow(2).sum(0).sqrt()
        return torch.zeros_like(W, dtype=torch.bool).scatter_(1, score.topk(W.shape[1] // 2, dim=1).indices, True)

    masks = {p: result.mask[f"{DBRX.format(0)}.mlp.{p}"].view(4, 96, 64) for p in ("w1", "v1", "w2")}
    routed = 0
    for e in range(4):
        xe = x[(index == e).any(-1)]
        routed += int(len(xe) > 0)
        if not len(xe):
            continue
        h = fused.mlp.activation_fn(xe @ w1[e].t()) * (xe @ v1[e].t())
        assert torch.equal(masks["w1"][e], wanda(w1[e], xe)), e
        assert torch.equal(masks["v1"][e], wanda(v1[e], xe)), e
        assert torch.equal(masks["w2"][e].t(), wanda(w2[e].t(), h)), e
    assert routed >= 2
    for p in ("w1", "v1", "w2"):  # the model's own weights, zero where the mask removes
        assert torch.equal(~result.mask[f"{DBRX.format(0)}.mlp.{p}"], getattr(fused.mlp, p) == 0)
    assert set(result.describe(model)["sparsity"]["not_pruned_in_blocks"]) == {
        "transformer.blocks.*.ffn.router.layer.weight"
    }


def test_a_map_of_stacked_experts_selects_each_expert_as_its_own_matrix(tmp_path: Path) -> None:
    """A DBRX importance map, saved and read back, says which weights stack experts: a matrix-wide
    selection from it keeps half of each expert, even where one expert's scores are all the highest
    (read as one matrix, that expert would be kept whole); pruning with it reused makes that choice."""
    from carve.masks.mask import ImportanceMap, select_mask

    imp = carve.score(dbrx_model(), "wanda", _ids())
    name = f"{DBRX.format(0)}.mlp.w1"
    assert imp.meta["experts"][name] == 4
    imp.scores[name][:96] += 1e3  # expert 0 above every other
    imp.save(tmp_path / "map.safetensors")
    back = ImportanceMap.load(tmp_path / "map.safetensors")
    keep = select_mask(back, 0.5, "matrix")[name].view(4, 96, 64)
    assert all(keep[e].float().mean().item() == 0.5 for e in range(4))
    assert select_mask(ImportanceMap(dict(back.scores), {}), 0.5, "matrix")[name][:96].all()  # no meta: one matrix
    result = carve.prune(dbrx_model(), "wanda", 0.5, _ids(), importance=back)  # reused: the same choice per expert
    assert torch.equal(result.mask[name], select_mask(back, 0.5)[name])


def test_experts_stacked_in_2d_weights_are_not_dropped_whole() -> None:
    from carve.errors import UsageError
    from carve.ops.expert_drop import drop_experts

    model = dbrx_model()
    with pytest.raises(UsageError, match=r"cannot slice transformer\.blocks\.0\.ffn\.experts \(DbrxExperts: stacked"):
        drop_experts(model, _ids(), 0.5)


@pytest.mark.parametrize(
    ("kind", "routers"),
    [
        ("longcat_flash", {"model.layers.*.mlp.router.classifier.weight"}),  # scores 4 routed and 2 identity experts
        ("jetmoe", {"model.layers.*.mlp.router.layer.weight", "model.layers.*.self_attention.experts.router.layer.weight"}),
        ("inkling_text", {"model.layers.*.mlp.gate.weight"}),
    ],
)  # fmt: skip
def test_experts_outside_the_interface_compute_as_the_model_and_are_pruned_each(kind: str, routers: set[str]) -> None:
    """LongCat-Flash (identity experts past the ones with weights, whose gate_up_proj holds unused
    slots for them), JetMoE (banks of Linears called on runs of rows sorted by expert, in its MLP and
    its mixture of attention) and Inkling's shared experts (every token to every expert, weighted):
    unfused, the model computes what it did; each expert's matrices are pruned to half, an unused
    slot stays as it was, and the routers stay dense."""
    from transformers import AutoModelForCausalLM

    from carve.models.experts import expert_count, layout_of
    from tests.conftest import any_tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config(kind)).eval()
    ids = torch.randint(3, 384, (4, 16), generator=torch.Generator().manual_seed(1))
    fused = fused_experts(model)
    assert fused
    params = {f"{n}.{p.param}": (m.get_parameter(p.param).detach().clone(), expert_count(m)) for n, m in fused.items()
              for p in layout_of(m).projections}  # fmt: skip
    given: list[torch.Tensor] = []
    if kind == "longcat_flash":  # the identity experts are reached, so their path is compared
        m = model.get_submodule("model.layers.0.mlp.experts")
        m.register_forward_pre_hook(lambda _m, args: given.append(args[1]))
    with torch.no_grad():
        before = model(ids).logits
        with unfused(model) as experts:
            assert sorted(experts.modules) == sorted(fused)
            inside = model(ids).logits
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)
    if kind == "longcat_flash":
        assert (given[0] >= 4).any() and (given[0] < 4).any()
    result = carve.prune(model, "wanda", 0.5, ids)
    assert {n for _, n in params.values()} == ({4, 2} if kind == "inkling_text" else {4})  # Inkling's 2 shared too
    assert kind != "inkling_text" or "model.layers.0.mlp.shared_experts.down_proj" in params
    for name, (old, n) in params.items():
        w = model.get_parameter(name)
        assert result.mask[name].shape == w.shape
        per_expert = (w[:n] == 0).float().mean(dim=(1, 2))
        assert torch.allclose(per_expert, torch.full_like(per_expert, 0.5), atol=0.02), name
        assert torch.equal(w[n:], old[n:]) and result.mask[name][n:].all(), name  # LongCat's identity slots
    if kind == "longcat_flash":
        assert params["model.layers.0.mlp.experts.gate_up_proj"][0].shape[0] == 6
    assert set(result.describe(model)["sparsity"]["not_pruned_in_blocks"]) & {*routers, *params} == routers


def test_lora_leaves_the_experts_peft_cannot_wrap_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """DBRX's experts module reads w1, v1, w2 off its child `mlp`, which PEFT's target_parameters
    would wrap and hide: LoRA adapts the other targets (its attention), says so on stderr, and the
    matched rank counts only the matrices adapted."""
    from carve.ops.finetune import add_lora, lora_rank_for

    model = dbrx_model()
    attention = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".attn." in n]
    assert len(attention) == 6  # Wqkv and out_proj in 3 blocks
    weights = sum(m.weight.numel() for m in attention)
    per_rank = sum(sum(m.weight.shape) for m in attention)
    rank = lora_rank_for(model, 0.1)
    assert rank == round(0.1 * weights / per_rank)
    lora = add_lora(model, rank)
    assert "LoRA adapts no expert of DbrxForCausalLM" in capsys.readouterr().err
    trainable = {n: p.numel() for n, p in lora.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == rank * per_rank and not any(".experts." in n for n in trainable)
    with torch.no_grad():
        lora(_ids())
