"""torch.distributed: two gloo processes (spawned here) compute the same layer-wise statistics, masks
and pruned weights bit for bit as one process, share the OBS sweeps out, compute the gradient
statistics within float tolerance (in memory and streamed), and train (data parallel) to the same weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from carve.settings import Calibration
from tests.conftest import VOCAB, tiny_model


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from carve.engines.gradient import next_token_loss
    from carve.engines.layerwise import layerwise
    from carve.evaluation.perplexity import perplexity
    from carve.importance.scoring import score
    from carve.models.skeleton import SkeletonModel
    from carve.ops.prune import prune
    from carve.ops.train import Schedule, train
    from carve.scorers.stats import Hessian, RowNorms

    torch.set_num_threads(1)
    saved = Path(f"{out}.model{rank}")  # saved before the process group: transformers saves on rank 0 only
    tiny_model("llama").save_pretrained(saved)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
        settings = Calibration(batch_size=2)
        found: dict[str, torch.Tensor] = {}

        def keeping(kind: str):
            def on_block(_i: int, _linears: dict, stats: dict) -> None:
                for k, s in stats.items():
                    found[f"{kind}:{k}"] = (s.H if kind == "H" else s.sq).clone()

            return on_block

        layerwise(tiny_model("llama"), calib, keeping("H"), Hessian, calib=settings)
        layerwise(tiny_model("llama"), calib, keeping("rows"), RowNorms, calib=settings)
        import carve.scorers.sparsegpt as sg

        sweeps = []
        real_sweep = sg.sparsegpt_prune
        sg.sparsegpt_prune = lambda W, *a, **kw: sweeps.append(1) or real_sweep(W, *a, **kw)
        try:
            for method in ("sparsegpt", "wanda"):
                pruned = tiny_model("llama")
                result = prune(pruned, method, 0.5, calib, calib=settings)
                found.update({f"{method}:{k}": v for k, v in result.mask.items()})
                found.update({f"{method}-weights:{k}": pruned.get_parameter(k).detach().clone() for k in result.mask})
        finally:
            sg.sparsegpt_prune = real_sweep
        # an MoE's experts (gpt-oss: [E, in, out], so each expert's weight is a transposed view)
        from tests.test_moe import moe_model

        moe = moe_model("gpt_oss")
        moe_ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
        result = prune(moe, "sparsegpt", 0.5, moe_ids, calib=settings)
        assert result.experts is not None and len(result.experts["unfused"]) == 2
        found.update({f"moe:{k}": v for k, v in result.mask.items()})
        found.update({f"moe-weights:{k}": moe.get_parameter(k).detach().clone() for k in result.mask})
        moe = moe_model("gpt_oss")  # the same, each block calibrated in rounds (rank 0's plan on every rank)
        result = prune(moe, "sparsegpt", 0.5, moe_ids, calib=replace(settings, statistics_memory=0))
        found.update({f"moe-rounds:{k}": v for k, v in result.mask.items()})
        found.update({f"moe-rounds-weights:{k}": moe.get_parameter(k).detach().clone() for k in result.mask})
        Path(f"{out}.sweeps{rank}").write_text(str(len(sweeps)))  # each rank's share of the OBS sweeps
        found["ppl"] = torch.tensor([perplexity(tiny_model("llama"), calib[:5], batch_size=2)], dtype=torch.float64)
        fisher = score(tiny_model("llama"), "fisher", calib, calib=settings)
        found.update({f"fisher:{k}": v for k, v in fisher.scores.items()})
        # the streamed gradient pass (a model read block by block from disk): each rank its share too
        with SkeletonModel(saved, torch.float32, "cpu") as sk:
            streamed = score(sk.model, "fisher", calib, calib=replace(settings, stream=SimpleNamespace(sk=sk)))
            found.update({f"fisher-streamed:{k}": v for k, v in streamed.scores.items()})
        # the masked training loop, data parallel: 4 micro-batches a step, 2 on each rank
        model = tiny_model("llama")
        keep = {
            "model.layers.0.mlp.up_proj.weight": torch.rand(128, 64, generator=torch.Generator().manual_seed(1)) < 0.3
        }
        trainable = {**keep, "model.layers.1.self_attn.q_proj.weight": None}
        schedule = Schedule(steps=2, lr=1e-3, batch_size=4, micro_batch=1, warmup=0)
        result = train(model, calib, next_token_loss, trainable, schedule)
        found.update({f"train:{k}": p.detach().clone() for k, p in model.named_parameters() if k in trainable})
        found["train:losses"] = torch.tensor(result.losses)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in found.items()}, out)
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _worker(0, 1, "", str(one))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(two)), nprocs=2, join=True)
    a, b = load_file(one), load_file(two)
    assert sorted(a) == sorted(b) and any(k.startswith("H:") for k in a) and any(k.startswith("fisher:") for k in a)
    for k in (k for k in a if k.startswith("fisher-streamed:")):  # one process: streamed = in memory, bit for bit
        assert torch.equal(a[k], a[k.replace("-streamed", "")]), k
    for k in (k for k in a if k.startswith("moe-rounds")):  # in rounds = at once, bit for bit
        assert torch.equal(a[k], a[k.replace("-rounds", "")]) and torch.equal(b[k], b[k.replace("-rounds", "")]), k
    for k in a:
        if k.startswith(("H:", "rows:")) or a[k].dtype == torch.bool or "-weights:" in k:
            # float64 sums of the layer-wise statistics: the same bits; so the same masks and weights
            assert torch.equal(a[k], b[k]), k
        else:  # float32 gradient means, summed in another order; trained weights: Adam divides by √v, so the
            # rounding of a near-zero gradient moves a weight by up to ~1e-4 of a 1e-3 step (1.7e-7 seen on one
            # machine); a wrong share of the micro-batches moves them by a whole step
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6 if k.startswith("train:") else 1e-7, msg=k)
    # the sweeps were shared out, not repeated: every one done once, by one of the two ranks
    alone, shares = int(Path(f"{one}.sweeps0").read_text()), [int(Path(f"{two}.sweeps{r}").read_text()) for r in (0, 1)]
    assert sum(shares) == alone and min(shares) > 0


def _one_and_two(tmp_path: Path, flags: list[str]) -> subprocess.CompletedProcess[str]:
    """`carve FLAGS` in one process (--out one), then under torchrun on 2 gloo ranks (--out two): both
    succeed and the ranks write one output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "carve", *flags, "--out", str(tmp_path / "one")], check=True, env=env)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "carve", *flags, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(run, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]  # one writer
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "arch, extra", [("llama", []), ("llama", ["--stream"]), ("mixtral", ["--stream", "--max-memory", "0"])]
)
def test_torchrun_extract_writes_once_and_equals_one_process(
    tmp_path: Path, tokenizer, small_corpus: Path, arch: str, extra: list[str]
) -> None:
    """Also a streamed MoE (each block's experts built from the checkpoint's per-expert tensors) with
    its activations spilled and every block calibrated in rounds."""
    model_dir = tmp_path / f"tiny-{arch}"
    tiny_model(arch).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    flags = ["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
             "--method", "sparsegpt", "--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2",
             "--cloze-items", "0", "--no-speed", "--batch-size", "2", "--quiet", *extra]  # fmt: skip
    proc = _one_and_two(tmp_path, flags)
    assert proc.stdout.count("linear sparsity") == 1  # one summary: rank 0's
    for name in ("mask.safetensors", "model.safetensors"):  # the same mask and weights as one process
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("n", [1, 3])
def test_shard_needs_a_batch_per_rank(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from carve import distributed
    from carve.errors import UsageError

    monkeypatch.setattr(distributed, "world", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    if n < 4:
        with pytest.raises(UsageError, match="cannot be shared by 4 processes"):
            distributed.shard(list(range(n)))
    assert distributed.shard(list(range(9))) == [1, 5]


def test_torchrun_unlearn_measures_along_training_like_one_process(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    """`carve unlearn --eval-every` data parallel over 2 gloo ranks: one output, and its curve (every
    rank measures the same held-out text on the same weights) equals one process's within float
    tolerance."""
    import json

    import carve

    docs = carve.Corpus("legal").documents[:24]
    parts = {"forget": docs[:4], "retain": docs[4:20], "holdout": docs[20:24]}
    for name, ds in parts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d[:2500]}) + "\n" for d in ds))
    flags = ["unlearn", str(model_dir), *(f for n in parts for f in (f"--{n}", str(tmp_path / f"{n}.jsonl"))),
             "--objective", "npo", "--mask", "salun", "--lr", "3e-3", "--steps", "2", "--batch-size", "2",
             "--block-len", "48", "--mia-len", "32", "--prompt-len", "8", "--verbatim-items", "4", "--eval-blocks",
             "2", "--cloze-items", "8", "--mask-blocks", "4", "--eval-every", "1", "--reference", str(model_dir),
             "--quiet"]  # fmt: skip
    _one_and_two(tmp_path, flags)
    one, two = (json.loads((tmp_path / d / "carve.json").read_text())["metrics"]["trajectory"] for d in ("one", "two"))
    assert [p["step"] for p in one] == [p["step"] for p in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for k in ("forget_ppl", "retain_ppl", "general_ppl", "mia_auc", "privleak"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-3), k


def test_torchrun_recover_shares_its_micro_batches(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    """`carve recover` under torchrun: by default a step's blocks are shared by the 2 gloo ranks (one
    micro-batch each; one process runs the step as one forward); the weights equal one process's
    within float tolerance, written once."""
    import carve
    from carve.errors import UsageError
    from carve.recover import RecoverRecipe

    pruned = tmp_path / "pruned"
    carve.extract(carve.Recipe(model=str(model_dir), domain=str(small_corpus), general=str(small_corpus),
                               method="magnitude", sparsity=0.5, eval_blocks=2, block_len=32, cloze_items=0,
                               speed=False), pruned)  # fmt: skip
    with pytest.raises(UsageError, match="micro-batch 3 must be positive and divide batch-size 2"):
        RecoverRecipe(model=str(pruned), batch_size=2, micro_batch=3).resolved()
    flags = ["recover", str(pruned), "--teacher", str(model_dir), "--domain", str(small_corpus), "--general",
             str(small_corpus), "--steps", "2", "--batch-size", "2", "--block-len", "32",
             "--eval-blocks", "2", "--cloze-items", "0", "--lm-weight", "1", "--lr", "1e-2", "--quiet"]  # fmt: skip
    _one_and_two(tmp_path, flags)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(a) == sorted(b)
    moved = load_file(pruned / "model.safetensors")
    assert any(not torch.equal(a[k], moved[k]) for k in a)  # the run trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_collectives_go_where_the_backend_carries_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group initialized with NCCL alone carries no CPU tensor: carve's CPU counts and notes go
    through the current CUDA device there; a group with a CPU backend (gloo, or torchrun's
    "cpu:gloo,cuda:nccl") takes them where they are; a device no backend carries is refused."""
    from carve.distributed import wire_device
    from carve.errors import UsageError

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert wire_device(cpu, "cpu:gloo,cuda:gloo") == cpu
    assert wire_device(cpu, "cpu:gloo,cuda:nccl") == cpu
    assert wire_device(cuda, "cpu:gloo,cuda:nccl") == cuda
    assert wire_device(cpu, "cuda:nccl") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="cannot carry cuda tensors"):
        wire_device(cuda, "cpu:gloo")
