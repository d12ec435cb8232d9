"""What every bench script shares: the model dir, running a worker in its own process, the
commit a result was measured on, and the cached results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
MODEL_DIR = OUT / "smollm2-f32"
CALIB_BLOCKS, BLOCK_LEN, SEED = 64, 512, 0


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a worker; its last stdout line starting with "{" is its result."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def carve_worker(script: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`script --worker SPEC` in a fresh process that imports carve from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return run_json([sys.executable, script, "--worker", json.dumps(spec)], env)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def _src_state() -> tuple[str, str, bool]:
    """HEAD's short hash, its src/ tree and whether src/ has uncommitted changes."""
    dirty = bool(_git("status", "--porcelain", "src"))
    return _git("rev-parse", "--short", "HEAD"), _git("rev-parse", "HEAD:src"), dirty


_STARTED = _src_state()  # when this bench process started: its rows ran code from here on


def commit() -> str:
    """The carve commit the workers import (the checkout this script lives in), called as a row
    ends.  If src/ changed since this bench process started (a commit or an edit mid-run), the row
    may have run either code: its label says so, START→NOW."""
    head, tree, dirty = _src_state()
    label = head + ("+dirty" if dirty else "")
    if (tree, dirty) == _STARTED[1:]:
        return label  # the same src/ throughout (a commit outside src/ changes nothing the workers run)
    return f"{_STARTED[0]}{'+dirty' if _STARTED[2] else ''}→{label}"


def ensure_model() -> None:
    """The embedded default, de-quantized once to a float32 HF directory."""
    if (MODEL_DIR / "model.safetensors").exists():
        return
    import carve

    lm = carve.load_model()
    lm.model.save_pretrained(MODEL_DIR)
    lm.tokenizer.save_pretrained(MODEL_DIR)


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides bfloat16 speed on a CPU


def machine() -> dict[str, Any]:
    """The machine a row ran on: CPU model, cores and the instruction-set flags that decide
    bfloat16 speed (without AVX512-BF16 a bfloat16 matmul is several times slower), so rows from
    different machines are not read as one."""
    info: dict[str, Any] = {"cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(ln.split(":", 1) for ln in text.split("\n\n")[0].splitlines() if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["cpu"] = fields.get("model name", "")
    info["flags"] = [f for f in _FLAGS if f in flags]
    return info


def save_result(path: Path, row: dict[str, Any], ran_here: bool = True) -> None:
    """Append a row to a results file, with the machine it ran on unless it says (`ran_here`
    False: an older row saved again with a derived field, whose machine is not known)."""
    path.parent.mkdir(exist_ok=True)
    if ran_here:
        row.setdefault("machine", machine())
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def extract_row(m: dict[str, Any]) -> dict[str, Any]:
    """A bench row's facts from the manifest of carve's extraction job (`carve.extract`): the
    prune stage's time, the peak RSS when it ended (load + prune, and the source's evaluation
    unless carve's cache held it) and at the end, the perplexities after, and the data fingerprints
    that let the row be rebuilt and checked."""
    after = m["metrics"]["after"]
    return {
        "job": "carve.extract",
        "seconds": m["timings_s"]["prune"],
        "timings_s": m["timings_s"],
        **({"engine_seconds": m["engine_seconds"]} if "engine_seconds" in m else {}),  # the layer-wise engine's parts
        "peak_rss_prune_mb": m["peak_rss_after_stage_mb"]["prune"],
        "before_from_cache": m["metrics"]["before_from_cache"],
        "peak_rss_mb": m["peak_rss_mb"],
        "domain_ppl": after["domain_ppl"],
        "general_ppl": after["general_ppl"],
        "eval_blocks": after["domain_eval_blocks"],
        "linear_sparsity": m["sparsity"]["linear"],
        "all_sparsity": m["sparsity"]["all_parameters"],
        "data": m["data"],
        "source_fingerprint": m["source"]["fingerprint"],
    }


RESULTS_MD = HERE / "RESULTS.md"


def write_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Replace this script's section of bench/RESULTS.md (between its markers), keeping the
    other scripts' sections; a new section is appended."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        before, rest = old.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        new = before + block + ("\n" + after if after else "")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    path.write_text(new)


def ensure_venv(venv: Path, packages: list[str], env: dict[str, str] | None = None) -> Path:
    """A comparison tool's own virtual environment under bench/ (git-ignored), built once with
    `packages`; returns its python.  Complete only once its marker file is written: a build that
    failed or was killed is started over."""
    import shutil

    python, done = venv / "bin" / "python", venv / ".carve-complete"
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        cmd = [str(python), "-m", "pip", "install", "-q", *packages]
        subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})
        done.write_text(" ".join(packages) + "\n")
    return python


_MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "p = subprocess.run(sys.argv[2:], capture_output=True, text=True); "
    "json.dump({'rc': p.returncode, 'err': p.stderr[-2000:], 'wall': time.perf_counter() - t, "
    "'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(sys.argv[1], 'w'))"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` under a fresh python that has no other child: wall seconds and the command's
    peak RSS (MB, of its largest process)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = Path(f.name)
    subprocess.run([sys.executable, "-c", _MEASURE, str(report), *cmd], env=env, check=True)
    r = json.loads(report.read_text())
    report.unlink()
    if r["rc"] != 0:
        raise RuntimeError((r["err"].strip().splitlines() or ["no output"])[-1][:300])
    return {"wall_s": round(r["wall"], 2), "peak_rss_mb": round(r["rss_kb"] / 1024, 1)}


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's sha256, read 16 MB at a time."""
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for piece in iter(lambda: f.read(1 << 24), b""):
            h.update(piece)
    return h.hexdigest()[:16]
