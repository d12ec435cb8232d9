"""Mixture-of-experts layers whose experts are fused in 3-D (or stacked 2-D) tensors, seen as one Linear per expert.

transformers keeps the experts of an MoE block (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek …)
as 3-D parameters, `gate_up_proj` (or `up_proj`) [E, out, in] and `down_proj` [E, out, in], or
[E, in, out] where the module says `is_transposed`, with flags its experts interface
(transformers.integrations.moe) sets on the module: `has_gate`, `has_bias`, `is_transposed`.  None
of them is a Linear, so carve's Linear-wise methods (the layer-wise engine's input statistics,
Wanda, SparseGPT, the OBS sweep, per-matrix masks) would not see them: most of an MoE block.

`unfused(model)` swaps each such module for an `ExpertLinears` module, for the duration of a job:
expert e's projections become `nn.Linear`s named `<experts>.<e>.gate_up_proj` and
`<experts>.<e>.down_proj` whose weights are *views* of the 3-D parameters ([out, in]; a transposed
view where the layout is [in, out]), so pruning them in place prunes the model, and the gradient
engine's gradients reach them.  Its forward is the experts' own computation (transformers' eager
loop), calling every expert's Linears on the tokens routed to it, so the layer-wise engine's
pre-hooks receive each expert's own inputs, weighted neither by the router nor by its top-k rank,
as SparseGPT's Hessian of that expert's matrix on those tokens.  Every expert is called on every
batch, with no tokens when none was routed to it, so each has a statistic; one that saw no token
over the whole calibration reads as the identity (carve.scorers.stats: pruned by magnitude).

Modules outside that interface are known by class name (`LAYOUTS`), each `Layout` stating its
projections (parameter, transposition), gate, call and weight shapes.  Llama 4's
`Llama4TextExperts`: [E, in, out] weights called on the hidden states alone, already routed (each
token repeated for every expert and scaled by that expert's routing weight, zero where it is not
among the token's top-k); its ExpertLinears calls each expert on its rows that are not zero, so
there its experts' statistics are routing-weighted.  DBRX's `DbrxExperts`: 2-D weights stacking
the experts along their rows, separate gate (w1) and up (v1), down (w2) transposed.  LongCat-Flash's
`LongcatFlashExperts`: identity experts past the routed ones.  JetMoE's `JetMoeParallelExperts`:
banks of one Linear per expert, called on runs of rows.  Inkling's `InklingSharedExperts`: every
token to every expert, weighted.  A weight of 3 or more dimensions that is none of these stays
dense, as every matrix of the blocks that is not a Linear: the manifest lists it among
`sparsity.not_pruned_in_blocks` and the CLI names it.

Masks and importance maps leave a job keyed by the model's own parameters (`fold`: a mask per
fused tensor, in its layout) and come in unfolded (`unfold`), so a saved mask or map belongs to the
model as transformers loads it, and `carve recover` or the sparse format read it like any other.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from carve import distributed
from carve.masks.mask import ImportanceMap, Mask, PackedKeep
from carve.settings import Targets

FLAGS = ("has_gate", "is_transposed", "has_bias")


@dataclass(frozen=True)
class Projection:
    """One of an expert's matrices, as the fused module holds every expert's."""

    param: str  # the parameter, relative to the experts module ("gate_up_proj", DBRX's "mlp.w1")
    transposed: bool = False  # an expert's slice is [in, out]: its Linear's weight is the transpose

    @property
    def name(self) -> str:
        """The per-expert Linear's name, `<experts>.<e>.<name>`."""
        return self.param.rpartition(".")[2]


