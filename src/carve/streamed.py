"""Streamed extraction: a model larger than memory pruned one decoder block at a time.

The model is a skeleton (models/skeleton.py): parameters on the meta device, the tensors outside
the blocks read at once, each block read from the safetensors shards when the layer-wise engine
reaches it.  `BlockStream` is the engine's hook pair (`Calibration.stream`):

- `enter(i)`: block i is read; the held-out evaluation's hidden states pass through it as it is
  (the "before" model);
- the engine calibrates and prunes it;
- `leave(i)`: the "after" hidden states pass through the pruned block, its tensors are written to
  the output's shards (models/stream.StreamWriter) in the saved dtype, and it is freed.

A structured extraction streams in passes (ops.structure with a `source`): unit importance block
by block, block distances and mean inputs, one pass per candidate split, then the writing pass, in
which `leave(i)` writes the block sliced to the plan (`Reshaped`) under its new index, or nothing
for a dropped block.

Both perplexities come from this one pass: after the last block, each set's final hidden states go
through the model's own final norm and head (every block's forward replaced by one that returns
them), exactly as a full forward would compute them.  The output is a plain (sharded) safetensors
checkpoint with its index, written like the source, so `from_pretrained` loads it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve.engines.gradient import returning
from carve.engines.layerwise import Relay, arity, as_block_output, capture_inputs
from carve.errors import UsageError
from carve.evaluation.perplexity import nll_sum
from carve.job import EvalData
from carve.models.arch import count_zeros
from carve.models.experts import uncounted
from carve.models.patch import replaced_forwards
from carve.models.skeleton import SkeletonModel
from carve.models.sparse import SparseWriter
from carve.models.stream import StreamWriter, quantization_method
from carve.progress import progress

EVAL_BATCH = 2  # as carve.evaluation.perplexity, so the sums are the same


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def statistics_budget(budget: int | None) -> int | None:
    """The bytes a layer-wise calibration may give one block's statistics (`Calibration.
    statistics_memory`; past it the block is calibrated in rounds, the same bits): `budget` when
    given (`--max-memory`), else half the memory available now (once the model is loaded)."""
    if budget is not None:
        return budget
    free = available_memory()
    return free // 2 if free else None


def weights_bytes(directory: Path, dtype: torch.dtype) -> int:
    """The size a checkpoint's weights take in memory in `dtype` (from the safetensors headers)."""
    from carve.models.stream import TensorSource

    with TensorSource(directory) as src:
        n = 0
        for name in src.names():
            count = math.prod(src.shape(name))
            n += count * (torch.empty((), dtype=dtype).element_size() if src.dtype(name).is_floating_point else 1)
    return n


@dataclass
class Reshaped:
    """What a streamed structured extraction writes for block i: `block(i)`, the read block sliced
    to the plan (a copy sharing its parameters), as block `index[i]`; nothing for a block not in
    `index` (dropped)."""

    block: Callable[[int], nn.Module]
    index: dict[int, int]


class BlockStream:
    """The layer-wise engine's hooks for a streamed extraction (see the module docstring)."""

    def __init__(self, skeleton: SkeletonModel, writer: StreamWriter | SparseWriter | None, held_out: EvalData,
                 save_dtype: torch.dtype, reshaped: Reshaped | None = None) -> None:  # fmt: skip
        self.sk = skeleton
        self.writer = writer
        self.save_dtype = save_dtype
        self.reshaped = reshaped
        self.batches = [(key, b) for key, (_, blocks) in held_out.blocks.items() for b in blocks.split(EVAL_BATCH)]
        self.zeros: dict[str, tuple[int, int]] = {}  # parameter -> (zeros, entries), as written
        self.entered: set[int] = set()
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self._calls: dict[tuple[int, ...], Any] = {}
        self._arity = 0  # how the blocks return (layerwise.arity)
        self._relays = Relay({}), Relay({})

    def start(self) -> None:
        """Write the tensors outside the blocks; capture the held-out hidden states entering block 0."""
        for name in self.sk.other_names():
            self._write(name, self.sk.parameter(name))
        for name, buf in self.sk.buffers_of(None):
            self._write_buffer(self.sk.buffer_names[name], buf)
        self.sk.load_block(0)
        ids = [b.to(self.sk.device) for _, b in self.batches]
        hidden, self._calls = capture_inputs(self.sk.model, self.sk.blocks, ids)
        self.before, self.after = list(hidden), list(hidden)
        self._relays = Relay(self._calls), Relay(self._calls)  # what blocks pass on, before and after pruning

        def shape_of(_m: Any, _a: Any, out: Any) -> None:  # block outputs: a tensor, or a tuple led by it
            self._arity = arity(out)
            handle.remove()

        handle = self.sk.blocks[0].register_forward_hook(shape_of)  # read off enter(0)'s first call

    @torch.no_grad()
    def enter(self, i: int) -> None:
        if i in self.entered:
            return
        self.entered.add(i)
        self.sk.load_block(i)
        relay, calls = self._relays[0], self._calls
        with uncounted(self.sk.blocks[i]):
            self.before = [
                relay.call(self.sk.blocks[i], h, calls[tuple(b.shape)][i], j)
                for j, ((_, b), h) in enumerate(zip(self.batches, self.before, strict=True))
            ]
        relay.advance()

    def captured(self) -> None:
        """The calibration's inputs to block 0 are captured: until the evaluation at the end only
        blocks run, so the embeddings, final norm and head are freed (for a 2.5B model with a 49k
        vocabulary and an untied head, 500 MB in bfloat16) and read again by `perplexities`."""
        self.sk.free_others()

    @torch.no_grad()
    def leave(self, i: int) -> None:
        if self.reshaped is not None and i not in self.reshaped.index:  # dropped: nothing runs, nothing is written
            self.sk.free_block(i)
            return
        block = self.sk.blocks[i] if self.reshaped is None else self.reshaped.block(i)
        named = (  # (parameter name, tensor), in the output model
            [(name, self.sk.parameter(name)) for name in self.sk.block_names(i)]
            if self.reshaped is None
            else [(f"{self.sk.prefix}.{self.reshaped.index[i]}.{n}", p) for n, p in block.named_parameters()]
        )
        if self.save_dtype not in (self.sk.dtype, torch.float32):  # measured as saved, as job.round_to_saved
            for _, p in named:
                if p.is_floating_point():
                    p.data = p.data.to(self.save_dtype).to(p.dtype)
            self.sk.bind_experts(i)  # an MoE's unfused experts: views of the rounded tensors
        calls, pairs, relay = self._calls, zip(self.batches, self.after, strict=True), self._relays[1]
        with uncounted(block):
            self.after = [relay.call(block, h, calls[tuple(b.shape)][i], j) for j, ((_, b), h) in enumerate(pairs)]
        relay.advance()
        for name, p in named:
            self._write(name, p)
        at = i if self.reshaped is None else self.reshaped.index[i]  # the block's number in the output
        for name, buf in self.sk.stored_buffers_in(i, block):  # of the block as written (sliced experts' too)
            self._write_buffer(self.sk.buffer_names[f"{self.sk.prefix}.{at}.{name}"], buf)  # as the source names it
        self.sk.free_block(i)

    def _write_buffer(self, name: str, buf: torch.Tensor) -> None:
        """A persistent buffer the source checkpoint holds, in the saved dtype (as save_pretrained
        writes a model cast to it), not counted among the weights."""
        if self.writer is not None:
            t = buf.detach()
            self.writer.write(name, t.to(self.save_dtype) if t.is_floating_point() else t)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        """`tensor` (parameter `name`) counted and written in the saved dtype: in plain safetensors
        under the source checkpoint's names (an MoE's fused experts split back per expert, as many as
        a sliced block keeps; a renamed tensor under its stored name; a renumbered block's as the
        source names that number's), as `save_pretrained` writes them; in the sparse format under the
        model's own name, as its state dict has it."""
        t = tensor.detach()
        self.zeros[name] = (count_zeros(t), t.numel())
        if self.writer is None:
            return
        t = t.to(self.save_dtype) if t.is_floating_point() else t
        as_source = not isinstance(self.writer, SparseWriter)
        for stored, part in self.sk.checkpoint_tensors(name, t) if as_source else [(name, t)]:
            self.writer.write(stored, part)

    @torch.no_grad()
    def perplexities(self, hidden: list[torch.Tensor], desc: str) -> dict[str, float]:
        """Per held-out set, exp of the mean next-token NLL, from the final hidden states."""
        self.sk.load_others()
        nll: dict[str, float] = {}
        count: dict[str, int] = {}
        for (key, ids), h in progress(list(zip(self.batches, hidden, strict=True)), desc):
            ids = ids.to(self.sk.device)
            out: Any = as_block_output(h, self._arity)

            with replaced_forwards(list(self.sk.blocks), returning(out)):  # every block returns the final states
                loss = nll_sum(self.sk.model, ids)
            nll[key] = nll.get(key, 0.0) + loss
            count[key] = count.get(key, 0) + ids[:, 1:].numel()
        return {key: math.exp(nll[key] / count[key]) for key in nll}


def metrics(ppl: dict[str, float], held_out: EvalData) -> dict[str, Any]:
    """The metrics a streamed pass measured, in `job.metrics_of`'s layout (no cloze: it is not
    streamed)."""
    out: dict[str, Any] = {}
    for key, (_, blocks) in held_out.blocks.items():
        out[f"{key}_ppl"] = round(ppl[key], 4)
        out[f"{key}_eval_blocks"] = len(blocks)
        out["block_len"] = blocks.shape[1]
    return out


def copy_side_files(source: Path, tmp: Path) -> None:
    """The source's generation config (the config and tokenizer are saved by the job)."""
    for name in ("generation_config.json",):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)


def streaming_reason(model: str | None, dtype: torch.dtype, forced: bool) -> str | None:
    """Why this extraction streams (None: it does not): --stream, or a local checkpoint whose
    weights would take more than half the memory available."""
    if forced:
        return "--stream"
    if model is None or not Path(model).expanduser().is_dir():
        return None
    path = Path(model).expanduser()
    if not any(path.glob("*.safetensors")) or not (path / "config.json").is_file():
        return None
    if quantization_method(path) not in (None, *STREAMED_QUANTIZATIONS):
        return None  # streaming cannot read it; transformers de-quantizes it on load
    free = available_memory()
    if free is None:
        return None
    try:
        need = weights_bytes(path, dtype)
    except UsageError:
        return None  # a damaged checkpoint: the loader reports it in its own words
    if need * 2 <= free:
        return None
    return f"the weights take {need / 2**30:.1f} GiB, more than half the {free / 2**30:.1f} GiB available"


def load_tokenizer(path: Path) -> Any:
    """A streamed job's tokenizer (from the model directory), with a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load the tokenizer of {str(path)!r} ({str(exc).splitlines()[0][:200]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def evaluate_streamed(
    model: str, held_out: Callable[[Any], EvalData], dtype: str | None = None, device: str | None = None
) -> tuple[dict[str, Any], str]:
    """Held-out perplexity of a local safetensors model one decoder block at a time (`carve eval
    --stream`): each block is read, the held-out hidden states passed through it, and freed; the
    final hidden states go through the model's own norm and head.  `held_out(tokenizer)` gives the
    evaluation data.  Returns the metrics (no cloze: it needs the whole model) and the fingerprint."""
    from carve.models.load import check_vocabulary, directory_fingerprint, resolve_device, resolve_dtype

    path = check_streamable(model)
    tok = load_tokenizer(path)
    dev = resolve_device(device)
    with SkeletonModel(path, resolve_dtype(dtype, dev), dev) as skeleton:
        check_vocabulary(tok, skeleton.model, model)
        data = held_out(tok)
        stream = BlockStream(skeleton, None, data, skeleton.dtype)
        stream.start()
        stream.captured()
        for i in progress(range(len(skeleton.blocks)), "evaluating (streamed)", total=len(skeleton.blocks)):
            stream.enter(i)
            skeleton.free_block(i)
        ppl = stream.perplexities(stream.before, "perplexity")
    return metrics(ppl, data), directory_fingerprint(path)


def check_streamable(model: str | None) -> Path:
    """The local safetensors directory a streamed extraction reads, or a clear error."""
    path = Path(str(model)).expanduser()
    if model is None or not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(
            "--stream reads a local model directory with config.json and safetensors weights "
            f"(not {model or 'the embedded GGUF default'!r}); convert it first with `carve convert`"
        )
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"--stream reads safetensors weights; {str(path)!r} has none")
    method = quantization_method(path)
    if method not in (None, *STREAMED_QUANTIZATIONS):
        raise UsageError(
            f"--stream reads float and MXFP4 checkpoints; {str(path)!r} is quantized ({method}): extract it "
            "without --stream (transformers de-quantizes it on load), or from a de-quantized copy"
        )
    return path


STREAMED_QUANTIZATIONS = ("mxfp4",)  # de-quantized as they are read (models/stream.TensorSource)
