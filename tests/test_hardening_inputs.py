"""Bad inputs (issue 20): each one exits 2 with one line naming the problem, and leaves the file
system exactly as it was (no output, no temporary, no lock file, no directory created).

Classes: output paths that cannot be written, recipe values of the wrong type or not finite,
--resume with other settings, corrupt model files, corrupt corpora, damaged manifests, masks of
another model, a mistyped model path (refused at once, the hub never asked)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from carve.cli.main import main

FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed", "--cloze-items", "0"]
TRAIN = ["--steps", "2", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet", "--no-cache"]


def _tree(root: Path) -> dict[str, int]:
    """Every path under `root` with its size (directories as -1): the state a bad input must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def _refused(argv: list[str], root: Path, capsys, message: str) -> None:
    before = _tree(root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert err.startswith("carve: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _tree(root) == before, "a refused run changed the file system"


@pytest.fixture
def work(tmp_path: Path, model_dir: Path, small_corpus: Path) -> Path:
    """tmp_path holds the tiny model and the corpus; bad inputs are made here too."""
    return tmp_path


def _extract(model_dir: Path, corpus: Path, out: Path | str, *extra: str) -> list[str]:
    return ["extract", "--model", str(model_dir), "--domain", str(corpus), "--general", str(corpus),
            "--out", str(out), *FAST, *extra]  # fmt: skip


# ---- output paths that cannot be written: refused before any work ------------------------------------------------


def test_output_under_a_file(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    (work / "afile").write_text("x")
    _refused(_extract(model_dir, small_corpus, work / "afile" / "out"), work, capsys, "is a file, not a directory")


def test_output_name_too_long(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    out = work / ("n" * 240)
    _refused(_extract(model_dir, small_corpus, out), work, capsys, "carve needs")


def test_output_in_a_directory_that_cannot_be_created(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    (work / "f").write_text("x")
    out = work / "f" / "deeper" / "out"  # nothing can be created under a file
    _refused(_extract(model_dir, small_corpus, out), work, capsys, "is a file, not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")  # type: ignore[attr-defined]
def test_output_in_a_read_only_directory(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    ro = work / "ro"
    ro.mkdir(mode=0o555)
    _refused(_extract(model_dir, small_corpus, ro / "out"), work, capsys, "no permission to write")


def test_save_mask_under_a_file(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    (work / "afile").write_text("x")
    argv = ["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--method", "magnitude", "--save-mask", str(work / "afile" / "m.safetensors"), *FAST]  # fmt: skip
    _refused(argv, work, capsys, "is a file, not a directory")


def test_report_over_an_existing_file(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    out = work / "out"
    assert main(_extract(model_dir, small_corpus, out, "--method", "magnitude")) == 0
    (work / "r.html").write_text("mine")
    _refused(["report", str(out), "--out", str(work / "r.html")], work, capsys, "already exists")
    assert (work / "r.html").read_text() == "mine"
    assert main(["report", str(out), "--out", str(work / "r.html"), "--overwrite"]) == 0
    assert (work / "r.html").read_text().startswith("<!doctype html>")


# ---- recipe values: types, ranges, finite numbers ------------------------------------------------------------


RECIPES = [
    ({"include": "*mlp*"}, "include must be a list of strings"),
    ({"speed": "no"}, "speed must be true or false"),
    ({"sparsity": "0.5"}, "sparsity must be a finite number"),
    ({"calib_blocks": "4"}, "calib-blocks must be a whole number"),
    ({"calib_blocks": 2.5}, "calib-blocks must be a whole number"),
    ({"lam": float("nan")}, "lam must be a finite number"),
    ({"sparsity": float("inf")}, "sparsity must be a finite number"),
    ({"domain": ["legal"]}, "domain must be a string"),
    ({"method": 3}, "method must be a string"),
]


@pytest.mark.parametrize(("fields", "message"), RECIPES, ids=[str(r[0]) for r in RECIPES])
def test_recipe_file_types(fields: dict, message: str, work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    recipe = work / "recipe.json"
    recipe.write_text(json.dumps(fields))  # NaN and Infinity as JSON writes them
    argv = [*_extract(model_dir, small_corpus, work / "out"), "--recipe", str(recipe)]
    for name in fields:  # the flag of the field under test would override the file's value
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        if name == "speed":
            argv.remove("--no-speed")
    _refused(argv, work, capsys, message)


@pytest.mark.parametrize("flag", ["--lambda", "--sparsity", "--mix", "--grad-lr"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_flags(flag: str, value: str, work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    _refused(
        _extract(model_dir, small_corpus, work / "out", f"{flag}={value}"), work, capsys, "must be a finite number"
    )


@pytest.mark.parametrize("flag", ["--lr", "--density", "--mix", "--weight-decay"])
def test_non_finite_finetune_flags(flag: str, work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    argv = ["finetune", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--out", str(work / "ft"), *TRAIN, flag, "nan"]  # fmt: skip
    _refused(argv, work, capsys, "must be a finite number")


# ---- --resume with other settings ------------------------------------------------------------------------------


def test_resume_with_other_settings_is_refused(
    work: Path, model_dir: Path, small_corpus: Path, capsys, monkeypatch
) -> None:
    from carve.ops.train import checkpoint_dir

    out = work / "ft"
    base = ["finetune", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--out", str(out), "--trainable", "random", "--steps", "4", "--checkpoint-every", "2", "--block-len", "32",
            "--eval-blocks", "2", "--cloze-items", "0", "--quiet"]  # fmt: skip

    class Stop(Exception):
        pass

    from carve import finetune as ft_module

    real_train = ft_module.train

    def stop(done: int) -> None:
        if done == 3:  # after the checkpoint of step 2
            raise Stop

    def interrupted_train(*a, **kw):
        return real_train(*a, **{**kw, "on_step": stop})

    monkeypatch.setattr(ft_module, "train", interrupted_train)
    with pytest.raises(Stop):
        main(base)
    monkeypatch.setattr(ft_module, "train", real_train)
    assert checkpoint_dir(out).is_dir()
    capsys.readouterr()
    for change, shown in ((["--lr", "1e-3"], "lr"), (["--seed", "1"], "seed"), (["--steps", "6"], "steps")):
        _refused([*base, "--resume", *change], work, capsys, f"{shown} ")
    assert main([*base, "--resume", "--eval-blocks", "3"]) == 0  # evaluation settings may change
    assert json.loads((out / "carve.json").read_text())["training"]["resumed_from_step"] == 2


# ---- corrupt model files --------------------------------------------------------------------------------------


def _model_with(work: Path, model_dir: Path, name: str, data: bytes) -> Path:
    bad = work / "badmodel"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").unlink()
    (bad / name).write_bytes(data)
    return bad


def _safetensors(header: object, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


MODELS: list[tuple[str, Callable[[Path], tuple[str, bytes]], str]] = [
    ("header is a list", lambda m: ("model.safetensors", _safetensors([1, 2])), "not safetensors"),
    ("offsets not numbers", lambda m: ("model.safetensors", _safetensors({"w": {"data_offsets": ["a", 1]}})), "data_offsets"),
    ("offsets reversed", lambda m: ("model.safetensors", _safetensors({"w": {"data_offsets": [4, 0]}}, b"x" * 8)), "ends before"),
    ("entry not a mapping", lambda m: ("model.safetensors", _safetensors({"w": 3})), "data_offsets"),
    ("header length too big", lambda m: ("model.safetensors", (10**9).to_bytes(8, "little") + b"{}"), "exceeds the file"),
    ("header not JSON", lambda m: ("model.safetensors", (5).to_bytes(8, "little") + b"\xff\xfe{{{"), "not safetensors"),
    ("pickle refused", lambda m: ("pytorch_model.bin", _pickle_bomb(m)), "refused to load"),
]  # fmt: skip


def _pickle_bomb(marker_dir: Path) -> bytes:
    import pickle

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker_dir / 'PWNED'}",))

    return pickle.dumps({"model.embed_tokens.weight": Bomb()})


@pytest.mark.parametrize(("label", "make", "message"), MODELS, ids=[m[0] for m in MODELS])
def test_corrupt_model_files(label, make, message, work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    name, data = make(work)
    bad = _model_with(work, model_dir, name, data)
    _refused(_extract(bad, small_corpus, work / "out"), work, capsys, message)
    assert not (work / "PWNED").exists()


CONFIGS: list[tuple[str, Callable[[dict], None], str]] = [
    ("rope parameters transformers rejects", lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
     "transformers refuses its config.json"),
    ("unknown model type", lambda c: c.update(model_type="no-such-arch"), "transformers refuses its config.json"),
    ("config not JSON", lambda c: c.update(_raw=True), "is not a valid JSON file"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "change", "message"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_transformers_refuses(label, change, message, work: Path, model_dir: Path, small_corpus: Path,
                                     capsys) -> None:  # fmt: skip
    """A config.json transformers' own loading refuses: one clear line from carve, nothing written."""
    bad = work / "badconfig"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    change(config)
    (bad / "config.json").write_text("{not json" if config.pop("_raw", False) else json.dumps(config))
    _refused(_extract(bad, small_corpus, work / "out"), work, capsys, message)


def test_model_too_big_for_memory(work: Path, model_dir: Path, small_corpus: Path, capsys, monkeypatch) -> None:
    """Weights the machine cannot map (safetensors raises MemoryError): one line naming --stream, no traceback."""
    import carve.models.load

    def no_memory(*args, **kwargs):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr(carve.models.load, "_from_directory", no_memory)
    _refused(_extract(model_dir, small_corpus, work / "out"), work, capsys, "not enough memory")


@pytest.mark.parametrize("cut", [4, 23, 64, 4096, 0.5, 0.999, -1])
def test_gguf_cut_short(cut: float, work: Path, small_corpus: Path, capsys) -> None:
    from carve.models.load import default_gguf

    data = default_gguf().read_bytes()
    n = len(data) + int(cut) if cut < 0 else int(cut * len(data)) if cut < 1 else int(cut)
    bad = work / "cut.gguf"
    bad.write_bytes(data[:n])
    _refused(_extract(bad, small_corpus, work / "out"), work, capsys, "is not a complete GGUF file")


# ---- corrupt corpora --------------------------------------------------------------------------------------------


def _parquet_then_garbage(text: str) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [text] * 50}), buf)
    data = buf.getvalue()
    return data[: len(data) // 2] + bytes(range(256)) + data[-8:]


CORPORA: list[tuple[str, str, Callable[[], bytes]]] = [
    ("binary jsonl", "c.jsonl", lambda: bytes(range(256)) * 40),
    ("binary jsonl.gz", "c.jsonl.gz", lambda: b"\x1f\x8b" + bytes(range(256)) * 40),
    ("truncated jsonl.gz", "c.jsonl.gz", lambda: gzip.compress(b'{"text": "hello"}\n' * 500)[:60]),
    ("gz of binary", "c.jsonl.gz", lambda: gzip.compress(bytes(range(128, 256)) * 40)),
    ("binary parquet", "c.parquet", lambda: bytes(range(256)) * 40),
    ("damaged parquet", "c.parquet", lambda: _parquet_then_garbage("some legal text " * 20)),
    ("jsonl of lists", "c.jsonl", lambda: b"[1, 2]\n" * 10),
    ("deeply nested jsonl", "c.jsonl", lambda: b"[" * 100000 + b"\n"),
]


@pytest.mark.parametrize(("label", "name", "make"), CORPORA, ids=[c[0] for c in CORPORA])
def test_corrupt_corpora(label, name, make, work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    bad = work / name
    bad.write_bytes(make())
    argv = ["extract", "--model", str(model_dir), "--domain", str(bad), "--general", str(small_corpus),
            "--out", str(work / "out"), *FAST]  # fmt: skip
    before = _tree(work)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"carve: error: corpus {str(bad)!r}") and err.count("\n") == 1, err
    assert _tree(work) == before


# ---- damaged manifests ------------------------------------------------------------------------------------------


MANIFESTS = [
    ("empty", b"", "is empty"),
    ("truncated", b'{"job": "extract", "metrics": {"bef', "truncated or not JSON"),
    ("a list", b"[1, 2, 3]", "not a mapping"),
    ("metrics a string", b'{"metrics": "good"}', "metrics is"),
    ("ppl a string", b'{"metrics": {"after": {"domain_ppl": "low"}}}', "metrics.after.domain_ppl"),
    ("steps a float", b'{"job": "recover", "training": {"steps": 1.5}}', "training.steps"),
    ("source model a number", b'{"source": {"model": 7}}', "source.model"),
    ("timings not numbers", b'{"timings_s": {"prune": "fast"}}', "timings_s.prune"),
    ("binary", bytes(range(256)), "cannot be read"),
]


@pytest.fixture
def damaged_output(work: Path, model_dir: Path, small_corpus: Path) -> Path:
    out = work / "out"
    assert main(_extract(model_dir, small_corpus, out, "--method", "magnitude")) == 0
    return out


@pytest.mark.parametrize(("label", "data", "message"), MANIFESTS, ids=[m[0] for m in MANIFESTS])
@pytest.mark.parametrize("command", ["inspect", "report", "recover", "eval-tasks"])
def test_damaged_manifest(
    label, data: bytes, message: str, command: str, damaged_output: Path, work: Path, small_corpus: Path, capsys
) -> None:
    (damaged_output / "carve.json").write_bytes(data)
    argv = {
        "inspect": ["inspect", str(damaged_output)],
        "report": ["report", str(damaged_output), "--out", str(work / "r.html")],
        "recover": ["recover", str(damaged_output), "--domain", str(small_corpus), "--general", str(small_corpus),
                    "--out", str(work / "rec"), *TRAIN],
        "eval-tasks": ["eval", str(damaged_output), "--domain", str(small_corpus), "--general", str(small_corpus),
                       "--tasks", "carve_cloze_legal", "--limit", "2", "--eval-blocks", "1", "--block-len", "32",
                       "--cloze-items", "0", "--quiet"],
    }[command]  # fmt: skip
    _refused(argv, work, capsys, message)


# ---- masks of another model -------------------------------------------------------------------------------------


def test_masks_of_other_models(work: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    from carve.masks.mask import Mask

    a, b, c = work / "a.safetensors", work / "b.safetensors", work / "c.safetensors"
    Mask({"w": torch.ones(4, 8, dtype=torch.bool)}).save(a)
    Mask({"w": torch.ones(8, 4, dtype=torch.bool)}).save(b)
    Mask({"v": torch.ones(4, 8, dtype=torch.bool)}).save(c)
    _refused(["inspect", str(a), str(b)], work, capsys, "differ in shape at w")
    _refused(["inspect", str(a), str(c)], work, capsys, "cover different parameters")
    argv = ["finetune", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--out", str(work / "ft"), *TRAIN, "--trainable", f"mask:{a}"]  # fmt: skip
    _refused(argv, work, capsys, "which this model does not have")


MASK_FILES = [
    ("not safetensors", lambda: b"hello world"),
    ("bits of the wrong length", lambda: _mask_bytes({"w": [4, 8]}, torch.zeros(3, dtype=torch.uint8))),
    ("shapes not a mapping", lambda: _mask_bytes([4, 8], torch.zeros(4, dtype=torch.uint8))),
    ("negative shape", lambda: _mask_bytes({"w": [-4, 8]}, torch.zeros(4, dtype=torch.uint8))),
    ("float bits", lambda: _mask_bytes({"w": [4, 8]}, torch.zeros(4, dtype=torch.float32))),
]


def _mask_bytes(shapes: object, packed: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"w": packed}, metadata={"carve_mask_shapes": json.dumps(shapes)})


@pytest.mark.parametrize(("label", "make"), MASK_FILES, ids=[m[0] for m in MASK_FILES])
def test_damaged_mask_files(label, make, work: Path, capsys) -> None:
    bad = work / "bad.safetensors"
    bad.write_bytes(make())
    before = _tree(work)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("carve: error: ") and err.count("\n") == 1 and str(bad) in err, err
    assert _tree(work) == before


# ---- a mistyped model path: at once, the hub never asked ---------------------------------------------------------


@pytest.mark.parametrize("typo", ["{work}/out/legal-5", "out/legal-5", "./legal-5", "legal-5.gguf", "~/no/such/model"])
def test_mistyped_model_path_never_asks_the_hub(typo: str, work: Path, small_corpus: Path, capsys, monkeypatch) -> None:
    import carve.models.load as load

    def no_hub(*a, **kw):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(load, "_hub_reachable", no_hub)
    monkeypatch.setattr(load, "_from_hub", no_hub)
    monkeypatch.chdir(work)
    (work / "out" / "legal-50").mkdir(parents=True)
    model = typo.format(work=work)
    _refused(_extract(model, small_corpus, work / "o"), work, capsys, f"no model at {model!r}")


def test_mistyped_path_suggests_near_names(work: Path, small_corpus: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    (work / "out" / "legal-50").mkdir(parents=True)
    _refused(_extract("out/legal-5", small_corpus, work / "o"), work, capsys, "did you mean 'out/legal-50'?")


def test_hub_id_gives_up_quickly_and_names_both(work: Path, small_corpus: Path, capsys, monkeypatch) -> None:
    """An org/name that is not local: the hub cache first, then the hub, which here does not answer."""
    import carve.models.load as load

    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(load, "_hub_reachable", lambda source: asked.append(source) or "no answer within 5 s")
    _refused(_extract("someorg/somemodel", small_corpus, work / "o"), work, capsys, "no local path 'someorg/somemodel'")
    assert asked == ["someorg/somemodel"]


def test_out_of_memory_mid_job(work: Path, model_dir: Path, small_corpus: Path, capsys, monkeypatch) -> None:
    """torch's CPU allocator failing in the middle of a job (a RuntimeError, as the sweep of
    bench/structured_archs.py met on a 1.3B model under its limit): one line naming --stream,
    exit 1, and the output directory not left behind."""
    import carve.pipeline

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 67108864 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(carve.pipeline, "_operate", no_memory)
    before = _tree(work)
    rc = main(_extract(model_dir, small_corpus, work / "out"))
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("carve: error: out of memory (") and err.count("\n") == 1, err
    assert "carve extract --stream" in err and "Traceback" not in err
    assert _tree(work) == before and not (work / "out").exists()