@dataclass(frozen=True)
class Layout:
    """How a fused experts module holds its experts' weights and is called."""

    projections: tuple[Projection, ...]  # in the order an expert applies them, the down projection last
    # "fused": the first projection's output is the gate half, then the up half (`gate_up_proj`);
    # "split": the first two are the gate and the up projection (DBRX's w1, v1); "none": act(up);
    # "linear": one projection and nothing else, a bank of Linears (JetMoE's parallel experts)
    gate: str
    bias: bool  # `<projection>_bias` [E, out] beside each weight
    # how the module is called: "routed", transformers' experts interface, (hidden states, top-k
    # indices, top-k weights); "pre_routed", the hidden states alone, [E × tokens, hidden], expert
    # e's block of rows every token scaled by its routing weight, zero where e is not among the
    # token's top-k (Llama 4); "weighted", (hidden states, weights [tokens, E]): every token to
    # every expert (Inkling's shared experts); "sized", (inputs sorted by expert, each expert's
    # count): expert e takes its run of rows (JetMoE's banks, weighted and summed by their caller)
    call: str = "routed"
    act: str = "act_fn"  # the activation: the fused module's attribute (a dotted path)
    # 2-D weights holding the experts stacked along their rows, [E·rows, cols] (DBRX), the count
    # being this attribute of the module; None: 3-D, [E, rows, cols]
    count: str | None = None
    # this attribute of the module counts the experts a token may be routed to, past the ones whose
    # weights it holds: those are identity ("zero-compute") experts, returning the token as it came
    # (LongCat-Flash: its gate_up_proj has a slot for each, unused, its down_proj none)
    routable: str | None = None
    # PEFT's LoRA (`target_parameters`) can adapt the weights: it wraps the module holding each one,
    # which must be the module called with it (not DBRX's: its experts module reads w1, v1, w2 off
    # its child `mlp`, and the wrapper hides them)
    adaptable: bool = True


def interface_layout(module: nn.Module) -> Layout:
    """The layout transformers' experts interface states by its flags on the module."""
    t = bool(module.is_transposed)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return Layout((Projection(first, t), Projection("down_proj", t)), "fused" if module.has_gate else "none",
                  bool(module.has_bias))  # fmt: skip


# fused experts modules outside transformers' experts interface (no flags), by class name
LAYOUTS = {
    "Llama4TextExperts": Layout(
        (Projection("gate_up_proj", True), Projection("down_proj", True)), "fused", bias=False, call="pre_routed"
    ),
    # w1 (gate) and v1 (up) [E·ffn, hidden] as Linears hold them; w2 [E·ffn, hidden] is down's transpose
    "DbrxExperts": Layout(
        (Projection("mlp.w1"), Projection("mlp.v1"), Projection("mlp.w2", True)),
        "split",
        bias=False,
        act="mlp.activation_fn",
        count="num_experts",
        adaptable=False,
    ),
    "InklingSharedExperts": Layout(
        (Projection("gate_proj"), Projection("up_proj"), Projection("down_proj")), "split", bias=False, call="weighted"
    ),
    "JetMoeParallelExperts": Layout((Projection("weight"),), "linear", bias=False, call="sized"),
    "LongcatFlashExperts": Layout(
        (Projection("gate_up_proj"), Projection("down_proj")), "fused", bias=False, routable="total_experts"
    ),
}


def _parameter(module: nn.Module, path: str) -> nn.Parameter | None:
    try:
        return module.get_parameter(path)
    except AttributeError:
        return None


def layout(module: nn.Module) -> Layout | None:
    """The layout of a fused experts module: one of transformers' experts interface (its flags set on
    the module) or of `LAYOUTS`; None for any other module, or one whose weights are not as stated."""
    if isinstance(module, ExpertLinears):
        return None
    found = LAYOUTS.get(type(module).__name__)
    if found is None and all(hasattr(module, f) for f in FLAGS):
        found = interface_layout(module)
    if found is None:
        return None
    count = getattr(module, found.count, None) if found.count else None
    for p in found.projections:
        w = _parameter(module, p.param)
        if w is None or w.dim() != (2 if found.count else 3):
            return None
        if found.count and not (isinstance(count, int) and count > 0 and w.shape[0] % count == 0):
            return None
    return found


