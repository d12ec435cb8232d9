"""`carve extract --structure` across every causal-LM architecture of the installed transformers.

    .venv/bin/python bench/structured_archs.py [--unstructured [--method M]] [--kinds llama helium ...] [--table-only]

Each row, in its own process (address space limited to 20 GiB: it holds the source, the reload and a
zeroed copy; the CLI's own to 12 GiB; 10 minutes): a tiny random model of
one `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` type (tests/conftest.py's `any_tiny_config`: hidden 64, 3
blocks, 4 query heads in 2 key/value groups of 16 channels, MLP 96, 4 experts with top-1 routing where
the config has experts, vocabulary 384; seed 0; the generic sizes are passed only where the config
takes them, with `TINY_FIXES` where they alone build no model that runs: multi-head latent attention's
ranks, a full-attention block among linear-attention ones) saved with save_pretrained beside a
byte-level BPE tokenizer trained on builtin legal text.  carve's API says which dimensions the
model holds whole (`anatomy`, `held_by_config`: meta device, no calibration), and the CLI then cuts
every other one:

    carve extract --model SRC --domain legal --out OUT [--heads-keep 0.5] [--mlp-keep 0.5]
        [--drop-blocks 1] --calib-blocks 4 --block-len 32 --eval-blocks 2 --cloze-items 0 --no-speed

(all three on a model that `anatomy` refuses: the CLI must refuse it too).  The output is reloaded
with stock `AutoModelForCausalLM.from_pretrained` (loading info: no missing, unexpected or
mismatched weights), its kept heads and channels are read back by matching its o_proj and down_proj
columns to the source's, and its logits on 2 × 24 random tokens (seed 1) are compared with the
source's with the removed units' outputs zeroed (`structure.zero_plan`) and each dropped block
passing its input through (since 2026-12-06; before, the zeroed block alone, which is the identity
only where the block adds to an un-normalized residual stream): a correct slice agrees to float
rounding.

Outcomes: `sliced` (exact, reloads clean), `held+sliced` (the same, with dimensions held whole),
`refused` (exit 2 with a one-line reason), `not built` (the generic tiny config does not make a
model that builds and runs a forward: the row says why; no carve code ran), and `WRONG` /
`crashed` (a silent corruption or an unexpected error: a bug).  Results:
bench/results/structured_archs.jsonl; the table: the `structured-archs` section of bench/RESULTS.md.

`--unstructured` sweeps the same models through `carve extract --sparsity 0.5 --method magnitude
--save-format dense` instead (`unstructured_worker`; `--method M` another method, which runs the
calibration engines on each architecture: rows in unstructured_<M>_archs.jsonl, section
`unstructured-<M>-archs`): the output reloads clean with stock from_pretrained with finite logits,
every weight matrix in the decoder blocks (fused experts too; embeddings, norms, biases and MoE
routers, which carve keeps dense, left out) loses at least 40% of its entries, and every other
parameter equals the source's, as does every kept entry for a method that does not update
weights.  Outcomes `pruned`, `partly dense` (the row names the matrices left dense: a convolution
or state-space parameter, which carve does not prune, or an expert layout carve does not see),
`WRONG`, `refused`, `crashed`, `not built`; magnitude's results in
bench/results/unstructured_archs.jsonl, section `unstructured-archs`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, ROOT, commit, load_results, save_result, write_section

RESULTS = HERE / "results" / "structured_archs.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--no-speed"]
LIMIT_BYTES, WORKER_BYTES, TIMEOUT_S = 12 << 30, 20 << 30, 600


def kinds() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _limit(size: int = LIMIT_BYTES) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (size, size))


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:300]


def _passed_through(model: Any, drop: list[int]) -> Any:
    """Within, the dropped blocks return their input as they received it (what dropping a block computes,
    also where a zeroed block is not the identity: MiniMax normalizes the residual stream itself)."""
    from carve.engines.layerwise import arity, as_block_output, split_hidden
    from carve.models.anatomy import anatomy
    from carve.models.patch import replaced_forwards

    def make(_block: Any, forward: Any) -> Any:
        def through(*args: Any, **kwargs: Any) -> Any:
            return as_block_output(split_hidden(args, kwargs)[0], arity(forward(*args, **kwargs)))

        return through

    blocks = anatomy(model).blocks
    return replaced_forwards([blocks[i] for i in drop], make)


def _kept_plan(source: Any, sliced: Any, manifest: dict[str, Any]) -> Any:
    """The plan the output was sliced to, read back from its weights: each kept block's query heads
    are the source heads whose o_proj columns it holds, its channels those of its down_proj columns."""
    import torch

    from carve.models.anatomy import anatomy
    from carve.ops.plan import Plan, Shape

    src, out = anatomy(source), anatomy(sliced)
    drop = manifest["structure"]["dropped_blocks"]
    kept = [i for i in range(len(src.blocks)) if i not in drop]
    hd, rep = src.head_dim, src.group_size

    def columns(a: torch.Tensor, b: torch.Tensor, width: int) -> list[int]:
        """For each `width`-column slice of `a`, the index of the slice of `b` equal to it."""
        pa, pb = a.T.reshape(-1, width * a.shape[0]), b.T.reshape(-1, width * b.shape[0])
        equal = (pa[:, None, :] == pb[None, :, :]).all(-1)
        if not bool(equal.any(1).all()):
            raise AssertionError("an output column is none of the source's")
        return equal.int().argmax(1).tolist()

    groups: list[list[int]] = [[] for _ in src.blocks]
    channels: list[list[int]] = [[] for _ in src.blocks]
    with torch.no_grad():
        for j, i in enumerate(kept):
            if src.parts[i].attention is not None:  # a hybrid's block of another mixer has no heads
                heads = columns(out.parts[j].linear("o_proj").weight, src.parts[i].linear("o_proj").weight, hd)
                groups[i] = sorted({h // rep for h in heads})
            if "down_proj" in src.parts[i].names:
                channels[i] = columns(
                    out.parts[j].linear("down_proj").weight, src.parts[i].linear("down_proj").weight, 1
                )
    return Plan(Shape(**manifest["structure"]["shape"]), groups, channels, drop)


def build(model_type: str) -> Any:
    """The tiny random model of `model_type` (seed 0), checked to run a forward; or the reason it
    is not built (a str: the generic sizes do not make a model that runs, nothing of carve's ran)."""
    import torch
    from tests.conftest import VOCAB, any_tiny_config
    from transformers import AutoModelForCausalLM

    from carve.models.arch import is_linear

    try:
        config = any_tiny_config(model_type, layers=3)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            # a Linear the model initializes to zeros (xLSTM's gates, AFMoE's router) drawn, so that
            # the sweep sees whether carve prunes it or keeps it
            for module in model.modules():
                if is_linear(module) and not module.weight.any():
                    module.weight.normal_(0, 0.02)
            model(torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1)))
    except Exception as e:
        return f"{type(e).__name__}: {_one_line(str(e))}"
    return model


