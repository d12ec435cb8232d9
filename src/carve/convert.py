"""`carve convert` (and `carve densify`): a carve output, or any model carve loads, saved again in
another precision or format without re-running the job that made it.  Its manifest is carried
over, and its `saved` section says what was converted from what."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from carve.errors import UsageError
from carve.job import SAVE_DTYPES, manifest_start, save_model_files
from carve.manifest import MANIFEST_FILE, read_manifest
from carve.models.load import check_source, load_model
from carve.output import atomic_output_dir, claim, write_json

SAVE_FORMATS = ("dense", "sparse")
CARRIED = ("mask.safetensors", "importance.safetensors")  # a job's side files that stay true of the weights


def convert(
    src: str | Path, out: str | Path, save_dtype: str | None = None, save_format: str = "dense", overwrite: bool = False
) -> dict[str, Any]:
    """`src` written to `out` with its weights in `save_dtype` (None: its own precision) as plain
    safetensors (`dense`) or carve's sparse format; returns the output's manifest."""
    if save_dtype not in (None, *SAVE_DTYPES):
        raise UsageError(f"save-dtype must be one of {', '.join(SAVE_DTYPES)}, not {save_dtype!r}")
    if save_format not in SAVE_FORMATS:
        raise UsageError(f"save-format must be one of {', '.join(SAVE_FORMATS)}, not {save_format!r}")
    check_source(str(src))
    source = Path(src).expanduser()
    manifest = read_manifest(source) if (source / MANIFEST_FILE).is_file() else {}
    if str(Path(out).expanduser().resolve()) == str(source.resolve()):
        raise UsageError("--out is the source itself: write the conversion to another directory")
    with claim(out):
        lm = load_model(str(src))
        dtype = save_dtype or lm.source_dtype
        if not manifest:  # a model that is no carve output: a manifest saying where it came from
            manifest = manifest_start("convert", lm.source, lm.fingerprint)
        with atomic_output_dir(out, overwrite) as tmp:
            save_model_files(tmp, lm.model, lm.tokenizer, manifest, dtype, sparse=save_format == "sparse")
            for name in CARRIED:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            old = manifest.get("saved")
            before: dict[str, Any] = old if isinstance(old, dict) else {}
            saved: dict[str, Any] = {**before, "dtype": dtype, "format": save_format, "converted_from": str(source)}
            if before.get("dtype", lm.source_dtype) != dtype and "metrics" in manifest:
                saved["metrics_measured"] = f"before conversion, {before.get('metrics_measured', 'as it was saved')}"
            manifest["saved"] = saved
            write_json(tmp / MANIFEST_FILE, manifest)
    return manifest
