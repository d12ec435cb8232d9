"""Structured extraction on tiny random models: slicing equals zeroing, reloads with stock
from_pretrained, parameter arithmetic, unit importance against a direct computation."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import carve
from carve.engines.blocks import block_distances, calibration_loss, greedy_drop_order
from carve.errors import UsageError
from carve.masks import ImportanceMap
from carve.models import all_prunable_linears
from carve.models.anatomy import anatomy, compensable
from carve.ops.plan import Shape, ShapeTarget, candidate_shapes, decoder_params, make_plan, unit_importance
from carve.ops.structure import (
    apply_plan,
    attention_last,
    held_by_config,
    pinned_blocks,
    search_plan,
    shared_copy,
    structure,
    zero_plan,
)
from tests.conftest import MORE_ARCHS, VOCAB, any_tiny_config, tiny_config

# phi3: fused qkv_proj, gate_up_proj; phi, starcoder2: a role's projection under another name (anatomy.ALIASES)
STRUCTURED = ["llama", "qwen2", "mistral", "gemma3", *MORE_ARCHS, "phi3", "phi", "starcoder2"]


def three_block_model(arch: str, seed: int = 0) -> torch.nn.Module:
    config = tiny_config(arch)
    config.num_hidden_layers = 3
    if arch == "gemma3":
        config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    elif getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * 3
    if arch == "smollm3":  # the middle block without rotary embeddings: its flag must follow the kept blocks
        config.no_rope_layers = [1, 0, 1]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def random_scores(model: torch.nn.Module, seed: int = 1) -> ImportanceMap:
    g = torch.Generator().manual_seed(seed)
    return ImportanceMap(
        {f"{n}.weight": torch.rand(lin.weight.shape, generator=g) for n, lin in all_prunable_linears(model).items()}
    )


def _ids(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


def sliced_as_zeroed(model: torch.nn.Module, shape: Shape, order: list[int], tmp_path: Path) -> tuple[Any, Any]:
    """`model` sliced to `shape` (units ranked by random scores, blocks dropped in `order`): its logits
    equal the zeroed model's, and after save_pretrained stock from_pretrained loads it, with a config
    of those widths, to the same logits and the parameter count the planner counted.  Returns the
    reloaded and the zeroed model."""
    anat = anatomy(model)
    groups, channels = unit_importance(random_scores(model), anat)
    plan = make_plan(shape, groups, channels, order)
    assert len(plan.drop) == shape.drop_blocks
    sliced, zeroed = apply_plan(copy.deepcopy(model), plan), zero_plan(copy.deepcopy(model), plan)
    ids = torch.randint(
        0, model.config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        want = zeroed(input_ids=ids).logits
        torch.testing.assert_close(sliced(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
    # the config says what the weights are, and stock from_pretrained loads it with no custom code
    sliced.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())  # per-block settings only where the source had them
    assert ("per_layer_config" in saved) == ("per_layer_config" in model.config.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    c = reloaded.config.get_text_config()  # a multimodal model's text model's
    assert c.num_hidden_layers == len(anat.blocks) - shape.drop_blocks
    if getattr(c, "per_layer_config", None) is None:  # Gemma 4: head counts by block (its heads are held)
        assert (c.num_key_value_heads, c.num_attention_heads) == (shape.kv_groups, shape.kv_groups * anat.group_size)
    if anat.intermediate:  # an MoE's experts keep their width (its config may name none)
        widths = c.intermediate_size if isinstance(c.intermediate_size, list) else [c.intermediate_size]  # Gemma 3n
        assert set(widths) == {shape.mlp_channels}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
    # parameter arithmetic: what the planner counted is what the model holds
    blocks = sum(p.numel() for b in anatomy(reloaded).blocks for p in b.parameters())
    assert blocks == decoder_params(anat, plan.shape, plan.drop)
    if len({sum(p.numel() for p in b.parameters()) for b in anat.blocks}) == 1:  # alike blocks: the planner's count
        assert blocks == decoder_params(anat, plan.shape)
    return reloaded, zeroed


@pytest.mark.parametrize("arch", STRUCTURED)
def test_sliced_model_equals_zeroed_model_and_reloads(arch: str, tmp_path: Path) -> None:
    model = three_block_model(arch)
    reloaded, zeroed = sliced_as_zeroed(model, Shape(kv_groups=1, mlp_channels=40, drop_blocks=1), [1, 2, 0], tmp_path)
    assert reloaded.config.head_dim == anatomy(model).head_dim
    # the KV cache follows the renumbered blocks: cached greedy decoding equals the zeroed model's
    ids = _ids()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reloaded.generate(ids[:1, :5], **kw), zeroed.generate(ids[:1, :5], **kw))
    if arch == "qwen2":  # tied embeddings stay tied
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_unit_importance_against_a_direct_sum() -> None:
    model = three_block_model("llama")
    anat = anatomy(model)
    scores = random_scores(model)
    groups, channels = unit_importance(scores, anat)
    hd, rep = anat.head_dim, anat.group_size
    for i in range(3):
        s = {r: scores[f"model.layers.{i}.{'self_attn' if r[0] in 'qkvo' else 'mlp'}.{r}.weight"] for r in
             ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}  # fmt: skip
        for g in range(anat.kv_heads):
            want = s["k_proj"][g * hd : (g + 1) * hd].sum() + s["v_proj"][g * hd : (g + 1) * hd].sum()
            for h in range(g * rep, (g + 1) * rep):
                want += s["q_proj"][h * hd : (h + 1) * hd].sum() + s["o_proj"][:, h * hd : (h + 1) * hd].sum()
            torch.testing.assert_close(groups[i, g], want)
        for c in (0, 17, anat.intermediate - 1):
            want = s["gate_proj"][c].sum() + s["up_proj"][c].sum() + s["down_proj"][:, c].sum()
            torch.testing.assert_close(channels[i, c], want)


def test_fused_projections_unit_importance_and_slices_against_the_unfused_model() -> None:
    """Phi-3's fused qkv_proj and gate_up_proj: each role is its span of the fused rows. A Llama
    model holding the same weights unfused gives the same unit importance, and the same logits
    after slicing to the same plan (so the fused rows kept are each role's kept rows)."""
    phi = three_block_model("phi3")
    config = tiny_config("llama")
    config.num_hidden_layers, config.rms_norm_eps = 3, phi.config.rms_norm_eps
    llama = AutoModelForCausalLM.from_config(config).eval()
    pa, la = anatomy(phi), anatomy(llama)
    assert (pa.heads, pa.kv_heads, pa.head_dim, pa.intermediate) == (
        la.heads,
        la.kv_heads,
        la.head_dim,
        la.intermediate,
    )
    q, kv, inter = pa.heads * pa.head_dim, pa.kv_heads * pa.head_dim, pa.intermediate
    spans = {"qkv_proj": {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)},
             "gate_up_proj": {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}}  # fmt: skip

    def unfused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            fused = next((f for f in spans if f".{f}." in name), None)
            for role, (a, b) in spans[fused].items() if fused else ():
                out[name.replace(fused, role)] = t[a:b]
            if fused is None:
                out[name] = t
        return out

    llama.load_state_dict(unfused(phi.state_dict()))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, phi(input_ids=ids).logits)
    scores = random_scores(phi)
    split = ImportanceMap(unfused(dict(scores.scores)))
    pg, pc = unit_importance(scores, pa)
    lg, lc = unit_importance(split, la)
    torch.testing.assert_close(pg, lg)
    torch.testing.assert_close(pc, lc)
    plan = make_plan(Shape(kv_groups=1, mlp_channels=24, drop_blocks=0), pg, pc, [])
    with torch.no_grad():
        torch.testing.assert_close(apply_plan(phi, plan)(input_ids=ids).logits,
                                   apply_plan(llama, plan)(input_ids=ids).logits)  # fmt: skip
    assert phi.model.layers[0].self_attn.num_key_value_heads == 1  # Phi-3 splits qkv by it


