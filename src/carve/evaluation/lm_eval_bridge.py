"""lm-evaluation-harness on an in-memory carve model, fully offline.

The model and its tokenizer are handed to lm-eval's `HFLM` as objects (nothing is looked up on
a hub); the hub and datasets libraries are put in offline mode for the run.  Task names are
lm-eval's own, carve's shipped cloze tasks (`carve_cloze_legal`, `carve_cloze_code`,
`carve_cloze_general`), or tasks in YAML files under `include_path` (e.g. a local JSONL
multiple-choice set).  A task whose data is not on this machine fails with a one-line reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carve.errors import UsageError
from carve.evaluation.multiple_choice import builtin_tasks, task_yaml

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextmanager
def _offline() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _builtin_include(tmp: Path) -> Path:
    """The shipped cloze tasks as lm-eval YAMLs (absolute data paths) in a temporary folder."""
    for name, data in builtin_tasks().items():
        (tmp / f"{name}.yaml").write_text(task_yaml(name, data))
    return tmp


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys as acc / acc_stderr (numbers only)."""
    out = {}
    for key, value in result.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, flt = key.split(",", 1)
        out[metric if flt == "none" else f"{metric}[{flt}]"] = float(value)
    return out


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """Task name -> metrics (acc, acc_norm, perplexities, … with their _stderr) from lm-eval."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install 'carve[eval]' (or lm-eval)") from None
    if include_path is not None and not Path(include_path).expanduser().exists():
        raise UsageError(f"--include-path {include_path!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="carve-tasks-") as tmp, _offline():
        paths = [str(_builtin_include(Path(tmp)))]
        if include_path is not None:
            paths.append(str(Path(include_path).expanduser().resolve()))
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UsageError(
                f"unknown lm-eval task(s) {', '.join(unknown)} (add their YAML folder with --include-path)"
            )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
        except (ConnectionError, OSError, FileNotFoundError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"lm-eval could not load a task's data offline ({first[:200]})") from None
    assert out is not None
    return {name: _metrics(res) for name, res in out["results"].items()}