def is_fused_experts(module: nn.Module) -> bool:
    """A fused experts module carve sees as Linears (`layout`)."""
    return layout(module) is not None


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> fused experts module."""
    return {name: m for name, m in model.named_modules() if is_fused_experts(m)}


def expert_count(module: nn.Module) -> int:
    """The number of experts a fused experts module holds."""
    found = layout_of(module)
    if found.count:
        return int(getattr(module, found.count))
    # the least of the weights' leading sizes: LongCat-Flash's gate_up_proj also has (unused) slots
    # for its identity experts
    return min(int(module.get_parameter(p.param).shape[0]) for p in found.projections)


def expert_counts(module: nn.Module) -> set[int]:
    """The expert counts a router of `module`, a fused experts module or its ExpertLinears, may score:
    its experts, and all it routes to where identity experts follow them (LongCat-Flash); none for
    any other module."""
    if isinstance(module, ExpertLinears):
        fused, n = module.fused, module.count
    elif is_fused_experts(module):
        fused, n = module, expert_count(module)
    else:
        return set()
    routable = layout_of(fused).routable
    return {n} | ({int(getattr(fused, routable))} if routable else set())


def expert_weights(model: nn.Module, adaptable: bool | None = None) -> dict[str, nn.Parameter]:
    """Parameter name -> each fused experts module's expert weights (gate_up / up and down, …);
    `adaptable` True / False: only those PEFT's LoRA can / cannot adapt (`Layout.adaptable`)."""
    return {
        f"{n}.{p.param}": m.get_parameter(p.param)
        for n, m in fused_experts(model).items()
        if adaptable is None or layout_of(m).adaptable == adaptable
        for p in layout_of(m).projections
    }


def layout_of(module: nn.Module) -> Layout:
    """The layout of a module `is_fused_experts` holds true of."""
    found = layout(module)
    assert found is not None, type(module).__name__
    return found