def test_candidate_shapes_fit_the_budget_and_fixed_targets_hold() -> None:
    model = three_block_model("llama")
    anat = anatomy(model)
    dense = decoder_params(anat, Shape(anat.kv_heads, anat.intermediate, 0))
    shapes = candidate_shapes(anat, 0.5, multiple=8)
    assert len(shapes) > 1
    for s in shapes:
        assert decoder_params(anat, s) <= 0.5 * dense
        assert s.mlp_channels % 8 == 0
    # the widest MLP that fits: one more step of 8 channels would exceed the budget
    for s in shapes:
        if s.mlp_channels + 8 <= anat.intermediate:
            assert decoder_params(anat, Shape(s.kv_groups, s.mlp_channels + 8, s.drop_blocks)) > 0.5 * dense
    fixed = candidate_shapes(anat, 0.5, heads_keep=0.5, drop_blocks=0, multiple=8)
    assert fixed and all(s.kv_groups == 1 and s.drop_blocks == 0 for s in fixed)
    assert candidate_shapes(anat, None, mlp_keep=0.25) == [Shape(anat.kv_heads, 32, 0)]
    with pytest.raises(UsageError, match="keeps 0 of 2"):
        candidate_shapes(anat, 0.5, heads_keep=0.1)
    with pytest.raises(UsageError, match="loosen"):
        candidate_shapes(anat, 0.05, heads_keep=1.0, drop_blocks=0)


def test_block_distance_of_an_identity_block_is_zero_and_it_is_dropped_first() -> None:
    model = three_block_model("llama")
    anat = anatomy(model)
    with torch.no_grad():  # block 2 becomes the identity
        anat.parts[2].linear("o_proj").weight.zero_()
        anat.parts[2].linear("down_proj").weight.zero_()
    d = block_distances(model, _ids(4, 16), batch_size=2)
    assert d[2].item() < 1e-3 < d[0].item() and d[1].item() > 1e-3
    groups, channels = unit_importance(random_scores(model), anat)
    assert make_plan(Shape(2, 128, 1), groups, channels, d.argsort().tolist()).drop == [2]


def sliced_greedy(
    model: torch.nn.Module, calib: torch.Tensor, steps: int, run: int = 1
) -> tuple[list[int], list[float]]:
    """The greedy drop order computed the slow way: each step slices a trial model per candidate run
    of `run` consecutive kept blocks and drops the run with the lowest calibration loss; the order
    and the loss after each step."""
    anat = anatomy(model)
    units = unit_importance(random_scores(model), anat)

    def dropped(drop: list[int]) -> float:
        plan = make_plan(Shape(anat.kv_heads, anat.intermediate, len(drop)), *units, drop)
        return calibration_loss(apply_plan(shared_copy(model), plan), calib)

    chosen: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        kept = [i for i in range(len(anat.blocks)) if i not in chosen]
        trials = {k: dropped([*chosen, *kept[k : k + run]]) for k in range(len(kept) - run + 1)}
        best = min(trials, key=lambda k: trials[k])
        chosen += kept[best : best + run]
        losses.append(trials[best])
    return chosen, losses


