"""Reading a carve.json: the one reader every command uses (inspect, report, recover, eval
--tasks, loading a delta output), so an empty, truncated or wrongly shaped manifest is one clear
error wherever it is met, never a KeyError or TypeError deep inside a command.

A manifest is checked against the shapes carve's readers rely on: each section, when present,
has the type listed in `SHAPE` (sections carve does not read are not checked; a missing section
is allowed, the readers treat it as unknown)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from carve.errors import UsageError

MANIFEST_FILE = "carve.json"

_NUM = (int, float)
_OPT_DICT = (dict, type(None))
_METRICS = {"domain_ppl": _NUM, "general_ppl": _NUM, "domain_cloze": _OPT_DICT, "forget_ppl": _NUM, "privleak": _NUM}
# dotted path -> accepted types; "*" stands for every key of a mapping
SHAPE: dict[str, Any] = {
    "job": str,
    "recipe": dict,
    "recipe.method": (str, type(None)),
    "recipe.pattern": (str, type(None)),
    "recipe.sparsity": (*_NUM, type(None)),
    "recipe.mix": (*_NUM, type(None)),
    "recipe.domain": (str, type(None)),
    "recipe.lora": (int, type(None)),
    "source": dict,
    "source.model": str,
    "data": dict,
    "data.eval": _OPT_DICT,
    "metrics": dict,
    **{f"metrics.{k}": _OPT_DICT for k in ("before", "after", "dense")},
    **{f"metrics.{k}.{m}": t for k in ("before", "after", "dense") for m, t in _METRICS.items()},
    **{f"metrics.{k}.domain_cloze.accuracy": _NUM for k in ("before", "after", "dense")},
    "size": dict,
    **{f"size.{k}": _NUM for k in ("parameters", "parameters_before", "parameters_after", "file_mb")},
    "sparsity": _OPT_DICT,
    "sparsity.linear": _NUM,
    "structure": _OPT_DICT,
    "structure.config": dict,
    "structure.config.num_hidden_layers": int,
    # one per block where the config holds them by block (Gemma 4's key/value heads)
    **{f"structure.config.{k}": (int, list) for k in ("num_key_value_heads", "intermediate_size")},
    "trainable": _OPT_DICT,
    "trainable.kind": str,
    "trainable.density": _NUM,
    "trainable.lora_rank": int,
    "mask": _OPT_DICT,
    "mask.kind": str,
    "mask.density": _NUM,
    "training": _OPT_DICT,
    "training.steps": int,
    "speed": _OPT_DICT,
    "speed.decode_speedup": _NUM,
    "timings_s": dict,
    "timings_s.*": _NUM,
    "peak_rss_mb": _NUM,
    "peak_rss_after_stage_mb": dict,
    "peak_rss_after_stage_mb.*": _NUM,
    "tasks": _OPT_DICT,
    "tasks.*": dict,
    "tasks.*.acc": _NUM,
}


def _type_names(types: Any) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {dict: "a mapping", str: "a string", int: "a whole number", float: "a number", type(None): "null",
             list: "a list"}  # fmt: skip
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _values(data: Any, path: list[str], where: str = "") -> list[tuple[str, Any]]:
    """The values at a dotted path ("*": every key), with their full dotted names."""
    if not path:
        return [(where, data)]
    if not isinstance(data, dict):
        return []
    head, rest = path[0], path[1:]
    keys = list(data) if head == "*" else [head] if head in data else []
    return [v for k in keys for v in _values(data[k], rest, f"{where}.{k}" if where else str(k))]


def check_manifest(data: Any, where: str) -> dict[str, Any]:
    """`data` as a manifest, or a UsageError naming the first value of the wrong shape."""
    if not isinstance(data, dict):
        raise UsageError(f"{where} is not a carve manifest: it holds {type(data).__name__}, not a mapping")
    for path, types in SHAPE.items():
        for name, value in _values(data, path.split(".")):
            bad = not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types))
            if bad or (isinstance(value, float) and not math.isfinite(value) and "ppl" not in name):
                raise UsageError(f"{where} is damaged: {name} is {value!r:.60}, not {_type_names(types)}")
    return data


def _as_tuple(types: Any) -> tuple[Any, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest `path` (a carve.json, or an output directory holding one), checked."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MANIFEST_FILE
    where = f"manifest {str(p)!r}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{str(p.parent)!r} is not a carve output: it has no {MANIFEST_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where} cannot be read ({exc})") from None
    if not text.strip():
        raise UsageError(f"{where} is empty (an interrupted write?): rerun the job that made it")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{where} is truncated or not JSON ({exc})") from None
    return check_manifest(data, where)
