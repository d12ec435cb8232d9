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
from carve.models.load import check_source, config_dtype, directory_fingerprint, load_model
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
        lazily = reads_lazily(source)
        lm = None if lazily else load_model(str(src))
        if lm is None:
            own, fingerprint = config_dtype(source / "config.json"), directory_fingerprint(source)
        else:
            own, fingerprint = lm.source_dtype, lm.fingerprint
        dtype = save_dtype or own
        if not manifest:  # a model that is no carve output: a manifest saying where it came from
            manifest = manifest_start("convert", str(src) if lm is None else lm.source, fingerprint)
        with atomic_output_dir(out, overwrite) as tmp:
            if lm is None:
                _convert_streamed(source, tmp, manifest, dtype, save_format)
            else:
                save_model_files(tmp, lm.model, lm.tokenizer, manifest, dtype, sparse=save_format == "sparse")
            for name in CARRIED:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            old = manifest.get("saved")
            before: dict[str, Any] = old if isinstance(old, dict) else {}
            saved: dict[str, Any] = {**before, "dtype": dtype, "format": save_format, "converted_from": str(source)}
            if before.get("dtype", own) != dtype and "metrics" in manifest:
                saved["metrics_measured"] = f"before conversion, {before.get('metrics_measured', 'as it was saved')}"
            manifest["saved"] = saved
            write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


def reads_lazily(source: Path) -> bool:
    """Whether `source` is a model directory whose weights are read one tensor at a time: plain
    safetensors (one file or shards) or carve's sparse format, with its config."""
    from carve.models.sparse import is_sparse_model

    if not source.is_dir() or not (source / "config.json").is_file():
        return False
    return is_sparse_model(source) or any((source / f).is_file() for f in ("model.safetensors",
                                                                           "model.safetensors.index.json"))  # fmt: skip


def _convert_streamed(source: Path, tmp: Path, manifest: dict[str, Any], dtype: str, save_format: str) -> None:
    """`source`'s tensors read, cast and written one at a time (peak memory: a tensor, whatever the
    model's size): plain safetensors under the stored names (tied names dropped, as save_pretrained
    drops them), or the sparse format (tied names as its aliases); config, generation config and
    tokenizer beside them.  The same files, bit for bit, as loading the model and saving it."""
    import torch
    from transformers import AutoTokenizer

    from carve.merge import set_config_dtype
    from carve.models.skeleton import tied_aliases
    from carve.models.sparse import SparseWriter
    from carve.models.stream import StreamWriter, TensorSource
    from carve.progress import progress

    target = getattr(torch, dtype)
    with TensorSource(source, mmap=False) as src:
        names = [n for n in src.names() if n not in src.aliases]
        kinds = {n: target if src.dtype(n).is_floating_point else src.dtype(n) for n in names}
        writer: StreamWriter | SparseWriter = (
            SparseWriter(tmp, {**tied_aliases(source, set(names)), **src.aliases})
            if save_format == "sparse"
            else StreamWriter(tmp, [(n, kinds[n], src.shape(n)) for n in names])
        )
        for n in progress(names, f"converting ({save_format}, {dtype})"):
            writer.write(n, src.get(n).to(kinds[n]))
        written = writer.close()
    for name in ("config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    set_config_dtype(tmp / "config.json", dtype)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    size = manifest.setdefault("size", {})
    if written is not None:
        size["sparse"] = written
    size["file_mb"] = round(sum(f.stat().st_size for f in tmp.glob("model*.safetensors")) / 2**20, 2)
