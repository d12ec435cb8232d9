"""llama.cpp itself, for the export bench: llama-cpp-python built from its PyPI source (the only
llama.cpp build the package registries here offer) in bench/.venv-llamacpp, and one GGUF run in it.

    .venv/bin/python bench/llamacpp.py          # build the environment (once; ~10-30 min on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, ensure_venv

VENV = HERE / ".venv-llamacpp"
PACKAGES = ["llama-cpp-python==0.3.36", "numpy"]


def ensure_llamacpp() -> Path:
    """The environment's python (built from source on first use: CPU, this machine's instruction set)."""
    return ensure_venv(VENV, PACKAGES, env={"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": "2"})


def run_gguf(
    gguf: Path,
    blocks: list[list[int]],
    threads: int = 2,
    decode_tokens: int = 64,
    quality: bool = True,
    texts: list[str] | None = None,
    kv_f32: bool = False,
    save_logits: Path | None = None,
) -> dict[str, Any]:
    """llamacpp_worker.py's measures of `gguf` on the token `blocks` (see there); `texts` are also
    tokenized by llama.cpp's own tokenizer; `kv_f32`: keys and values cached in float32; `save_logits`:
    the first block's logits saved there (.npy)."""
    python = ensure_llamacpp()
    spec = {"gguf": str(gguf), "blocks": blocks, "threads": threads, "decode_tokens": decode_tokens,
            "quality": quality, "texts": texts or [], "kv_f32": kv_f32,
            "save_logits": str(save_logits) if save_logits else None}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.run([str(python), str(HERE / "llamacpp_worker.py"), f.name], capture_output=True, text=True)
    Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "llama.cpp worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(ensure_llamacpp())
