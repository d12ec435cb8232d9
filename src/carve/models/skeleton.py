"""A model whose weights stay on disk until their turn: what streamed extraction runs on.

`SkeletonModel(DIR)` builds the model from its config with every parameter on the meta device
(no memory; buffers such as rotary frequencies are computed as usual), then reads the tensors
outside the decoder blocks (embeddings, final norm, head) from the checkpoint's safetensors.
`load_block(i)` reads block i's tensors (models/stream.TensorSource: one tensor at a time, from
any shard), `free_block(i)` puts them back on the meta device.  Tied parameters (a head tied to
the embeddings) stay one parameter.  Peak memory: the tensors outside the blocks, one block, and
whatever the caller keeps (calibration hidden states).

A parameter transformers builds on load from several checkpoint tensors (an MoE's per-expert
matrices fused into one 3-D tensor: `Conversions`) is read with transformers' own conversion and
written back split as `save_pretrained` would.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError
from carve.models.arch import find_blocks
from carve.models.experts import ExpertLinears
from carve.models.stream import TensorSource


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within, every parameter a module registers is moved to the meta device as it is registered
    (buffers are not: they are computed from the config, not read from the checkpoint)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, str]]]:
    """Every parameter with all the (module, attribute, full name) triples that hold it (tied ones
    share), keyed by its first name."""
    groups: dict[str, list[tuple[nn.Module, str, str]]] = {}
    first: dict[int, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{attr}" if mname else attr
            key = first.setdefault(id(p), full)
            groups.setdefault(key, []).append((module, attr, full))
    return groups


class _Viewing(torch.Tensor):
    """A tensor whose `contiguous()` is itself, so that transformers' reverse conversion, which makes
    each split piece contiguous for saving, hands back views of the tensor instead of copies."""

    def contiguous(self, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return self


class Conversions:
    """transformers' load-time rules for a checkpoint's tensor names (its conversion mapping) applied
    one model parameter at a time, as a streamed job reads and writes them:

    - `renamed`: the model's name -> the checkpoint's, for a tensor transformers renames on load
      (its WeightRenaming rules: GPT-NeoX stores the head as `embed_out`; Mixtral its router as
      `block_sparse_moe.gate`);
    - `fused`: a parameter transformers builds from several checkpoint tensors (WeightConverter: a
      Mixtral's or Qwen-MoE's per-expert matrices stacked into one 3-D tensor) -> those tensors
      (name, the rule's source pattern), in the order transformers stacks them.  `read` builds
      such a parameter with transformers' own converter, `checkpoint_tensors` splits it back with
      its reverse (what `save_pretrained` writes);
    - `split`: a parameter transformers cuts out of one checkpoint tensor with others (a one-to-many
      WeightConverter: HRM's `attn.gqkv_proj` chunked into its attention's gate, q, k and v) -> that
      tensor, its rule's source pattern and every parameter cut from it, in order.  `read` cuts them
      with transformers' converter (the tensor read once for all of them); `checkpoint_tensors` joins
      them back once each has been given.

    Empty where transformers has no such rules (or none of them)."""

    def __init__(self, model: nn.Module, stored: list[str], shape: Callable[[str], list[int]] | None = None) -> None:
        self.model = model
        self.renamed: dict[str, str] = {}
        self.fused: dict[str, list[tuple[str, str]]] = {}
        self.split: dict[str, tuple[str, str, list[str]]] = {}
        self._converters: dict[str, Any] = {}  # source pattern -> its WeightConverter (copied for each use)
        self._cut: tuple[str, dict[str, torch.Tensor]] | None = None  # the checkpoint tensor last cut, its parts
        self._given: dict[str, dict[str, torch.Tensor]] = {}  # a split tensor's parts given so far, until all are
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (
                WeightConverter,
                WeightRenaming,
                dot_natural_key,
                rename_source_key,
            )
        except ImportError:  # a transformers without conversion rules loads names as stored
            return
        rules = get_model_conversion_mapping(model)  # type: ignore[arg-type]  # a PreTrainedModel
        renamings = [r for r in rules if isinstance(r, WeightRenaming)]
        converters = [r for r in rules if isinstance(r, WeightConverter)]
        self._converters = {pattern: c for c in converters for pattern in c.source_patterns}
        for key in sorted(stored, key=dot_natural_key):  # transformers' order: expert 2 before expert 10
            new, pattern = rename_source_key(key, renamings, converters)
            if pattern is None:
                if new != key:
                    self.renamed[new] = key
                continue
            rule = self._converters[pattern]
            if shape is not None and len(rule.source_patterns) == 1 and len(rule.target_patterns) > 1:
                # one tensor cut into several parameters: their names, from the rule run on its shape
                parts = list(self._convert(new, [(key, pattern)], lambda k: torch.empty(shape(k), device="meta")))
                self.split.update({part: (key, pattern, parts) for part in parts})
            else:
                self.fused.setdefault(new, []).append((key, pattern))

    def _convert(
        self, name: str, sources: list[tuple[str, str]], get: Callable[[str], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        import copy

        converter = copy.deepcopy(self._converters[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, functools.partial(get, key))  # read when converted
        return converter.convert(name, model=self.model, config=self.model.config)

    def read(self, name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Parameter `name` as transformers builds it on load: fused from its checkpoint tensors, or
        cut from its one (`get(stored name)`; read once for all the parameters cut from it)."""
        if name in self.split:
            key, pattern, parts = self.split[name]
            if self._cut is None or self._cut[0] != key or name not in self._cut[1]:
                self._cut = (key, self._convert(parts[0], [(key, pattern)], get))
            part = self._cut[1].pop(name).clone()  # its own storage, not a view of the whole tensor
            if not self._cut[1]:
                self._cut = None
            return part
        out = self._convert(name, self.fused[name], get)
        if list(out) != [name]:
            raise UsageError(f"transformers' conversion of {name!r} gave {sorted(out)[:3]}, not the one tensor")
        return out[name]

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fused parameter `name`'s value as the checkpoint's tensors (views where the reverse
        conversion splits; a meta tensor gives their names and shapes).  A parameter cut from one
        checkpoint tensor gives nothing until every part of that tensor has been given, then the
        tensor joined (as `save_pretrained` writes it)."""
        if name in self.split:
            key, _, parts = self.split[name]
            given = self._given.setdefault(key, {})
            given[name] = tensor
            if len(given) < len(parts):
                return {}
            del self._given[key]
            return self.joined({p: given[p] for p in parts})
        return self.joined({name: tensor})

    def joined(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters by name as the checkpoint's tensors (transformers' reverse conversion)."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, params)  # type: ignore[arg-type]

    def read_into(self, name: str, out: torch.Tensor, get: Callable[[str], torch.Tensor]) -> bool:
        """Fill `out` (fused parameter `name`'s shape) with its checkpoint tensors one at a time, each
        copied into the view of `out` the reverse conversion gives it (taken before it is made
        contiguous): no stacked copies, one tensor read at a time beside `out`.  Only where those
        views tile `out` exactly (each contiguous, none overlapping, all of it covered: what stacking
        and concatenating undo); False, `out` untouched, where they do not (`read` then builds it
        with transformers' converter)."""
        views = self.checkpoint_tensors(name, out.as_subclass(_Viewing))
        parts = {k: v.as_subclass(torch.Tensor) for k, v in views.items()}
        if set(parts) != {k for k, _ in self.fused[name]}:
            return False
        spans = []
        for view in parts.values():
            if not view.is_contiguous() or view.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
                return False
            spans.append((view.storage_offset(), view.numel()))
        at = out.storage_offset()
        for offset, n in sorted(spans):
            if offset != at:
                return False
            at += n
        if at != out.storage_offset() + out.numel():
            return False
        for key, view in parts.items():
            view.copy_(get(key))
        return True


def tied_aliases(directory: Path, stored: set[str]) -> dict[str, str]:
    """For a checkpoint holding the tensors `stored`: every other name of a tied parameter (the
    model its config builds, on the meta device) -> the name it is stored under."""
    from transformers import AutoConfig

    from carve.models.load import causal_lm_class

    config = AutoConfig.from_pretrained(directory)
    with parameters_on_meta():
        model = causal_lm_class(config).from_config(config)
    return group_aliases(parameter_groups(model), stored)


def group_aliases(groups: dict[str, list[tuple[nn.Module, str, str]]], stored: set[str]) -> dict[str, str]:
    """Every name of a parameter group that is not among `stored` -> the group's first stored name."""
    out = {}
    for group in groups.values():
        kept = [full for _, _, full in group if full in stored]
        out.update({full: kept[0] for _, _, full in group if kept and full not in stored})
    return out


class SkeletonModel:
    """A causal LM from a safetensors directory, its decoder blocks read and freed one at a time."""

    def __init__(
        self, directory: str | Path, dtype: torch.dtype, device: str | torch.device, others: bool = True
    ) -> None:
        """`others` False: the tensors outside the blocks stay on the meta device too (a streamed GGUF
        export reads each at its turn, `state_items`)."""
        from carve.engines.activations import bound_heap_retention
        from carve.models.load import causal_lm_class, read_config

        # each block's freed buffers go back to the OS, not into a growing heap: without it, reading
        # and freeing the upcycled MoE's blocks (an MoE's per-expert tensors, stacked) grew the
        # process by about a block each time (bench/RESULTS.md, stream-moe notes)
        bound_heap_retention()
        self.directory = Path(directory).expanduser()
        self.dtype, self.device = dtype, torch.device(device)
        self.source = TensorSource(self.directory, mmap=False)  # pages read do not stay resident
        config = read_config(self.directory)
        if self.source.dequantizes:  # read as floats (an MXFP4 gpt-oss): the output is a float model
            del config.quantization_config
        with parameters_on_meta():
            model = causal_lm_class(config).from_config(config, dtype=dtype)
        model.eval()
        self.model = model
        for module in model.modules():  # buffers are real (computed at construction): to the device
            for k, b in module._buffers.items():
                if b is not None:
                    module._buffers[k] = b.to(self.device)
        self.groups = parameter_groups(model)
        self.prefix, self.blocks = find_blocks(model)
        self.held = {name: self._held_by(name) for name in self.groups}  # the blocks holding each parameter
        self.conversions = Conversions(model, self.source.names(), self.source.shape)
        # name -> (the checkpoint's name, shape); a fused parameter's "name" is its own (it is read
        # from several tensors: `conversions`), as carve's sparse format stores it
        self.specs = {name: (self._stored_name(name), self._shape(name)) for name in self.groups}
        for name in self.groups:
            if others and self._in_block(name) is None:
                self._load(name)
        # persistent buffers the checkpoint holds (DeepSeek-V3's per-expert `e_score_correction_bias`,
        # LFM2-MoE's `expert_bias`: small) read now, in the dtype the model made them, kept, and
        # written back with their block: name -> the name the checkpoint holds it under (Kimi-Linear's
        # `block_sparse_moe`, renamed `mlp` on load)
        self.buffer_names: dict[str, str] = {}
        for mname, module in model.named_modules():
            for attr, buf in module._buffers.items():
                full = f"{mname}.{attr}" if mname else attr
                stored = full if full in self.source else self.conversions.renamed.get(full)
                if buf is not None and attr not in module._non_persistent_buffers_set and stored is not None:
                    module._buffers[attr] = self.source.get(stored).to(self.device, buf.dtype)
                    self.buffer_names[full] = stored

    def block_of(self, name: str) -> int | None:
        """The decoder block parameter `name` belongs to (None: outside the blocks)."""
        return self._in_block(name)

    def _in_block(self, name: str) -> int | None:
        rest = name.removeprefix(self.prefix + ".") if name.startswith(self.prefix + ".") else None
        return None if rest is None else int(rest.split(".", 1)[0])

    def _stored_name(self, name: str) -> str:
        for _, _, full in self.groups[name]:
            if full in self.source:
                return full
            if full in self.conversions.renamed:  # renamed on load (GPT-NeoX's embed_out -> lm_head)
                return self.conversions.renamed[full]
            if full in self.conversions.fused or full in self.conversions.split:  # built on load from several
                return full  # (an MoE's per-expert matrices), or cut from one with others (HRM's gqkv_proj)
        raise UsageError(
            f"{str(self.directory)!r} has no tensor {name!r}: streaming reads checkpoints whose tensor names are "
            "the model's own or transformers' (save it with save_pretrained, or load it without --stream)"
        )

    def _shape(self, name: str) -> list[int]:
        module, attr, _ = self.groups[name][0]
        want = list(module._parameters[attr].shape)  # type: ignore[union-attr]
        stored = self._stored_name(name)
        expect = {stored: want}
        if stored in self.conversions.split:  # the tensor it is cut from, as all its parts join back
            parts = {
                p: torch.empty(self.model.get_parameter(p).shape, device="meta")
                for p in self.conversions.split[stored][2]
            }
            expect = {k: list(t.shape) for k, t in self.conversions.joined(parts).items()}
        elif stored in self.conversions.fused:  # each tensor it is read from, as the reverse conversion lays it out
            parts = self.conversions.checkpoint_tensors(stored, torch.empty(want, device="meta"))
            expect = {k: list(t.shape) for k, t in parts.items()}
            if set(expect) != {k for k, _ in self.conversions.fused[stored]}:
                raise UsageError(
                    f"{name!r} of {str(self.directory)!r} would not be saved to the tensors it is read from "
                    f"({', '.join(sorted(expect)[:2])}…): streaming could not write it back; load it without --stream"
                )
        for key, shape in expect.items():
            if list(self.source.shape(key)) != shape:
                raise UsageError(
                    f"tensor {key!r} in {str(self.directory)!r} has shape {self.source.shape(key)}, the config says "
                    f"{shape}"
                )
        return want

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        for module, attr, _ in self.groups[name]:
            module._parameters[attr] = param

    def _read(self, name: str) -> torch.Tensor:
        """Parameter `name` as the checkpoint stores it (its dtype), not kept; one the model builds from
        several checkpoint tensors, or cuts from one, as `_load` reads it."""
        stored = self.specs[name][0]
        if stored in self.conversions.fused or stored in self.conversions.split:
            self._load(name)
            t = self.parameter(name).data
            self._free([name])
            return t
        return self.source.get(stored).to(self.device)

    def _load(self, name: str) -> None:
        stored, shape = self.specs[name]
        if stored in self.conversions.fused:
            # the checkpoint tensors copied one by one into the parameter where transformers' reverse
            # conversion shows how (a Mixtral's experts: 1x the fused tensor, where stacking them took 2x)
            kind = self.source.dtype(self.conversions.fused[stored][0][0])
            t = torch.empty(shape, dtype=self.dtype if kind.is_floating_point else kind, device=self.device)
            if self.conversions.read_into(stored, t, self.source.get):
                self._set(name, t)
                return
            del t
            t = self.conversions.read(stored, self.source.get)
        elif stored in self.conversions.split:
            t = self.conversions.read(stored, self.source.get)
        else:
            t = self.source.get(stored)
        self._set(name, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype))

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Parameter `name`'s value as the checkpoint holds it: (name in the checkpoint, tensor),
        several for a parameter transformers fuses on load (as `save_pretrained` writes them); one
        the source does not hold (a bias that bias compensation adds) under the model's name."""
        if name not in self.specs:
            return [(name, tensor)]
        stored = self.specs[name][0]
        if stored not in self.conversions.fused and stored not in self.conversions.split:
            return [(stored, tensor)]
        return list(self.conversions.checkpoint_tensors(stored, tensor).items())

    def block_names(self, i: int) -> list[str]:
        """The parameters block i owns (writes): those whose first name is in it."""
        return [n for n in self.groups if self._in_block(n) == i]

    def _held_by(self, name: str) -> list[int]:
        """The blocks that hold parameter `name`: one, or several for weights tied across blocks
        (Zamba's shared transformer), which stay read from the first of them to the last."""
        found = {self._in_block(full) for _, _, full in self.groups[name]}
        return sorted(i for i in found if i is not None)

    def other_names(self) -> list[str]:
        return [n for n in self.groups if self._in_block(n) is None]

    def parameter(self, name: str) -> torch.Tensor:
        module, attr, _ = self.groups[name][0]
        p = module._parameters[attr]
        assert p is not None
        return p

    def load_block(self, i: int) -> None:
        for name in self.groups:
            if i in self.held[name] and self.parameter(name).device.type == "meta":
                self._load(name)
        self.bind_experts(i)

    def free_block(self, i: int) -> None:
        # what block i owns, or holds last of several (a tensor outside the blocks stays: free_others)
        self._free([n for n, held in self.held.items() if held and held[-1] == i and self._in_block(n) is not None])
        self.bind_experts(i)

    def bind_experts(self, i: int) -> None:
        """Block i's experts, where a job unfused them (models/experts), as views of what is now
        read (or of nothing: freed)."""
        for module in self.blocks[i].modules():
            if isinstance(module, ExpertLinears):
                module.bind()

    def free_others(self) -> None:
        """The tensors outside the blocks (embeddings, final norm, head) back on the meta device:
        the block-by-block passes do not read them."""
        self._free(self.other_names())

    def load_others(self) -> None:
        for name in self.other_names():
            if self.parameter(name).device.type == "meta":
                self._load(name)

    def _free(self, names: list[str]) -> None:
        for name in names:
            p = self.parameter(name)
            self._set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def close(self) -> None:
        self.source.close()

    def aliases(self) -> dict[str, str]:
        """Every other name of a tied parameter -> its first, the one a sparse model stores it under
        (its `carve_aliases`: the model's state dict has both)."""
        return group_aliases(self.groups, set(self.groups))

    def stored_specs(self) -> list[tuple[str, list[int]]]:
        """(name in the checkpoint, shape) of every tensor the checkpoint holds, in the model's order:
        what an output written like the source holds."""
        params = [(stored, list(t.shape)) for name, (_, shape) in self.specs.items()
                  for stored, t in self.checkpoint_tensors(name, torch.empty(shape, device="meta"))]  # fmt: skip
        return params + [(self.buffer_names[n], list(self.model.get_buffer(n).shape)) for n in self.buffer_names]

    def buffers_of(self, i: int | None) -> list[tuple[str, torch.Tensor]]:
        """The stored persistent buffers of block i (None: outside the blocks), by name."""
        return [(name, self.model.get_buffer(name)) for name in self.buffer_names if self._in_block(name) == i]

    def stored_buffers_in(self, i: int, block: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The buffers of `block` (block i, or a sliced copy of it) that the checkpoint holds for
        block i, by their names within the block."""
        stored = {name.removeprefix(f"{self.prefix}.{i}.") for name, _ in self.buffers_of(i)}
        return [(name, buf) for name, buf in block.named_buffers() if name in stored]

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's state dict, entry by entry in its order (tied names too), each decoder block
        read when its first entry comes and freed after its last: a streamed GGUF export's tensors.  A
        tensor outside the blocks that is not held (`others` False) is read at its turn as the
        checkpoint stores it (bfloat16 stays bfloat16: a 262k-token embedding has no float32 copy) and
        not kept."""
        alias = self.aliases()
        held: int | None = None
        for name, t in self.model.state_dict().items():  # parameters on the meta device: names and order
            key = alias.get(name, name)
            if key in self.groups:
                i = self.block_of(key)
                if i != held:
                    if held is not None:
                        self.free_block(held)
                    if i is not None:
                        self.load_block(i)
                    held = i
                t = self.parameter(key)
                if t.device.type == "meta" and self._in_block(key) is None:
                    t = self._read(key)
            yield name, t
        if held is not None:
            self.free_block(held)

    def __enter__(self) -> SkeletonModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