def _extract(r: dict[str, Any], model: Any, tmp: Path) -> dict[str, Any] | None:
    """`model` saved with a byte-level tokenizer at tmp/src, then `carve extract ... r["flags"]`
    into tmp/out under the CLI's memory limit, timed into `r`: the finished row when the model
    cannot be saved, or the CLI refused (exit 2) or crashed; None when it wrote its output."""
    from tests.conftest import VOCAB, byte_level_tokenizer

    src, out = tmp / "src", tmp / "out"
    try:
        model.save_pretrained(src)
        byte_level_tokenizer(None, size=VOCAB).save_pretrained(src)
    except Exception as e:
        return {**r, "outcome": "not built", "why": f"save_pretrained: {type(e).__name__}: {_one_line(str(e))}"}
    cmd = [CARVE, "extract", "--model", str(src), "--domain", "legal", "--out", str(out), "--quiet",
           *r["flags"].split(), *FAST]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=_limit)
    r["seconds"] = round(time.perf_counter() - start, 1)
    if proc.returncode == 2:
        return {**r, "outcome": "refused", "why": _one_line(proc.stderr)}
    if proc.returncode != 0:
        return {**r, "outcome": "crashed", "why": f"exit {proc.returncode}: {_one_line(proc.stderr)}"}
    return None