class ExpertLinears(nn.Module):
    """A fused experts module as one set of Linears per expert (`experts.<e>.<projection>`), views of
    its parameters; the same forward."""

    fused: Any  # the transformers module (its gate, activation and flags), kept outside the module tree

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: its parameters are the views'
        self.layout = layout_of(fused)
        self.count = expert_count(fused)
        # children named by expert index, as transformers' per-expert checkpoints name them; not a
        # ModuleList, which carve.models.arch.find_blocks could take for the decoder blocks
        self.experts: list[nn.Module] = []
        for e in range(self.count):
            one = nn.Module()
            for p in self.projections:
                rows, cols = self.split(fused.get_parameter(p.param)).shape[1:]
                out, inp = (cols, rows) if p.transposed else (rows, cols)
                one.add_module(p.name, nn.Linear(inp, out, bias=self.layout.bias, device="meta"))
            self.add_module(str(e), one)
            self.experts.append(one)
        self.bind()
        self.routed = torch.zeros(len(self.experts), dtype=torch.long)  # tokens each expert was given
        self.counting = True  # forwards count their routed tokens (not an evaluation's: see `uncounted`)

    @property
    def projections(self) -> tuple[Projection, ...]:
        return self.layout.projections

    def projection(self, name: str) -> Projection | None:
        """The projection whose per-expert Linears are named `name`."""
        return next((p for p in self.projections if p.name == name), None)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped as one of the fused weights, seen per expert: [E, rows, cols] (a view)."""
        return t.view(self.count, -1, t.shape[-1]) if self.layout.count else t

    def stack(self, proj: Projection, per_expert: list[torch.Tensor], fill: bool | float) -> torch.Tensor:
        """The inverse of `split`: the experts' slices of `proj` (in the fused layout) as one fused
        tensor, any slot past them (an identity expert's, `Layout.routable`) `fill`."""
        slots = self.split(self.fused.get_parameter(proj.param)).shape
        rest = [torch.full(slots[1:], fill, dtype=per_expert[0].dtype)] * (slots[0] - len(per_expert))
        t = torch.stack([*per_expert, *rest])
        return t.reshape(-1, t.shape[-1]) if self.layout.count else t

    def bind(self) -> None:
        """Each expert's Linears made views of the fused module's parameters as they are now: a
        streamed job (models/skeleton) reads a block's fused tensors and frees them (to the meta
        device) one block at a time, and the views must follow, or hold what was freed.  They share
        the fused tensors' storage: pruning them in place prunes the model."""
        for p in self.projections:
            param = self.fused.get_parameter(p.param)
            bias = self.fused.get_parameter(f"{p.param}_bias") if self.layout.bias else None
            for e, w in enumerate(self.split(param.data).unbind(0)[: self.count]):
                lin = getattr(self.experts[e], p.name)
                lin.weight = nn.Parameter(w.t() if p.transposed else w, requires_grad=param.requires_grad)
                if bias is not None:
                    lin.bias = nn.Parameter(bias.data[e], requires_grad=param.requires_grad)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        given = [*args, *kwargs.values()]  # after the hidden states, by position or by the model's names
        call = self.layout.call
        if call == "pre_routed":
            return self._pre_routed(hidden_states)
        if call == "sized":  # rows sorted by expert, each expert's count of them
            runs = hidden_states.split([int(n) for n in given[0]], dim=0)
            return torch.cat([self._expert(e, x) for e, x in enumerate(runs)], dim=0)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if call == "weighted":  # every token to every expert, summed in float32 as Inkling's do
            weights = given[0].reshape(-1, self.count)
            total = sum(self._expert(e, x).float() * weights[:, e, None].float() for e in range(self.count))
            return torch.as_tensor(total).to(x.dtype).reshape(shape)
        index, weights = given[:2]  # top-k indices and weights
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            token, rank = torch.where(index == e)
            y = self._expert(e, x[token])
            out.index_add_(0, token, (y * weights[token, rank, None]).to(out.dtype))
        if self.layout.routable:  # identity experts past the ones with weights: the tokens as they came
            token, rank = torch.where((index >= self.count) & (index < getattr(self.fused, self.layout.routable)))
            out.index_add_(0, token, (x[token] * weights[token, rank, None]).to(out.dtype))
        return out.reshape(shape)

    def _pre_routed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[E × tokens, hidden], expert e's rows scaled by its routing weights: each expert called on
        its rows that are not zero (the tokens routed to it; a zero row's output is zero, as a bias-free
        expert computes it), so its Linears' statistics are of those tokens, routing-weighted."""
        x = hidden_states.view(len(self.experts), -1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            token = torch.where(x[e].ne(0).any(-1))[0]
            out[e, token] = self._expert(e, x[e, token]).to(out.dtype)
        return out.view(-1, x.shape[-1])

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' activation (read where called: gpt-oss's gate has its own, and no act_fn)."""
        act: Any = functools.reduce(getattr, self.layout.act.split("."), self.fused)
        return act(x)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's output on the tokens `x` routed to it (counted, outside an evaluation)."""
        if self.counting:
            self.routed[e] += x.shape[0]
        fused, expert = self.fused, self.experts[e]
        lins = [getattr(expert, p.name) for p in self.projections]
        act = self._act
        if self.layout.gate == "linear":
            return lins[0](x)
        if self.layout.gate == "split":
            h = act(lins[0](x)) * lins[1](x)
        elif self.layout.gate == "none":
            h = act(lins[0](x))
        elif hasattr(fused, "_apply_gate"):
            h = fused._apply_gate(lins[0](x))
        else:  # the experts interface's default gate: the first half gates the second
            gate, lin = lins[0](x).chunk(2, dim=-1)
            h = act(gate) * lin
        y = lins[-1](h)
        if getattr(fused, "has_post_expert_norm", False):
            y = fused.post_expert_norm(y)
        return y


_EXPERT_KEY = re.compile(r"^(?P<module>.+)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


@dataclass
class Unfused:
    """The fused experts modules a job unfused (name -> ExpertLinears), and the translation of masks
    and importance maps between their per-expert Linears and the model's fused parameters."""

    modules: dict[str, ExpertLinears]

    def __post_init__(self) -> None:
        # each fused parameter (`<experts>.<param>`) -> its experts module's name and projection
        self.params = {f"{n}.{p.param}": (n, p) for n, m in self.modules.items() for p in m.projections}

    def _expert(self, key: str) -> tuple[str, int] | None:
        """(`<experts>.<param>`, e) for an unfused expert's weight `<experts>.<e>.<proj>.weight`."""
        m = _EXPERT_KEY.match(key)
        unf = self.modules.get(m["module"]) if m else None
        proj = unf.projection(m["proj"]) if m and unf is not None else None
        return None if m is None or proj is None else (f"{m['module']}.{proj.param}", int(m["e"]))

    def fold_names(self, names: list[str]) -> list[str]:
        """Weight names with each unfused expert's replaced by its fused parameter's (once, in order)."""
        return list(dict.fromkeys(e[0] if (e := self._expert(n)) else n for n in names))

    def reference(self, ref: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Another model's tensors by name (a model, or a mapping such as a lazy file reader) as this
        job's names read them: an unfused expert's weight is its slice of the fused tensor, [out, in]."""
        return _PerExpert(self, dict(ref.named_parameters()) if isinstance(ref, nn.Module) else ref)

    def fold(self, per_linear: Mapping[str, torch.Tensor], fill: bool | float) -> dict[str, torch.Tensor]:
        """Per-expert entries (`<experts>.<e>.<proj>.weight`, [out, in]) stacked into each fused
        parameter (`<experts>.<param>`, in its layout); experts a job left out are `fill` (True for a
        mask: kept).  Other entries as they are."""
        return dict(self._folded(per_linear, fill))

    def _folded(self, per_linear: Mapping[str, torch.Tensor], fill: bool | float) -> Iterator[tuple[str, torch.Tensor]]:
        """`fold`'s entries one at a time, each entry of `per_linear` read when its own is built (a
        bit-packed mask is unpacked one fused tensor at a time)."""
        stacks: dict[str, dict[int, str]] = {}
        for key in per_linear:
            found = self._expert(key)
            if found is None:
                yield key, per_linear[key]
            else:
                stacks.setdefault(found[0], {})[found[1]] = key
        for name, experts in stacks.items():
            module, proj = self.params[name]
            unf = self.modules[module]
            given = {e: per_linear[key] for e, key in experts.items()}
            dtype = next(iter(given.values())).dtype
            rows = []
            for e, expert in enumerate(unf.experts):
                v = given.pop(e, None)
                if v is None:
                    v = torch.full(getattr(expert, proj.name).weight.shape, fill, dtype=dtype)
                rows.append(v.t() if proj.transposed else v)
            yield name, unf.stack(proj, rows, fill)

    def unfold(self, per_param: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `fold`: each fused parameter's entry as one per expert, [out, in]."""
        out: dict[str, torch.Tensor] = {}
        for key in per_param:
            if key not in self.params:
                out[key] = per_param[key]
                continue
            module, proj = self.params[key]
            unf = self.modules[module]
            for e, v in enumerate(unf.split(per_param[key]).unbind(0)[: unf.count]):
                out[f"{module}.{e}.{proj.name}.weight"] = v.t() if proj.transposed else v
        return out

    def fold_mask(self, mask: Mask) -> Mask:
        """The mask keyed by the model's parameters; a bit-packed one (the layer-wise methods') stays
        packed, unpacked one fused tensor at a time (an MoE's experts are most of its weights)."""
        if not self.modules:
            return mask
        keep: MutableMapping[str, torch.Tensor] = PackedKeep() if isinstance(mask.keep, PackedKeep) else {}
        for name, v in self._folded(mask, True):
            keep[name] = v
        return Mask(keep)

    def fold_map(self, imp: ImportanceMap) -> ImportanceMap:
        """Per-expert scores as one tensor per fused parameter (experts not scored: +inf, kept)."""
        if not self.modules:
            return imp
        meta = dict(imp.meta)
        flipped = [name for name, (_, p) in self.params.items() if p.transposed]
        if flipped:  # [E, in, out] (gpt-oss): rows and N:M groups taken on each expert's transpose
            meta["transposed"] = sorted({*meta.get("transposed", []), *flipped})
        stacked = {name: self.modules[m].count for name, (m, _) in self.params.items() if self.modules[m].layout.count}
        if stacked:  # [E·rows, cols] (DBRX): each expert's block of rows a matrix of its own
            meta["experts"] = {**meta.get("experts", {}), **stacked}
        return ImportanceMap(self.fold(imp, float("inf")), meta)

    def unfold_map(self, imp: ImportanceMap) -> ImportanceMap:
        return ImportanceMap(self.unfold(imp), dict(imp.meta)) if self.modules else imp

    def unrouted(self) -> list[str]:
        """The experts (`<experts>.<e>`) given no calibration token while unfused (none when no
        calibration ran through them)."""
        for m in self.modules.values():  # under torch.distributed: every rank's share of the calibration
            distributed.sum_(m.routed)
        if not any(int(m.routed.sum()) for m in self.modules.values()):
            return []
        return [f"{n}.{e}" for n, m in self.modules.items() for e in range(len(m.experts)) if m.routed[e] == 0]


class _PerExpert(Mapping[str, torch.Tensor]):
    """`Unfused.reference`: a model's tensors under an unfused job's names.  The fused tensors of the
    experts module last read are held, so a lazy reader (a file) reads each once for all its experts,
    not once per expert (the Linears come expert by expert, their projections alternating)."""

    def __init__(self, unf: Unfused, tensors: Mapping[str, torch.Tensor]) -> None:
        self.unf, self.tensors = unf, tensors
        self._held: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        expert = self.unf._expert(key)
        if expert is None:
            return self.tensors[key]
        name, e = expert
        module, proj = self.unf.params[name]
        if name not in self._held:
            if any(not held.startswith(f"{module}.") for held in self._held):
                self._held.clear()  # another module's: let them go
            self._held[name] = self.tensors[name]
        one = self.unf.modules[module].split(self._held[name])[e]
        return one.t() if proj.transposed else one

    def __contains__(self, key: object) -> bool:
        expert = self.unf._expert(key) if isinstance(key, str) else None
        return (expert[0] if expert else key) in self.tensors

    def __iter__(self) -> Iterator[str]:
        for key in self.tensors:
            if key not in self.unf.params:
                yield key
            else:
                module, proj = self.unf.params[key]
                yield from (f"{module}.{e}.{proj.name}.weight" for e in range(self.unf.modules[module].count))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@contextmanager
def uncounted(module: nn.Module) -> Iterator[None]:
    """Forwards of `module` that are not calibration (a streamed job's held-out evaluation runs
    through the unfused experts): the tokens routed to its experts are not counted."""
    found = [m for m in module.modules() if isinstance(m, ExpertLinears)]
    for m in found:
        m.counting = False
    try:
        yield
    finally:
        for m in found:
            m.counting = True


@contextmanager
def unfused(model: nn.Module) -> Iterator[Unfused]:
    """Each fused experts module of `model` replaced by its ExpertLinears while inside (see the
    module docstring); nothing changes for a model without any, or one already unfused.  On a
    streamed job's skeleton, whose fused tensors are read and freed block by block, the skeleton
    re-binds the views as it does (ExpertLinears.bind)."""
    found = fused_experts(model)
    swapped: dict[str, ExpertLinears] = {}
    try:
        for name, module in found.items():
            parent, _, child = name.rpartition(".")
            swapped[name] = ExpertLinears(module)
            model.get_submodule(parent).register_module(child, swapped[name])
        yield Unfused(swapped)
    finally:
        for name, unf in swapped.items():
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, unf.fused)  # as it was


def target_weights(model: nn.Module, targets: Targets) -> list[str]:
    """The weight names `targets` selects in `model`, an MoE's fused expert parameters among them
    (named once each, as the model names them)."""
    with unfused(model) as experts:
        return experts.fold_names([f"{n}.weight" for n in targets.linears(model)])


class CheckpointNames:
    """Entries keyed by a model's parameters (an importance map, Fisher diagonals) read under its
    checkpoint's tensor names, which a streamed merge reads tensor by tensor: a Mixtral checkpoint
    holds `block_sparse_moe.experts.<e>.w1 / w3 / w2` and `block_sparse_moe.gate`, which
    transformers fuses and renames on load (`mlp.experts.gate_up_proj`, `mlp.gate`) and splits and
    renames again on save.  The translation is transformers' own reverse conversion
    (`revert_weight_conversion`), run on a meta-device model built from `config`: first on the
    entries' shapes, to learn which entry holds each checkpoint name, then on one entry's values at
    a time, held while its experts are read."""

    def __init__(self, config: Any, shapes: dict[str, list[int]]) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        from carve.models.load import causal_lm_class

        self._revert = revert_weight_conversion
        with torch.device("meta"):
            self._model = causal_lm_class(config).from_config(config)
        self.source: dict[str, str] = {}  # checkpoint name -> the entry that holds it, where they differ
        for key, shape in shapes.items():
            for name in revert_weight_conversion(self._model, {key: torch.empty(shape, device="meta")}):
                if name != key:
                    self.source[name] = key
        self._held: tuple[str, dict[str, torch.Tensor]] | None = None

    def get(self, name: str, read: Any) -> torch.Tensor | None:
        """The checkpoint tensor `name`'s entry, `read(key)` giving an entry by its own key (None:
        no entry holds `name`)."""
        key = self.source.get(name)
        if key is None:
            return None
        if self._held is None or self._held[0] != key:
            self._held = (key, self._revert(self._model, {key: read(key)}))
        return self._held[1][name]