def deep_model(arch: str, layers: int) -> torch.nn.Module:
    """A tiny `arch` model of `layers` blocks, its per-layer pattern continued (Gemma 2 alternating
    sliding and global, SmolLM3 without RoPE in every fourth layer)."""
    config = tiny_config(arch)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    if arch == "smollm3":
        config.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(layers)]
    if arch == "gemma2":  # as llama.cpp scales a small Gemma 2's attention: by 1/sqrt(head_dim)
        config.query_pre_attn_scalar = config.head_dim
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_run_distances_against_the_hidden_states_and_the_order_takes_disjoint_runs() -> None:
    """`--drop-run 2` with the distance rule: each run's distance is the angular distance between the
    hidden state entering its first block and the one leaving its last (read here off forward hooks,
    one forward); the order takes runs by ascending distance, none overlapping one taken before."""
    from carve.engines.blocks import angular_distance, run_order

    model = deep_model("llama", 5)
    ids = _ids(4, 16)
    ins, outs = {}, {}

    def keep(i: int):
        def hook(_m, args, kwargs, out) -> None:
            ins[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            outs[i] = out[0] if isinstance(out, tuple) else out

        return hook

    hooks = [b.register_forward_hook(keep(i), with_kwargs=True) for i, b in enumerate(anatomy(model).blocks)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    d = block_distances(model, ids, batch_size=2, run=2)
    assert d.shape == (4,)
    for i in range(4):
        torch.testing.assert_close(d[i], angular_distance(ins[i], outs[i + 1]).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block_distances(model, ids, run=1)[:2], block_distances(model, ids)[:2])
    assert run_order(torch.tensor([0.5, 0.1, 0.2, 0.9]), 2) == [1, 2, 3, 4]  # run 2-3 overlaps 1-2, 0-1 too
    assert run_order(torch.tensor([0.5, 0.1, 0.2]), 1) == [1, 2, 0]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_greedy_runs_equal_slicing_every_candidate_run(arch: str) -> None:
    """`--drop-run 2` with the greedy rule: each step drops the two consecutive kept blocks whose
    removal gives the lowest loss, as slicing a trial model per candidate pair gives; the kept
    blocks of Gemma 2 still alternate sliding and global."""
    model = deep_model(arch, 6)
    anat = anatomy(model)
    calib = _ids(3, 16)
    order, losses = greedy_drop_order(model, calib, 4, run=2)
    chosen, trials = sliced_greedy(model, calib, 2, run=2)
    assert order == chosen and losses == pytest.approx(trials, abs=1e-4)
    units = unit_importance(random_scores(model), anat)
    plan = make_plan(Shape(anat.kv_heads, anat.intermediate, 4), *units, order)
    if arch == "gemma2":
        assert apply_plan(shared_copy(model), plan).config.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(UsageError, match="whole runs"):
        greedy_drop_order(model, calib, 3, run=2)
    with pytest.raises(UsageError, match="not a whole number of runs"):
        candidate_shapes(anat, None, drop_blocks=3, drop_run=2)
    assert {s.drop_blocks for s in candidate_shapes(anat, 0.5, drop_run=2)} <= {0, 2, 4}


def test_search_picks_the_candidate_with_the_lowest_loss() -> None:
    model = three_block_model("llama")
    anat = anatomy(model)
    groups, channels = unit_importance(random_scores(model), anat)
    d = block_distances(model, _ids(4, 16))
    shapes = candidate_shapes(anat, 0.6, multiple=8)
    plan = search_plan(model, shapes, groups, channels, d.argsort().tolist(), _ids(3, 16))
    assert len(plan.search) == len(shapes)
    best = min(plan.search, key=lambda c: c["loss"])
    assert (best["kv_groups"], best["mlp_channels"], best["drop_blocks"]) == (
        plan.shape.kv_groups,
        plan.shape.mlp_channels,
        plan.shape.drop_blocks,
    )
    # the model searched over is untouched
    assert anatomy(model).parts[0].linear("up_proj").out_features == anat.intermediate


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_slicing_a_shared_copy_leaves_the_model_and_equals_slicing_a_full_copy(arch: str) -> None:
    """The search slices candidates from `shared_copy` (no second model in memory): the original's
    weights, config and outputs stay as they were, and the candidate equals one sliced from a deep
    copy (bias compensation and dropped blocks included)."""
    from carve.engines.blocks import input_means

    model = three_block_model(arch)
    model.config.attention_bias = True  # let the compensation write biases, also into projections that had none
    anat = anatomy(model)
    calib = _ids(4, 16)
    groups, channels = unit_importance(random_scores(model), anat)
    plan = make_plan(Shape(1, 40, 1), groups, channels, block_distances(model, calib).argsort().tolist())
    # Qwen2's config has neither attention_bias nor mlp_bias: nothing to compensate
    assert compensable(model) == (["o_proj", "down_proj"] if arch == "llama" else [])
    means = input_means(model, calib, batch_size=2) if compensable(model) else None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    with torch.no_grad():
        logits = model(input_ids=calib).logits

    copied = shared_copy(model)
    embed = model.get_input_embeddings().weight
    assert copied.get_input_embeddings().weight.data_ptr() == embed.data_ptr()  # shared, not copied
    trial = apply_plan(copied, plan, means)
    reference = apply_plan(copy.deepcopy(model), plan, means)
    with torch.no_grad():
        torch.testing.assert_close(trial(input_ids=calib).logits, reference(input_ids=calib).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=calib).logits, logits, rtol=0, atol=0)
    assert model.config.to_dict() == config and model.config.num_hidden_layers == 3
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def _fixed_heads_model(arch: str) -> torch.nn.Module:
    """A 3-block model whose heads cannot be sliced out: norms over the whole projection (OLMo-2),
    the hidden size kept on the attention module (StableLM), one norm row per head (Cohere with
    use_qk_norm)."""
    if arch != "cohere-qk-norm":
        return three_block_model(arch)
    config = tiny_config("cohere")
    config.num_hidden_layers, config.use_qk_norm = 3, True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_unsupported_architecture_is_refused_clearly() -> None:
    from tests.conftest import tiny_model

    with pytest.raises(UsageError, match="Llama-style blocks"):
        anatomy(tiny_model("gpt2"))
    # Llama-style names, but heads that cannot be sliced out: every head is kept, by name when asked otherwise
    for arch, why in [("olmo2", r"q_norm\.weight, k_norm\.weight spanning every head"),
                      ("stablelm", "keeps hidden_size as attributes"),
                      ("cohere-qk-norm", r"q_norm\.weight, k_norm\.weight spanning every head")]:  # fmt: skip
        model = _fixed_heads_model(arch)
        anat = anatomy(model)
        assert re.search(why, anat.fixed["heads"]) and set(anat.fixed) == {"heads"}
        with pytest.raises(UsageError, match=why + ".*--heads-keep 1.0"):
            candidate_shapes(anat, None, heads_keep=0.5)
        # --keep searches MLP width and depth only
        shapes = candidate_shapes(anat, 0.6)
        assert len(shapes) > 1 and {s.kv_groups for s in shapes} == {anat.kv_heads}
        groups, channels = unit_importance(random_scores(model), anat)
        with pytest.raises(UsageError, match=why):  # a plan made by hand that removes heads
            apply_plan(model, make_plan(Shape(1, 40, 0), groups, channels, [0, 1, 2]))


@pytest.mark.parametrize("arch", ["olmo2", "stablelm", "cohere-qk-norm"])
def test_fixed_heads_models_lose_mlp_channels_and_blocks(arch: str, tmp_path: Path) -> None:
    """A model whose heads cannot be removed is sliced in MLP width and depth: the sliced model
    equals the zeroed one and reloads with stock from_pretrained."""
    model = _fixed_heads_model(arch)
    sliced_as_zeroed(model, Shape(anatomy(model).kv_heads, 40, 1), [1, 2, 0], tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bias_compensation_keeps_the_mean_output_and_reloads(arch: str, tmp_path: Path) -> None:
    """FLAP: with the removed inputs' mean contribution added as a bias, the mean output of block
    0's o_proj (and down_proj, where the config allows an MLP bias) over the calibration tokens
    equals the dense model's; the biases and the config flags survive save / from_pretrained."""
    from carve.engines.blocks import input_means

    model = three_block_model(arch)
    anat = anatomy(model)
    calib = _ids(4, 16)
    groups, channels = unit_importance(random_scores(model), anat)
    means = input_means(model, calib, batch_size=2)
    roles = compensable(model)

    def mean_outputs(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        parts, got = anatomy(m).parts[0], {}
        handles = [
            parts.linear(r).register_forward_hook(lambda _m, _a, out, r=r: got.__setitem__(r, out.mean((0, 1))))
            for r in roles
        ]
        with torch.no_grad():
            m(input_ids=calib)
        for h in handles:
            h.remove()
        return got

    dense = mean_outputs(model)
    # one kind of unit removed at a time: removing heads changes the MLP's inputs token by token
    only = {"o_proj": Shape(1, anat.intermediate, 0), "down_proj": Shape(anat.kv_heads, 40, 0)}
    for r in roles:
        plan = make_plan(only[r], groups, channels, None)
        got = mean_outputs(apply_plan(copy.deepcopy(model), plan, means))[r]
        without = mean_outputs(apply_plan(copy.deepcopy(model), plan))[r]
        torch.testing.assert_close(got, dense[r], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(without, dense[r], atol=1e-4)  # the compensation did something
    sliced = apply_plan(copy.deepcopy(model), make_plan(Shape(1, 40, 0), groups, channels, None), means)
    sliced.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())  # per-block settings only where the source had them
    assert ("per_layer_config" in saved) == ("per_layer_config" in model.config.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_bias and (arch != "llama" or reloaded.config.mlp_bias)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=calib).logits, sliced(input_ids=calib).logits)


def test_bias_compensation_refused_without_a_bias_flag() -> None:
    from tests.conftest import tiny_model

    with pytest.raises(UsageError, match="neither mlp_bias nor attention_bias"):
        structure(tiny_model("qwen2"), never_scored, _ids(2, 16), ShapeTarget(keep=0.5, bias_compensation=True))


@pytest.mark.parametrize("arch", STRUCTURED)
def test_greedy_drop_order_equals_slicing_every_candidate(arch: str) -> None:
    """The greedy rule starts each candidate's forward from cached hidden states; it must pick the
    blocks, and report the losses, that slicing a trial model per candidate gives (Gemma3 with
    alternating sliding-window and full attention: each block keeps its own mask)."""
    config = tiny_config(arch)
    config.num_hidden_layers = 5
    if arch == "gemma3":
        config.layer_types = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
        config.sliding_window = 4
    elif getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * 5
    if arch == "smollm3":
        config.no_rope_layers = [1, 0, 1, 1, 0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    anat = anatomy(model)
    n = len(anat.blocks)
    calib = _ids(3, 16)
    order, losses = greedy_drop_order(model, calib, 2)
    chosen, trials = sliced_greedy(model, calib, 2)
    assert order == chosen and losses == pytest.approx(trials, abs=1e-4)
    # the model is left as it was: no block's forward is still replaced
    assert all("forward" not in b.__dict__ for b in anat.blocks)
    with pytest.raises(UsageError, match="keep at least one"):
        greedy_drop_order(model, calib, n)


def test_structure_drops_the_greedy_rules_blocks() -> None:

    model = three_block_model("llama")
    calib = _ids(4, 16)
    order, _ = greedy_drop_order(copy.deepcopy(model), calib[[0, 3]], 1)
    target = ShapeTarget(mlp_keep=1.0, heads_keep=1.0, drop_blocks=1, drop_rule="greedy")
    res = structure(model, carve.score(model, "magnitude"), calib, target)
    assert res.drop_order == order and res.plan.drop == order and res.distances is None
    assert model.config.num_hidden_layers == 2
    with pytest.raises(UsageError, match="drop rule 'best'"):
        structure(three_block_model("llama"), never_scored, calib, ShapeTarget(drop_blocks=1, drop_rule="best"))
    from carve.pipeline import Recipe

    with pytest.raises(
        UsageError, match="drop-rule must be one of distance, greedy, not 'best'"
    ):  # refused before any model is loaded
        Recipe(drop_blocks=1, drop_rule="best").resolved()


def never_scored() -> carve.ImportanceMap:
    """The importance of a structured extraction that must be refused before any scoring."""
    raise AssertionError("scored before the model and target were checked")


def _gemma3n(sparsity: float = 0.95) -> torch.nn.Module:
    """A 3-block Gemma 3n: per-layer input embeddings (sized by the block count), and activation
    sparsity in its first block's MLP, as the released models have in their first ten."""
    import transformers as tf

    config = tf.Gemma3nTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  sliding_window=16, altup_num_inputs=2, laurel_rank=8, hidden_size_per_layer_input=8,
                                  vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=0,
                                  activation_sparsity_pattern=[sparsity, 0.0, 0.0], max_position_embeddings=256,
                                  pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_gemma3n_keeps_its_depth_and_its_sparse_mlps(tmp_path: Path) -> None:
    """Gemma 3n's per-layer input embeddings are sized by the block count, and its activation-sparse
    MLPs keep activations by statistics over all their channels: no block and no MLP channel can go
    (asked for, refused by name; --keep searches heads only), while heads can: slicing them equals
    zeroing them and reloads with stock from_pretrained."""
    model = _gemma3n()
    anat = anatomy(model)
    assert set(anat.fixed) == {"mlp", "depth"}
    with pytest.raises(UsageError, match=r"per-layer input embeddings.*--drop-blocks 0"):
        candidate_shapes(anat, None, drop_blocks=1)
    with pytest.raises(UsageError, match=r"activation sparsity.*--mlp-keep 1\.0"):
        candidate_shapes(anat, None, mlp_keep=0.5)
    assert candidate_shapes(anat, 0.9) == [Shape(1, anat.intermediate, 0)]  # heads are all that can go
    with pytest.raises(UsageError, match="held by the model: mlp, depth"):
        candidate_shapes(anat, 0.5)
    assert "activation sparsity" not in str(anatomy(_gemma3n(0.0)).fixed)  # no sparsity: MLP channels can go
    sliced_as_zeroed(model, Shape(1, anat.intermediate, 0), [0, 1, 2], tmp_path)
    groups, channels = unit_importance(random_scores(model), anat)
    for dropping in (make_plan(Shape(2, anat.intermediate, 1), groups, channels, [1, 0, 2]),
                     make_plan(Shape(2, 64, 0), groups, channels, [0, 1, 2])):  # fmt: skip
        with pytest.raises(UsageError, match=r"cannot (drop blocks|remove MLP channels)"):
            apply_plan(copy.deepcopy(model), dropping)


def _gemma4(**extra: Any) -> torch.nn.Module:
    """A tiny Gemma 4: sliding and global layers in turn (4 blocks), the global ones with wider heads (32 against
    16), one key/value head (against 2) and values that are their keys (no v_proj)."""
    import transformers as tf

    config = tf.Gemma4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                 num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
                                 pad_token_id=None, bos_token_id=None, eos_token_id=None,
                                 **{"hidden_size_per_layer_input": 0, **extra})  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_gemma4_keeps_its_heads_and_loses_mlp_channels_and_blocks(tmp_path: Path) -> None:
    """Gemma 4's global layers lay out their heads otherwise than its sliding ones (per-kind head widths and
    key/value heads in `per_layer_config`, values that are their keys): every head is kept, by name, and the
    MLP channels and blocks go; the per-block settings follow the kept blocks, and the last block, which Gemma
    4's config makes a global one, is pinned (no drop rule removes it).  The sliced model equals the zeroed one
    and reloads with stock from_pretrained.  E2B/E4B's shape (per-layer embeddings, keys and values reused by
    the last blocks, whose MLPs are double-wide) holds everything: refused by name."""
    model = _gemma4()
    anat = anatomy(model)
    assert re.search(r"its full_attention layers lay out their heads otherwise", anat.fixed["heads"])
    assert held_by_config(model, anat) == {} and list(pinned_blocks(model, anat)) == [3]
    for order in ([0, 1, 2, 3], [1, 0, 2, 3]):  # a sliding block dropped, a global one
        reloaded, _ = sliced_as_zeroed(model, Shape(anat.kv_heads, 40, 1), order, tmp_path / str(order[0]))
        types = ["sliding_attention", "full_attention"] * 2
        assert reloaded.config.layer_types == types[: order[0]] + types[order[0] + 1 :]
        widths = [reloaded.config.per_layer_config[i].head_dim for i in range(3)]
        assert widths == [16 if t == "sliding_attention" else 32 for t in reloaded.config.layer_types]
    res = structure(copy.deepcopy(model), random_scores(model), _ids(4, 16),
                    ShapeTarget(drop_blocks=3, mlp_keep=0.5, heads_keep=1.0))  # fmt: skip
    assert res.plan.drop == [0, 1, 2] and res.describe(model)["structure"]["pinned_blocks"].keys() == {"3"}
    with pytest.raises(UsageError, match=r"heads of Gemma4ForCausalLM: its full_attention layers.*--heads-keep 1\.0"):
        candidate_shapes(anat, None, heads_keep=0.5)
    # Gemma 4 unified's config turns a last sliding layer into a global one when read back, with the same
    # shapes (its global layers keep their values): the read-back comparison refuses it, so the block is pinned
    unified = _odd_model("gemma4_unified_text")
    assert re.search(r"rewrites layer_types when read back", pinned_blocks(unified, anatomy(unified))[2])
    # E2B/E4B: per-layer embeddings, the last two blocks reusing keys and values with double-wide MLPs
    e2b = _gemma4(hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=2,
                  use_double_wide_mlp=True)  # fmt: skip
    held = anatomy(e2b).fixed
    assert set(held) == {"heads", "mlp", "depth"} and "block 2's is not block 0's" in held["mlp"]
    with pytest.raises(UsageError, match="no choice of heads, MLP width and blocks"):
        candidate_shapes(anatomy(e2b), 0.5)


def _hybrid(model_type: str) -> torch.nn.Module:
    """A tiny hybrid: 3 blocks, the last one attention (Nemotron-H: 4 single-mixer blocks, Mamba, MLP,
    attention, MLP)."""
    config = any_tiny_config(model_type, layers=4 if model_type == "nemotron_h" else 3)
    if model_type == "nemotron_h":
        config.layer_types = ["linear_attention", "mlp", "full_attention", "mlp"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("model_type", "held"),
    [("qwen3_5_text", set()), ("bamba", set()), ("nemotron_h", set()), ("olmo_hybrid", {"heads"}),
     ("qwen3_5_moe_text", {"mlp"})],
)  # fmt: skip
def test_hybrids_keep_their_other_mixers_whole_and_slice_the_rest(
    model_type: str, held: set[str], tmp_path: Path
) -> None:
    """Qwen3.5's Gated DeltaNet, Bamba's Mamba, Nemotron-H's single-mixer blocks (Mamba, MLP,
    attention), OLMo-hybrid's linear attention (whose q/k/v/o_proj are not softmax heads): a block whose
    layer type is another mixer keeps it bit for bit; heads are cut in the attention blocks, MLP channels
    wherever there is an MLP, and a dropped block takes its mixer with it.  Qwen3.5's q_proj holds each
    head's query and then its gate (2 x head_dim rows a head).  The sliced model equals the zeroed one and
    reloads with stock from_pretrained."""
    model = _hybrid(model_type)
    anat = anatomy(model)
    anat.fixed.update(held_by_config(model, anat))
    assert set(anat.fixed) == held, anat.fixed
    types = model.config.layer_types
    assert [p.attention is not None for p in anat.parts] == [t == "full_attention" for t in types]
    assert anat.query_rows == anat.head_dim * (2 if model_type.startswith("qwen3_5") else 1)
    shape = Shape(anat.kv_heads if "heads" in held else 1, anat.intermediate if "mlp" in held else 40, 1)
    reloaded, _ = sliced_as_zeroed(model, shape, [0, 1, 2], tmp_path)  # block 0 (a Mamba / DeltaNet block) goes
    source, got = dict(model.named_parameters()), dict(reloaded.named_parameters())
    for i in (i for i, p in enumerate(anat.parts) if i and p.attention is None):  # now block i - 1
        mixer = [n for n in source if n.startswith(f"{anat.prefix}.{i}.")
                 and not any(r in n for r in ("mlp", "feed_forward", "mixer.up_proj", "mixer.down_proj"))]  # fmt: skip
        assert mixer
        for n in mixer:
            assert torch.equal(got[n.replace(f".{i}.", f".{i - 1}.", 1)], source[n]), n


def test_blocks_sharing_their_projections_are_refused() -> None:
    """Zamba2's hybrid blocks share one transformer block's weights: each would be sliced to its own
    units and the reload would keep one of them, so structured extraction refuses by name."""
    config = any_tiny_config("zamba2")
    config.layers_block_type = ["linear_attention", "hybrid", "hybrid"]
    with pytest.raises(UsageError, match=r"blocks 1 and 2 share their q_proj weights"):
        anatomy(AutoModelForCausalLM.from_config(config))


def test_a_plan_that_drops_every_attention_block_is_refused_or_left_out() -> None:
    """transformers' cache needs one attention block in a hybrid: a plan dropping the only one is refused by
    name, and the split search leaves such candidates out."""
    model = _hybrid("qwen3_5_text")
    anat = anatomy(model)
    groups, channels = unit_importance(random_scores(model), anat)
    order = [2, 1, 0]  # the attention block first
    with pytest.raises(UsageError, match=r"dropping blocks \[2\] removes every attention block"):
        apply_plan(copy.deepcopy(model), make_plan(Shape(2, 96, 1), groups, channels, order))
    plan = search_plan(model, [Shape(2, 96, 1), Shape(2, 64, 0)], groups, channels, order, _ids(2, 16))
    assert plan.shape == Shape(2, 64, 0)
    with pytest.raises(UsageError, match="every candidate drops each attention block"):
        search_plan(model, [Shape(2, 96, 1), Shape(1, 96, 1)], groups, channels, order, _ids(2, 16))
    # the distance rule's order keeps the attention block it would drop last for the end, and the greedy
    # rule never weighs dropping the last one: 2 of 3 blocks go, whatever the rule ranks first
    assert attention_last(anat, order) == [1, 0, 2] and attention_last(anat, [0, 2, 1]) == [0, 1, 2]
    for rule in ("distance", "greedy"):
        res = structure(copy.deepcopy(model), random_scores(model), _ids(4, 16),
                        ShapeTarget(drop_blocks=2, mlp_keep=1.0, heads_keep=1.0, drop_rule=rule))  # fmt: skip
        assert res.plan.drop == [0, 1] and res.drop_order is not None
        assert res.drop_order[-1] == 2 if rule == "distance" else 2 not in res.drop_order  # greedy: the 2 it dropped


def _odd_model(model_type: str) -> torch.nn.Module:
    """A 3-block tiny model of a transformers architecture with Llama-style names whose config or
    blocks limit what structured extraction can cut."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(any_tiny_config(model_type)).eval()


@pytest.mark.parametrize(
    ("model_type", "held", "why"),
    [
        ("helium", {"heads"}, r"config builds model\.layers\.0\.self_attn\.o_proj\.weight as \[64, 64\]"),
        ("llama4_text", {"mlp"}, r"route tokens through experts, not one dense MLP: --experts-keep"),
        ("bitnet", {"heads", "mlp"}, r"ffn_sub_norm\.weight spanning every channel"),
        ("diffllama", {"heads", "depth"}, r"differential attention"),
        ("falcon_h1", set(), ""),
    ],
)
def test_what_the_config_or_the_blocks_hold_is_kept_and_the_rest_slices(
    model_type: str, held: set[str], why: str, tmp_path: Path
) -> None:
    """Found on transformers' causal LMs with Llama-style names (bench/structured_archs.py): Helium's
    o_proj is as wide as the hidden size whatever the heads, so its config cannot describe a cut there
    (found by slicing a meta-device copy: `held_by_config`); Llama 4's blocks are MoE blocks, whose
    experts --experts-keep removes (its shared expert has its routed experts' width); BitNet's sub-norms span every head and channel; DiffLlama pairs heads and computes
    each block's λ from its index.  Those dimensions are held, the others slice to the zeroed model and
    reload with stock from_pretrained; Llama 4's `moe_layers` (block indices) follow the kept blocks, and a
    dropped Falcon-H1 block takes its Mamba branch with it."""
    model = _odd_model(model_type)
    anat = anatomy(model)
    anat.fixed.update(held_by_config(model, anat))
    assert set(anat.fixed) == held
    assert not held or re.search(why, " ".join(anat.fixed.values()))
    kept = Shape(
        anat.kv_heads if "heads" in held else 1, anat.intermediate if "mlp" in held else 40, 0 if "depth" in held else 1
    )
    reloaded, _ = sliced_as_zeroed(model, kept, [1, 2, 0], tmp_path)
    if model_type == "llama4_text":
        assert reloaded.config.moe_layers == [0, 1]
    if model_type == "helium":
        assert compensable(model) == ["down_proj"]  # its config has attention_bias; its o_proj never has a bias
        # the job searches the dimensions that can go, and the result (the manifest) names what was held
        res = structure(copy.deepcopy(model), random_scores(model), _ids(4, 16), ShapeTarget(keep=0.8))
        assert set(res.held) == {"heads"} and res.plan.shape.kv_groups == anat.kv_heads
        assert res.describe(model)["structure"]["held"] == res.held
        # a plan made by hand that cuts what the config holds
        groups, channels = unit_importance(random_scores(model), anat)
        with pytest.raises(UsageError, match=r"cannot slice HeliumForCausalLM to this plan: its config builds"):
            apply_plan(copy.deepcopy(model), make_plan(Shape(1, 96, 0), groups, channels, [0, 1, 2]))


def test_a_config_that_does_not_count_the_blocks_is_refused() -> None:
    """HRM's config counts its recurrent cycles in num_hidden_layers, not its ModuleList's blocks:
    rewriting that count would break it, so structured extraction refuses it by name."""
    with pytest.raises(UsageError, match=r"num_hidden_layers \(\d+\) does not count the blocks"):
        anatomy(_odd_model("hrm_text"))


def _only_text_blocks_pruned(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """An image-text model's 3 text blocks' 7 projections each half zeros; every other tensor (vision
    tower, projector, embeddings, norms) bit for bit the source's."""
    assert sorted(before) == sorted(after)
    blocks = [k for k in before if k.startswith("model.language_model.layers.") and k.endswith("proj.weight")]
    assert len(blocks) == 3 * 7
    for k in before:
        if k in blocks:
            assert (after[k] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), k
        else:
            assert torch.equal(after[k], before[k]), k


def test_a_multimodal_gemma3_is_carved_in_its_text_model(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """Gemma 3 from 4B up is `Gemma3ForConditionalGeneration` (a SigLIP tower beside the text model),
    the class AutoModelForCausalLM loads for it: its text blocks are the blocks (the vision tower is
    deeper here), slicing them equals zeroing and reloads, and `carve extract` prunes the text
    model alone: the vision tower, projector, embeddings and norms are the source's bit for bit, and
    stock from_pretrained reloads the output."""
    from carve.cli.main import main

    config = any_tiny_config("gemma3")
    config.vision_config.num_hidden_layers = 4  # deeper than the 3-block text model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert anatomy(model).prefix == "model.language_model.layers"
    sliced_as_zeroed(model, Shape(1, 40, 1), [1, 2, 0], tmp_path / "sliced")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["extract", str(src), "--domain", str(small_corpus), "--general", str(small_corpus), "--method",
            "sparsegpt", "--sparsity", "0.5", "--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2",
            "--cloze-items", "0", "--no-speed", "--quiet", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    before, after = model.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    _only_text_blocks_pruned(before, after)


def test_a_streamed_plan_the_config_cannot_describe_is_refused_before_writing(
    tmp_path: Path, tokenizer, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed structured extraction slices each block as it writes it, with no whole model to
    check at the end: the chosen plan is applied first to a meta-device copy, whose config must
    describe it.  Here `held_by_config` is made to miss Helium's heads (its o_proj is as wide as the
    hidden size whatever the heads): the job refuses with one line and writes nothing."""
    from carve.ops import structure as structure_module
    from carve.pipeline import Recipe, extract

    src = tmp_path / "helium"
    _odd_model("helium").save_pretrained(src)
    tokenizer.save_pretrained(src)
    monkeypatch.setattr(structure_module, "held_by_config", lambda _model, _anat, _pinned=None: {})
    recipe = Recipe(model=str(src), domain=str(small_corpus), general=str(small_corpus), method="magnitude",
                    structure=True, heads_keep=0.5, calib_blocks=4, block_len=32, eval_blocks=2, cloze_items=0,
                    speed=False, stream=True)  # fmt: skip
    with pytest.raises(UsageError, match=r"cannot slice HeliumForCausalLM to this plan: its config builds"):
        extract(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _mistral3(tokenizer: Any, out: Path) -> torch.nn.Module:
    """A tiny Mistral 3 image-text checkpoint (Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2,
    Ministral 3, Magistral) saved with `tokenizer` in `out`: a Pixtral tower beside a 3-block Mistral."""
    import transformers as tf

    text = tf.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                    image_size=32, patch_size=8, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def test_a_mistral3_image_text_checkpoint_is_carved_in_its_text_model(
    tmp_path: Path, tokenizer, small_corpus: Path
) -> None:
    """Mistral 3 checkpoints are image-text models transformers does not list among causal LMs: carve
    loads them with AutoModelForImageTextToText (their forward on token ids is the text model's). An
    unstructured extraction prunes the text blocks alone (the vision tower, projector, embeddings and
    norms bit for bit the source's), streamed gives the same tensors, a structured one narrows the
    text model and rewrites its text config, and each output loads with stock from_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from carve.cli.main import main

    model = _mistral3(tokenizer, tmp_path / "src")
    assert type(carve.load_model(str(tmp_path / "src")).model).__name__ == "Mistral3ForConditionalGeneration"
    assert anatomy(model).prefix == "model.language_model.layers"
    common = ["--domain", str(small_corpus), "--general", str(small_corpus), "--calib-blocks", "4", "--block-len",
              "32", "--eval-blocks", "2", "--cloze-items", "0", "--no-speed", "--quiet"]  # fmt: skip
    for name, extra in (("out", []), ("streamed", ["--stream"])):
        args = ["extract", str(tmp_path / "src"), *common, "--method", "sparsegpt", "--sparsity", "0.5", *extra]
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    before = model.state_dict()
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    _only_text_blocks_pruned(before, after)
    a, b = (
        load_file(str(tmp_path / "out" / "model.safetensors")),
        load_file(str(tmp_path / "streamed" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    args = ["extract", str(tmp_path / "src"), *common, "--structure", "--mlp-keep", "0.5", "--drop-blocks", "1"]
    assert main([*args, "--out", str(tmp_path / "structured")]) == 0
    small = AutoModelForImageTextToText.from_pretrained(tmp_path / "structured").eval()
    c = small.config.get_text_config()
    assert (c.num_hidden_layers, c.intermediate_size) == (2, 48)
    assert small.model.vision_tower.state_dict().keys() == model.model.vision_tower.state_dict().keys()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=ids).logits).all()
