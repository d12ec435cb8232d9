"""A model whose weights stay on disk until their turn: what streamed extraction runs on.

`SkeletonModel(DIR)` builds the model from its config with every parameter on the meta device
(no memory; buffers such as rotary frequencies are computed as usual), then reads the tensors
outside the decoder blocks (embeddings, final norm, head) from the checkpoint's safetensors.
`load_block(i)` reads block i's tensors (models/stream.TensorSource: one tensor at a time, from
any shard), `free_block(i)` puts them back on the meta device.  Tied parameters (a head tied to
the embeddings) stay one parameter.  Peak memory: the tensors outside the blocks, one block, and
whatever the caller keeps (calibration hidden states).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError
from carve.models.arch import find_blocks
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


def checkpoint_names(model: nn.Module, stored: list[str]) -> tuple[dict[str, str], list[str]]:
    """The model's name -> the checkpoint's, for the tensors transformers renames on load (its
    WeightRenaming rules: GPT-NeoX stores the head as `embed_out`), and the checkpoint tensors it
    instead converts into others (WeightConverter: Mixtral's per-expert matrices fused), which a
    streamed job cannot read one to one.  Empty where transformers has no such rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion rules loads names as stored
        return {}, []
    rules = get_model_conversion_mapping(model)  # type: ignore[arg-type]  # a PreTrainedModel
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    renamed: dict[str, str] = {}
    converted: list[str] = []
    for key in stored:
        new, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            converted.append(key)
        elif new != key:
            renamed[new] = key
    return renamed, converted


def tied_aliases(directory: Path, stored: set[str]) -> dict[str, str]:
    """For a checkpoint holding the tensors `stored`: every other name of a tied parameter (the
    model its config builds, on the meta device) -> the name it is stored under."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
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

    def __init__(self, directory: str | Path, dtype: torch.dtype, device: str | torch.device) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory).expanduser()
        self.dtype, self.device = dtype, torch.device(device)
        self.source = TensorSource(self.directory, mmap=False)  # pages read do not stay resident
        config = AutoConfig.from_pretrained(self.directory)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        self.model = model
        for module in model.modules():  # buffers are real (computed at construction): to the device
            for k, b in module._buffers.items():
                if b is not None:
                    module._buffers[k] = b.to(self.device)
        self.groups = parameter_groups(model)
        self.prefix, self.blocks = find_blocks(model)
        self._renamed, self._converted = checkpoint_names(model, self.source.names())
        self.specs = {name: (self._stored_name(name), self._shape(name)) for name in self.groups}
        for name in self.groups:
            if self._in_block(name) is None:
                self._load(name)

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
            if full in self._renamed:  # a name transformers renames on load (GPT-NeoX's embed_out -> lm_head)
                return self._renamed[full]
        if self._converted:
            raise UsageError(
                f"transformers rebuilds {name!r} of {str(self.directory)!r} on load from other tensors (for "
                f"example {', '.join(self._converted[:3])}, as it fuses a Mixtral's experts into one tensor); "
                "streaming reads the checkpoint's tensors one to one, so it loads in memory only (without --stream, "
                "given the memory to hold it)"
            )
        raise UsageError(
            f"{str(self.directory)!r} has no tensor {name!r}: streaming reads checkpoints whose tensor names are "
            "the model's own (save it with save_pretrained, or load it without --stream)"
        )

    def _shape(self, name: str) -> list[int]:
        module, attr, _ = self.groups[name][0]
        want = list(module._parameters[attr].shape)  # type: ignore[union-attr]
        stored = self.source.shape(self._stored_name(name))
        if list(stored) != want:
            raise UsageError(f"tensor {name!r} in {str(self.directory)!r} has shape {stored}, the config says {want}")
        return want

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        for module, attr, _ in self.groups[name]:
            module._parameters[attr] = param

    def _load(self, name: str) -> None:
        t = self.source.get(self.specs[name][0])
        self._set(name, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype))

    def block_names(self, i: int) -> list[str]:
        return [n for n in self.groups if self._in_block(n) == i]

    def other_names(self) -> list[str]:
        return [n for n in self.groups if self._in_block(n) is None]

    def parameter(self, name: str) -> torch.Tensor:
        module, attr, _ = self.groups[name][0]
        p = module._parameters[attr]
        assert p is not None
        return p

    def load_block(self, i: int) -> None:
        for name in self.block_names(i):
            if self.parameter(name).device.type == "meta":
                self._load(name)

    def free_block(self, i: int) -> None:
        self._free(self.block_names(i))

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
        """Every other name of a tied parameter -> the name it is stored under (a sparse model's
        `carve_aliases`: its state dict has both)."""
        return group_aliases(self.groups, {stored for stored, _ in self.specs.values()})

    def stored_specs(self) -> list[tuple[str, list[int]]]:
        """(name in the checkpoint, shape) of every parameter, in the model's order: what an output
        written like the source holds."""
        return [(stored, shape) for stored, shape in self.specs.values()]

    def __enter__(self) -> SkeletonModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