def worker(model_type: str) -> dict[str, Any]:
    import tempfile

    import torch
    from tests.conftest import VOCAB
    from transformers import AutoModelForCausalLM

    from carve.errors import UsageError
    from carve.models.anatomy import anatomy
    from carve.ops.structure import held_by_config, zero_plan

    r: dict[str, Any] = {"id": model_type}
    model = build(model_type)
    if isinstance(model, str):
        return {**r, "outcome": "not built", "why": model}
    r["class"] = type(model).__name__
    try:
        anat = anatomy(model)
        held = {**anat.fixed, **held_by_config(model, anat)}
        refused = None
    except UsageError as e:
        held, refused = {}, str(e)
    r["held"] = sorted(held)
    flags = {"heads": ["--heads-keep", "0.5"], "mlp": ["--mlp-keep", "0.5"], "depth": ["--drop-blocks", "1"]}
    cut = [f for dim, f in flags.items() if dim not in held] or list(flags.values())  # all held: must be refused
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        r["flags"] = " ".join(a for f in cut for a in f)
        ended = _extract(r, model, Path(tmp))
        if ended is not None:
            return ended
        if refused is not None:
            return {**r, "outcome": "WRONG", "why": f"the CLI wrote an output that anatomy refuses: {refused}"}
        m = json.loads((out / "carve.json").read_text())
        r["shape"] = m["structure"]["shape"]
        r["source_fingerprint"] = m["source"]["fingerprint"]
        r["data_fingerprints"] = {k: v.get("fingerprint") for k, v in m.get("data", {}).items() if isinstance(v, dict)}
        try:
            reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        except Exception as e:  # what a user would meet
            return {**r, "outcome": "WRONG", "why": f"from_pretrained fails: {type(e).__name__}: {_one_line(str(e))}"}
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if set(m["structure"]["held"]) != set(held):
            return {**r, "outcome": "WRONG", "why": f"manifest holds {sorted(m['structure']['held'])}"}
        plan = _kept_plan(model, reloaded.eval(), m)
        zeroed = zero_plan(copy.deepcopy(model), plan)
        ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), _passed_through(zeroed, plan.drop):
            want = zeroed(ids, use_cache=False).logits
        with torch.no_grad():
            diff = (reloaded.eval()(ids).logits - want).abs().max().item()
        r["max_abs_logit_diff"] = diff
        scale = want.abs().max().item() if diff == diff else 1.0
        if bad or not diff <= 1e-4 * max(1.0, scale):
            return {**r, "outcome": "WRONG", "why": f"loading info {bad}" if bad else f"logits differ by {diff:.3g}"}
        return {**r, "outcome": "held+sliced" if held else "sliced"}


