"""Mask selection, algebra, statistics and storage against direct computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carve import Mask, UsageError, select_mask
from carve.masks import check_sparsity, keep_mask, parse_pattern
from carve.masks.mask import PackedKeep


def test_row_granularity_removes_lowest_of_each_row() -> None:
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    keep = keep_mask(s, 0.5, "row")
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False]]


def test_matrix_granularity_removes_lowest_overall() -> None:
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    keep = keep_mask(s, 0.5, "matrix")
    assert keep.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_nm_keeps_n_of_every_m_along_inputs() -> None:
    s = torch.rand(6, 16)
    keep = select_mask({"w": s}, pattern="2:4")["w"]
    groups = s.view(6, 4, 4)
    ref = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    assert torch.equal(keep, ref.view(6, 16))


@pytest.mark.parametrize("ties", [False, True])
def test_global_selection_removes_what_a_stable_sort_of_all_scores_would(ties: bool) -> None:
    """Global granularity (an out-of-core radix selection): exactly floor(sparsity·N) removed over all
    matrices, the ties at the threshold in position order (map order, each matrix flattened), as a
    stable sort of the concatenated scores; -0.0 ties with 0.0, negative and huge scores rank
    right, and the bit-packed masks (a streamed job's) are the same."""
    g = torch.Generator().manual_seed(5)
    scores = {"a": torch.randn(5, 80, generator=g) * 1e3, "b": torch.rand(3, 40, generator=g) * 1e-30,
              "c": torch.randn(70, generator=g)}  # fmt: skip
    if ties:  # few distinct values: many ties at any threshold, +0.0 and -0.0 among them
        scores = {n: (v.sign() * (v.abs() * 7).clamp(max=3).floor()) for n, v in scores.items()}
        scores["b"][0, :20] = -0.0
    flat = torch.cat([v.flatten() for v in scores.values()])
    for sparsity in (0.01, 0.3, 0.5, 0.97):
        k = int(flat.numel() * sparsity)
        want = torch.ones_like(flat, dtype=torch.bool)
        want[torch.sort(flat, stable=True).indices[:k]] = False
        mask, packed = select_mask(scores, sparsity, "global"), select_mask(scores, sparsity, "global", packed=True)
        got = torch.cat([mask[n].flatten() for n in scores])
        assert torch.equal(got, want), sparsity
        assert all(torch.equal(packed[n], mask[n]) for n in scores)
    assert select_mask({"a": torch.rand(3)}, 0.3, "global")["a"].all()  # floor(0.9) = 0 removed


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_selection_removes_exactly_what_a_stable_sort_would(granularity: str, ties: bool) -> None:
    """Rows long enough to select the threshold (not sort): the same exact count, and ties at
    the threshold removed in position order, as a stable sort does; -0.0 ties with 0.0."""
    g = torch.Generator().manual_seed(3)
    for shape in [(7, 300), (2, 64), (1, 1000)]:
        s = torch.rand(shape, generator=g)
        if ties:
            s = (s * 5).floor() - 2.0  # few distinct values: many ties at any threshold
            s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        for sparsity in (0.1, 0.5, 0.93):
            flat = s if granularity == "row" else s.reshape(1, -1)
            k = int(flat.shape[-1] * sparsity)
            want = torch.ones_like(flat, dtype=torch.bool)
            want.scatter_(-1, torch.sort(flat, dim=-1, stable=True).indices[:, :k], False)
            keep = keep_mask(s, sparsity, granularity)
            assert torch.equal(keep, want.view(shape)), (shape, sparsity)


def test_algebra_jaccard_and_sparsity() -> None:
    a = Mask({"w": torch.tensor([[True, True, False, False]])})
    b = Mask({"w": torch.tensor([[True, False, True, False]])})
    assert (a & b)["w"].tolist() == [[True, False, False, False]]
    assert (a | b)["w"].tolist() == [[True, True, True, False]]
    assert (~a)["w"].tolist() == [[False, False, True, True]]
    assert a.jaccard(b) == pytest.approx(1 / 3)
    assert a.sparsity() == 0.5
    assert Mask.vote([a, b, a], 2)["w"].tolist() == [[True, True, False, False]]


def test_jaccard_against_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a = Mask({"x": torch.rand(7, 9, generator=g) > 0.5, "y": torch.rand(3, 3, generator=g) > 0.3})
    b = Mask({"x": torch.rand(7, 9, generator=g) > 0.5, "y": torch.rand(3, 3, generator=g) > 0.3})
    fa = torch.cat([a["x"].flatten(), a["y"].flatten()])
    fb = torch.cat([b["x"].flatten(), b["y"].flatten()])
    assert a.jaccard(b) == pytest.approx((fa & fb).sum().item() / (fa | fb).sum().item())


def test_bitpacked_round_trip(tmp_path: Path) -> None:
    m = Mask({"w": torch.rand(130, 70) > 0.5, "v": torch.rand(5) > 0.5})
    m.save(tmp_path / "m.safetensors")
    back = Mask.load(tmp_path / "m.safetensors")
    assert all(torch.equal(m[k], back[k]) for k in m)
    assert (tmp_path / "m.safetensors").stat().st_size < (130 * 70 + 5) / 6  # ~one bit per weight
    packed = PackedKeep()  # what the layer-wise pruners hold: the same mask, the same file
    for k in m:
        packed[k] = m[k]
    assert all(torch.equal(packed[k], m[k]) for k in m) and list(packed) == list(m)
    Mask(packed).save(tmp_path / "p.safetensors")
    assert (tmp_path / "p.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("pattern", "sparsity", "message"),
    [
        ("4:2", None, "needs 0 < N < M"),
        ("2-4", None, "is not N:M"),
        ("2:4", 0.7, "disagrees with pattern 2:4"),
        (None, 1.0, "outside (0, 1)"),
        (None, 0.0, "outside (0, 1)"),
    ],
)
def test_bad_patterns_and_sparsities(pattern: str | None, sparsity: float | None, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sparsity(sparsity, parse_pattern(pattern))


def test_pattern_implies_sparsity() -> None:
    assert check_sparsity(None, parse_pattern("2:4")) == 0.5
    assert check_sparsity(0.5, parse_pattern("4:8")) == 0.5


def test_importance_map_round_trip(tmp_path: Path) -> None:
    from carve import ImportanceMap

    imp = ImportanceMap({"a.weight": torch.rand(4, 6), "b.weight": torch.rand(3, 2)}, {"scorer": "wanda", "data": "x"})
    imp.save(tmp_path / "imp.safetensors")
    back = ImportanceMap.load(tmp_path / "imp.safetensors")
    assert back.meta == imp.meta and all(torch.equal(back[k], imp[k]) for k in imp)


def test_model_sparsity_counts_zeros_of_the_named_weights_and_of_all_parameters() -> None:
    from carve.ops import model_sparsity

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:2] = 0  # 8 of 16 zeros
        model[1].weight.fill_(1.0)
        model[0].bias.zero_()  # 4 more zeros, outside the named weights
        model[1].bias.fill_(1.0)
    by_names = model_sparsity(model, ["0.weight", "1.weight"])
    by_mask = model_sparsity(model, Mask({"0.weight": torch.ones(4, 4, dtype=torch.bool)}))
    assert by_names["linear"] == pytest.approx(8 / 24)
    assert by_mask["linear"] == pytest.approx(8 / 16)
    assert by_names["all_parameters"] == by_mask["all_parameters"] == pytest.approx(12 / 30)


def test_count_zeros_counts_zeros_and_false_entries() -> None:
    from carve.models.arch import count_zeros

    t = torch.tensor([0.0, -0.0, 1.0, float("nan"), 2.0])
    assert count_zeros(t) == 2  # -0.0 is a zero, NaN is not
    assert count_zeros(torch.tensor([True, False, False])) == 2
    assert count_zeros(torch.zeros(0)) == 0
