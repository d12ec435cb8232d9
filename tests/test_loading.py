"""Model sources: local directory, hub id (mocked: tests never reach the hub), and bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest

import carve


def test_local_directory_loads_with_fingerprint(model_dir: Path) -> None:
    lm = carve.load_model(str(model_dir))
    assert lm.source == str(model_dir) and len(lm.fingerprint) == 16
    assert lm.fingerprint == carve.load_model(str(model_dir)).fingerprint
    assert lm.model.dtype.is_floating_point and lm.tokenizer.pad_token_id is not None


def test_hub_id_goes_to_from_pretrained(monkeypatch, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asked: list[str] = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def fake_model(name: str, **kw: object) -> object:
        asked.append(name)
        return real_model(model_dir, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: real_tok(model_dir))
    lm = carve.load_model("some-org/some-model")
    assert asked == ["some-org/some-model"] and lm.source == "some-org/some-model"


def test_unreachable_hub_id_is_a_usage_error(monkeypatch) -> None:
    from transformers import AutoTokenizer

    def offline(name: str, **kw: object) -> object:
        raise OSError(f"We couldn't connect to the hub to load {name}")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(
        carve.UsageError, match="no local path 'org/missing', and no hub model of that id could be loaded"
    ):
        carve.load_model("org/missing")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(carve.UsageError, match=r"has no config\.json"):
        carve.load_model(str(tmp_path / "m"))


def test_bad_device_and_dtype(model_dir: Path) -> None:
    with pytest.raises(carve.UsageError, match="unknown dtype"):
        carve.load_model(str(model_dir), dtype="int3")
    with pytest.raises(carve.UsageError, match="unknown device"):
        carve.load_model(str(model_dir), device="tpu")