def unstructured_worker(model_type: str, method: str = "magnitude", stream: bool = False) -> dict[str, Any]:
    """`carve extract --sparsity 0.5 --method METHOD` on the tiny model: every weight matrix of the
    decoder blocks (2-D or more, an MoE's fused experts too; not biases, not an MoE's router, which
    carve keeps dense) outside the default exclusions should lose about half its entries, every
    other parameter is the source's bit for bit, and so is every entry it keeps where the method
    does not update weights (magnitude, Wanda; SparseGPT's and dual-obs's sweeps do); the reloaded
    model's logits are finite.  With `stream`, the job is run again with --stream: its output must be
    the in-memory one's tensor for tensor, bit for bit, and its perplexities equal to 1e-4."""
    import fnmatch
    import re
    import tempfile

    import torch
    from tests.conftest import VOCAB
    from transformers import AutoModelForCausalLM

    from carve.models.arch import DEFAULT_EXCLUDE, find_blocks

    r: dict[str, Any] = {"id": model_type}
    model = build(model_type)
    if isinstance(model, str):
        return {**r, "outcome": "not built", "why": model}
    r["class"] = type(model).__name__
    # compared with a streamed run: the source's metrics computed, not read from carve's cache
    r["flags"] = f"--sparsity 0.5 --method {method} --save-format dense" + (" --no-cache" if stream else "")
    updates = method not in ("magnitude", "wanda")  # the OBS sweep changes the weights it keeps
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        ended = _extract(r, model, Path(tmp))
        if ended is not None:
            return ended
        m = json.loads((out / "carve.json").read_text())
        r["source_fingerprint"] = m["source"]["fingerprint"]
        r["data_fingerprints"] = {k: v.get("fingerprint") for k, v in m.get("data", {}).items() if isinstance(v, dict)}
        if stream:
            differs = _streamed_differs(r, model, Path(tmp), m)
            if differs is not None:
                return differs
        try:
            reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        except Exception as e:
            return {**r, "outcome": "WRONG", "why": f"from_pretrained fails: {type(e).__name__}: {_one_line(str(e))}"}
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad:
        return {**r, "outcome": "WRONG", "why": f"loading info {bad}"}
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if not torch.isfinite(reloaded.eval()(input_ids=ids).logits).all():
            return {**r, "outcome": "WRONG", "why": "the pruned model's logits are not finite"}
    prefix, _ = find_blocks(model)
    after = dict(reloaded.named_parameters())
    removed = total = 0
    dense: set[str] = set()

    # modules holding an MoE's experts: as `experts`, or in banks, children with a 3-D weight (JetMoE's)
    def bank(m: torch.nn.Module) -> bool:
        return isinstance(w := getattr(m, "weight", None), torch.Tensor) and w.dim() == 3

    moe = {n for n, m in model.named_modules() if hasattr(m, "experts") or any(bank(c) for c in m.children())}
    for name, p in model.named_parameters():
        q, kept = after[name], after[name] != 0
        parent, module = name.rsplit(".", 1)[0].rpartition(".")[::2]
        leaf = name.rsplit(".", 1)[-1]
        # an MoE's router stays dense by design (docs/methods.md); other Linears named so (Gemma 3n's
        # AltUp `modality_router`) are pruned like any
        near = parent in moe or parent.rpartition(".")[0] in moe  # beside the experts (AFMoE: mlp.router.gate)
        named = module in ("gate", "router") or "router" in module or parent.rpartition(".")[2] in ("gate", "router")
        router = named and near  # HunYuan's in a module of its own: mlp.gate.wg
        # or anywhere within a module named so beside the experts (ZAYA's router network: mlp.gate.router_mlp.fc1)
        router = router or any(name.startswith(f"{m}.{r}.") for m in moe for r in ("gate", "router"))
        target = (
            name.startswith(f"{prefix}.")  # carve prunes inside the decoder blocks (not BERT's head transform)
            and p.dim() >= 2 and "bias" not in leaf and not router
            # the default exclusions name what a module is, by its own name (RoBERTa-PreLayerNorm's
            # prefix and DBRX's norm_attn_norm, which holds the attention, have "norm")
            and not any(fnmatch.fnmatch(module, e) for e in DEFAULT_EXCLUDE)
        )  # fmt: skip
        if not ((updates or torch.equal(q[kept], p[kept])) if target else torch.equal(q, p)):
            return {**r, "outcome": "WRONG", "why": f"{name}: {'kept entries' if target else 'values'} changed"}
        if not target:
            continue
        gone = int((~kept & (p != 0)).sum())
        removed, total = removed + gone, total + p.numel()
        if gone < 0.4 * p.numel():
            dense.add(re.sub(r"\.\d+\.", ".N.", name))
    r["sparsity"] = round(removed / max(total, 1), 4)
    r["left_dense"] = sorted(dense)
    return {**r, "outcome": "partly dense" if dense else "pruned"}


