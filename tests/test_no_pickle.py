"""No file a user is handed can run code (issue 20): carve writes safetensors, JSON and text only,
reads checkpoints as safetensors + JSON, and unpickles a model's .bin weights as tensors only."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

from carve.cli.main import main

SRC = Path(__file__).resolve().parents[1] / "src" / "carve"
TRAIN = ["--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet"]


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_unpickling_in_carve() -> None:
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\b(pickle|dill|joblib)\.loads?\(", text), path
        assert not re.search(r"torch\.load\(", text), path
        assert "weights_only=False" not in text, path


def _is_pickle(data: bytes) -> bool:
    return (len(data) > 1 and data[0] == 0x80 and data[1] <= 5) or (data[:4] == b"PK\x03\x04" and b".pkl" in data)


def _check_no_pickles(root: Path) -> int:
    n = 0
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not _is_pickle(data), f
            if f.suffix == ".json":
                json.loads(data)
            n += 1
    return n


def test_every_file_carve_writes_is_data(tmp_path: Path, model_dir: Path, small_corpus: Path, monkeypatch) -> None:
    out, ft = tmp_path / "out", tmp_path / "ft"
    sides = [tmp_path / "mask.safetensors", tmp_path / "imp.safetensors"]
    assert main(["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
                 "--method", "wanda", "--granularity", "global", "--out", str(out), "--save-mask", str(sides[0]),
                 "--save-importance", str(sides[1]), "--calib-blocks", "4", "--no-speed", "--report", *TRAIN]) == 0  # fmt: skip
    # a fine-tune stopped after its first checkpoint: the checkpoint is data too
    from carve import finetune as ft_module

    class Stop(Exception):
        pass

    real = ft_module.train

    def stop(done: int) -> None:
        if done == 2:
            raise Stop

    monkeypatch.setattr(ft_module, "train", lambda *a, **kw: real(*a, **{**kw, "on_step": stop}))
    argv = ["finetune", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--trainable", "lora", "--steps", "3", "--checkpoint-every", "1", "--out", str(ft), "--save-delta", *TRAIN]  # fmt: skip
    with pytest.raises(Stop):
        main(argv)
    assert _check_no_pickles(tmp_path / "ft.checkpoint") == 2
    monkeypatch.setattr(ft_module, "train", real)
    assert main([*argv, "--resume"]) == 0
    assert _check_no_pickles(out) >= 5 and _check_no_pickles(ft) >= 3
    for side in sides:
        assert not _is_pickle(side.read_bytes())


def test_planted_pickle_checkpoint_never_runs(tmp_path: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ft.checkpoint"
    ckpt.mkdir()
    (ckpt / "state.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    (ckpt / "state.pt").write_bytes(pickle.dumps(_Planted(marker)))  # the old name: never opened
    (ckpt / "progress.json").write_text(json.dumps({"step": 1, "losses": [1.0], "run": {}}))
    argv = ["finetune", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--trainable", "random", "--steps", "3", "--out", str(tmp_path / "ft"), "--resume", *TRAIN]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("carve: error: checkpoint") and err.count("\n") == 1, err
    assert not marker.exists()


def test_planted_pickle_weights_never_run(tmp_path: Path, model_dir: Path, capsys) -> None:
    import carve

    marker = tmp_path / "PWNED"
    bad = tmp_path / "bin-model"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": _Planted(marker)}))
    with pytest.raises(carve.UsageError, match="refused to load"):
        carve.load_model(str(bad))
    assert not marker.exists()


def test_plain_bin_weights_still_load(tmp_path: Path, model_dir: Path) -> None:
    """A model shipped only as pytorch_model.bin (plain tensors) loads: weights-only unpickling."""
    import torch
    from safetensors.torch import load_file

    import carve

    plain = tmp_path / "bin-model"
    shutil.copytree(model_dir, plain)
    state = load_file(str(plain / "model.safetensors"))
    (plain / "model.safetensors").unlink()
    torch.save(state, plain / "pytorch_model.bin")
    lm = carve.load_model(str(plain))
    loaded = dict(lm.model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)


def test_checkpoint_reader_refuses_a_pickle_with_matching_settings(tmp_path: Path) -> None:
    """The settings match, so the reader reaches the state file: a pickle there is refused, not run."""
    import torch

    import carve
    from carve.ops.train import MaskedAdamW, Schedule, _load_checkpoint

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    (ckpt / "progress.json").write_text(json.dumps({"step": 1, "losses": [1.0], "run": {"a": 1}}))
    opt = MaskedAdamW({"w": torch.nn.Parameter(torch.zeros(4))}, {"w": None}, Schedule(steps=3, lr=1e-3))
    with pytest.raises(carve.UsageError, match="incomplete or damaged"):
        _load_checkpoint(ckpt, opt, {"a": 1})
    assert not marker.exists()
