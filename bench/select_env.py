"""The data-selection tools the select bench compares with, each in its own virtual environment:
`data-selection` 1.0.3 (DSIR; bench/.venv-dsir) and `zip-fit` 1.0.9 (bench/.venv-zipfit, with the
`zstandard` and `brotli` it imports without declaring them).

    .venv/bin/python bench/select_env.py      # build both (once)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, ensure_venv

DSIR_VENV = HERE / ".venv-dsir"
ZIPFIT_VENV = HERE / ".venv-zipfit"


def ensure_dsir() -> Path:
    return ensure_venv(DSIR_VENV, ["data-selection==1.0.3"])


def ensure_zipfit() -> Path:
    return ensure_venv(ZIPFIT_VENV, ["zip-fit==1.0.9", "zstandard", "brotli"])


if __name__ == "__main__":
    print(ensure_dsir(), ensure_zipfit())
