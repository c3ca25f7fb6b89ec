"""Metrics as pure functions of feature tensors: known values, brute-force checks, torchmetrics' KID."""

from __future__ import annotations

import math

import pytest
import test_eval as shared
import torch

from customdiff.metrics import image_alignment, kid, mmd2_unbiased, poly_kernel, text_alignment

_one_thread = shared._one_thread  # autouse: one intra-op thread (much faster on shared 2-core machines)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_text_alignment_known_values():
    e = torch.eye(4)
    same = text_alignment(e, e * 3.0)  # scale does not matter
    assert same["cosine"] == pytest.approx(1.0) and same["clipscore"] == pytest.approx(2.5)
    ortho = text_alignment(e, e.roll(1, dims=0))  # each image orthogonal to its own text
    assert ortho["cosine"] == pytest.approx(0.0, abs=1e-12) and ortho["clipscore"] == pytest.approx(0.0, abs=1e-12)
    opposite = text_alignment(e, -e)
    assert opposite["cosine"] == pytest.approx(-1.0) and opposite["clipscore"] == 0.0  # max(cos, 0)
    # cos +0.5 and -0.5: mean cosine 0, CLIPScore (2.5 * 0.5 + 0) / 2
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[0.5, math.sqrt(0.75)], [-0.5, math.sqrt(0.75)]])
    mixed = text_alignment(img, txt)
    assert mixed["cosine"] == pytest.approx(0.0, abs=1e-12) and mixed["clipscore"] == pytest.approx(0.625)


def test_text_alignment_pairs_rows_only():
    a, b = _randn(6, 8, seed=1), _randn(6, 8, seed=2)
    expected = torch.nn.functional.cosine_similarity(a, b, dim=1)
    got = text_alignment(a, b)
    assert got["cosine"] == pytest.approx(float(expected.mean()))
    assert got["clipscore"] == pytest.approx(float((2.5 * expected.clamp(min=0)).mean()))
    with pytest.raises(ValueError):
        text_alignment(a, b[:5])


def test_image_alignment_known_values_and_brute_force():
    x = _randn(5, 16, seed=3)
    assert image_alignment(x, x.clone()) != pytest.approx(1.0)  # all pairs, not just the diagonal
    one = x[:1]
    assert image_alignment(one.repeat(3, 1), 2 * one.repeat(4, 1)) == pytest.approx(1.0)  # identical features
    assert image_alignment(torch.eye(3)[:1], torch.eye(3)[1:]) == pytest.approx(0.0)  # orthogonal
    assert image_alignment(one, -one) == pytest.approx(-1.0)
    y = _randn(7, 16, seed=4)
    brute = sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a in x for b in y) / (5 * 7)
    assert image_alignment(x, y) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        image_alignment(x, y[:, :8])


def test_mmd_matches_its_definition():
    x, y = _randn(6, 4, seed=5), _randn(6, 4, seed=6)
    k = lambda a, b: (float(a @ b) / 4 + 1) ** 3  # noqa: E731
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert float(mmd2_unbiased(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert poly_kernel(x, y).shape == (6, 6)


def test_kid_same_distribution_near_zero_shifted_positive():
    real = _randn(300, 32, seed=7)
    same = _randn(300, 32, seed=8)
    shifted = _randn(300, 32, seed=9) + 0.5
    m_same, s_same = kid(real, same, subsets=50, subset_size=100)
    m_shift, s_shift = kid(real, shifted, subsets=50, subset_size=100)
    assert abs(m_same) < 3 * s_same + 1e-3  # unbiased: zero within its spread
    assert m_shift > 10 * max(s_shift, abs(m_same))
    assert kid(real, shifted, subsets=5, subset_size=50, seed=1) == kid(real, shifted, subsets=5, subset_size=50,
                                                                        seed=1)


def test_kid_clamps_subset_size_and_rejects_tiny_sets():
    a, b = _randn(10, 4, seed=10), _randn(12, 4, seed=11)
    mean, std = kid(a, b, subsets=3, subset_size=1000)  # clamped to 10
    assert math.isfinite(mean) and std >= 0
    full = kid(a, b[:10], subsets=1, subset_size=10)  # one subset = the full sets: permutation-invariant
    assert full[0] == pytest.approx(float(mmd2_unbiased(a, b[:10])), rel=1e-12) and full[1] == 0.0
    with pytest.raises(ValueError):
        kid(a[:1], b)
    with pytest.raises(ValueError):
        kid(a, b[:, :3])


class _Features(torch.nn.Module):
    """A custom torchmetrics feature extractor: the inputs already are features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_kid_matches_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _randn(80, 24, seed=12), _randn(80, 24, seed=13) * 1.3 + 0.2
    # one subset of all samples: torchmetrics' random permutation cannot matter, so the values must agree
    tm = KernelInceptionDistance(feature=_Features(), subsets=1, subset_size=80)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    tm_mean, tm_std = tm.compute()
    mean, std = kid(real, fake, subsets=1, subset_size=80)
    assert mean == pytest.approx(float(tm_mean), rel=1e-10) and std == pytest.approx(float(tm_std), abs=1e-12)
    # random subsets: same estimator, different random draws, so equal within the spread of the subsets
    torch.manual_seed(0)
    tm = KernelInceptionDistance(feature=_Features(), subsets=200, subset_size=40)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    tm_mean, tm_std = tm.compute()
    mean, std = kid(real, fake, subsets=200, subset_size=40)
    assert abs(mean - float(tm_mean)) < 4 * float(tm_std) / math.sqrt(200) + 1e-9
    assert std == pytest.approx(float(tm_std), rel=0.3)
