"""mergekit for the merge bench, in its own virtual environment (bench/.venv-mergekit): mergekit 0.1.5
with the CPU torch carve pins (an unpinned torch would pull a multi-GB CUDA build).

    .venv/bin/python bench/mergekit_env.py      # build it (once)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, ensure_venv

VENV = HERE / ".venv-mergekit"
PACKAGES = ["mergekit==0.1.5", "torch==2.13.0"]


def ensure_mergekit() -> Path:
    """The environment's python."""
    return ensure_venv(VENV, PACKAGES)


if __name__ == "__main__":
    print(ensure_mergekit())