def _streamed_differs(r: dict[str, Any], model: Any, tmp: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The job of row `r` run again with --stream into tmp/streamed: the finished row where it was
    refused, crashed, or wrote anything but the in-memory output (tmp/out) bit for bit; None if equal."""
    import torch
    from safetensors.torch import load_file

    again = {**r, "flags": r["flags"] + " --stream"}
    ended = _extract(again, model, tmp / "streamed")
    if ended is not None:
        return {**ended, "flags": r["flags"], "why": f"--stream: {ended.get('why', '')}"}
    r["stream_seconds"] = again["seconds"]
    a, b = ({k: v for f in sorted((d / "out").glob("model*.safetensors")) for k, v in load_file(f).items()}
            for d in (tmp, tmp / "streamed"))  # fmt: skip
    if sorted(a) != sorted(b):
        return {**r, "outcome": "WRONG", "why": f"--stream writes other tensors: {sorted(set(a) ^ set(b))[:3]}"}
    for k in a:
        if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            return {**r, "outcome": "WRONG", "why": f"--stream writes {k} otherwise"}
    streamed = json.loads((tmp / "streamed" / "out" / "carve.json").read_text())
    for when in ("before", "after"):
        x, y = manifest["metrics"][when]["domain_ppl"], streamed["metrics"][when]["domain_ppl"]
        if not abs(x - y) <= 1e-4 * abs(x):
            return {**r, "outcome": "WRONG", "why": f"--stream's {when} perplexity {y:.6g}, in memory {x:.6g}"}
    return None


def row(model_type: str, method: str | None = None, stream: bool = False) -> dict[str, Any]:
    """One row in its own process: the structured sweep's, or with `method` the unstructured one's."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    unstructured = ["--unstructured-worker", method, "1" if stream else "0"] if method else ["--worker"]
    cmd = [sys.executable, __file__, *unstructured, model_type]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=2 * TIMEOUT_S,
                              preexec_fn=lambda: _limit(WORKER_BYTES))  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"id": model_type, "outcome": "crashed", "why": "timed out", "commit": commit()}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        result = {
            "id": model_type,
            "outcome": "crashed",
            "why": f"worker exit {proc.returncode}: {_one_line(proc.stderr)}",
        }
    else:
        result = json.loads(lines[-1])
    return {**result, "commit": commit()}


ORDER = ["WRONG", "crashed", "partly dense", "held+sliced", "sliced", "pruned", "refused", "not built"]


def table(rows: list[dict[str, Any]], method: str | None = None, stream: bool = False) -> str:
    """The section's text: the structured sweep's, or with `method` the unstructured one's (`stream`:
    each job also streamed, its output compared with the in-memory one's)."""
    import collections

    unstructured = method is not None

    counts = collections.Counter(r["outcome"] for r in rows)
    commits = sorted({r["commit"] for r in rows})
    what = (
        f"pruned by `carve extract --sparsity 0.5 --method {method}`, reloaded with stock from_pretrained: "
        "the share of weight-matrix entries removed (embeddings, heads, norms, biases and routers excluded), "
        "the matrices left with under 40% removed, every other parameter (and, for a method that does not "
        "update weights, every kept entry) compared with the source's, and the logits checked finite"
        + (
            "; each job run again with --stream, its output compared with the in-memory one tensor for tensor"
            if stream
            else ""
        )
        if unstructured
        else "cut by `carve extract` in every dimension carve does not hold, reloaded with stock "
        "from_pretrained and compared with the source with the removed units zeroed"
    )
    lines = [
        f"## {'Unstructured' if unstructured else 'Structured'} extraction across transformers' causal-LM "
        "architectures (bench/structured_archs.py"
        + (
            f" --unstructured{'' if method == 'magnitude' else f' --method {method}'}{' --stream' if stream else ''})"
            if unstructured
            else ")"
        ),
        "",
        f"{len(rows)} model types of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`"
        + (f" (partial: {len(kinds()) - len(rows)} of {len(kinds())} not run yet)" if len(rows) < len(kinds()) else "")
        + f"; commit(s) {', '.join(commits)}. "
        + ", ".join(f"{counts[o]} {o}" for o in ORDER if counts[o])
        + f". A tiny random model of each, {what} (the script's docstring says how).",
        "",
        "| model type | class | outcome | "
        + ("sparsity | left dense" if unstructured else "held whole | flags | max abs logit diff")
        + " | seconds | note |",
        "|---|---|---|---|---|" + ("" if unstructured else "---|") + "---|---|",
    ]
    for r in sorted(rows, key=lambda r: (ORDER.index(r["outcome"]), r["id"])):
        if r["outcome"] in ("refused", "not built"):
            continue
        diff = "" if r.get("max_abs_logit_diff") is None else f"{r['max_abs_logit_diff']:.1e}"
        middle = (
            f"{r.get('sparsity', '')} | {', '.join(r.get('left_dense', [])) or '-'}"
            if unstructured
            else f"{', '.join(r.get('held', [])) or '-'} | {r.get('flags', '')} | {diff}"
        )
        lines.append(
            f"| {r['id']} | {r.get('class', '')} | {r['outcome']} | {middle} | {r.get('seconds', '')} | "
            f"{r.get('why', '')} |"
        )
    for outcome in ("refused", "not built"):
        reasons: dict[str, list[str]] = collections.defaultdict(list)
        for r in rows:
            if r["outcome"] == outcome:
                reasons[r["why"].replace(r.get("class", "\0"), "{class}")].append(r["id"])
        if reasons:
            lines += ["", f"{outcome.capitalize()} ({counts[outcome]}), by reason:", ""]
            lines += [
                f"- {', '.join(sorted(ks))}: {why}" for why, ks in sorted(reasons.items(), key=lambda x: -len(x[1]))
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])), flush=True)
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--unstructured-worker":
        print(json.dumps(unstructured_worker(sys.argv[4], sys.argv[2], sys.argv[3] == "1")), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", help="model types to (re)run (default: every one); the others are kept")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved rows")
    ap.add_argument("--unstructured", action="store_true", help="the unstructured sweep (50%% sparsity) instead")
    ap.add_argument("--method", default="magnitude", help="the unstructured sweep's method (default: magnitude)")
    ap.add_argument("--stream", action="store_true", help="the unstructured sweep also streamed: outputs must match")
    args = ap.parse_args()
    method = args.method if args.unstructured else None
    path, section = RESULTS, "structured-archs"
    if method:  # magnitude's rows in unstructured_archs.jsonl, another method's in unstructured_<method>_archs.jsonl
        tag = ("" if method == "magnitude" else f"{method.replace('-', '_')}_") + ("stream_" if args.stream else "")
        path, section = (
            HERE / "results" / f"unstructured_{tag}archs.jsonl",
            f"unstructured-{tag.replace('_', '-')}archs",
        )
    rows = load_results(path)
    for kind in [] if args.table_only else (args.kinds or kinds()):
        print(f"running {kind} ...", flush=True)
        r = row(kind, method, args.stream)
        save_result(path, r)
        rows[kind] = r
        print(json.dumps(r), flush=True)
    text = table([rows[k] for k in kinds() if k in rows], method, args.stream)
    write_section(section, text)
    print(text)


if __name__ == "__main__":
    main()
