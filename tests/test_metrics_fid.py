"""FID/KID: the Frechet distance against closed forms and independent square roots, KID's estimator, and the
real Inception path end to end with randomly initialised weights saved in the published file's key layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.core.errors import UserError
from sdstudio.core.metrics import (
    CONFIG_KEY,
    DISABLED_NOTE,
    FID_MIN_SAMPLES,
    WEIGHTS_URL,
    FidEvaluator,
    FidInceptionV3,
    InceptionWeightsError,
    compare_features,
    evaluate_samples,
    feature_stats,
    fid_from_features,
    frechet_distance,
    kid,
    load_fid_inception,
)
from sdstudio.core.metrics import fid as fid_module
from tests.fid_helpers import random_fid_state_dict


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _denman_beavers_sqrtm(a: np.ndarray, iters: int = 60) -> np.ndarray:
    """Matrix square root by the Denman-Beavers iteration: independent of the eigendecomposition route."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iters):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


# --- Frechet distance ------------------------------------------------------------------------------------

def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_2x2_closed_form_for_correlated_covariances() -> None:
    # For a 2x2 matrix with eigenvalues l1, l2 >= 0: Tr(M^1/2) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    m1, m2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    prod = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_an_iterative_matrix_square_root() -> None:
    rng = np.random.default_rng(1)
    d = 24
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * _denman_beavers_sqrtm(s1 @ s2))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_when_scipy_is_installed() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 32), _random_spd(rng, 32)
    m1, m2 = rng.normal(size=32), rng.normal(size=32)
    root = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_zero_for_identical_stats_and_symmetric() -> None:
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
    m1, m2 = rng.normal(size=16), rng.normal(size=16)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-10)


def test_frechet_distance_with_fewer_samples_than_dimensions() -> None:
    # Rank-deficient covariances (N < D), the usual case for small FID sets: finite, symmetric, zero on itself,
    # and equal to the sum of square roots of the (general, non-symmetric) eigenvalues of S1 S2.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 40)), rng.normal(0.3, 1.2, size=(12, 40))
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    eig = np.linalg.eigvals(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    fd = frechet_distance(m1, s1, m2, s2)
    assert fd == pytest.approx(expected, rel=1e-6)
    assert fd == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_large_samples_approaches_the_gaussian_closed_form() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 1.0, size=(40_000, 3))
    b = rng.normal([1.0, 0.0, 0.0], [1.0, 2.0, 0.5], size=(40_000, 3))
    expected = 1.0 + (0 + (1 + 4 - 2 * 2) + (1 + 0.25 - 2 * 0.5))
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(expected, abs=0.05)


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_from_features_equals_the_statistics_route() -> None:
    rng = np.random.default_rng(9)
    for n1, n2 in ((12, 30), (30, 12), (80, 60)):  # the smaller set below and above the dimension (40)
        a, b = rng.normal(size=(n1, 40)), rng.normal(0.2, 1.1, size=(n2, 40))
        expected = frechet_distance(*feature_stats(a), *feature_stats(b))
        # Zero eigenvalues come out as +-eps * scale on the statistics route; their square roots differ.
        assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


# --- KID -------------------------------------------------------------------------------------------------

def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_on_whole_sets_is_the_unbiased_polynomial_mmd() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(15, 5)), rng.normal(0.5, 1.0, size=(15, 5))
    mean, std = kid(x, y, subsets=10, subset_size=100)
    assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-10)
    assert math.isnan(std)  # every "subset" is the whole set: no spread estimate


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_mean_shift() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(size=(600, 32))
    same = rng.normal(size=(600, 32))
    values = [kid(base, same + shift, subsets=20, subset_size=200, seed=0) for shift in (0.0, 0.25, 0.5, 1.0)]
    m0, s0 = values[0]
    assert abs(m0) < 3 * s0 + 1e-3
    means = [m for m, _ in values]
    assert means == sorted(means) and means[1] > m0 + 3 * s0
    assert kid(base, same, subsets=20, subset_size=200, seed=0) == (m0, s0)  # seeded


def test_kid_precomputed_kernel_matches_per_subset_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(50, 6)), rng.normal(0.3, 1.0, size=(40, 6))
    with_gram = kid(x, y, subsets=7, subset_size=20, seed=3)
    monkeypatch.setattr(fid_module, "_KID_GRAM_MAX", 0)
    per_subset = kid(x, y, subsets=7, subset_size=20, seed=3)
    assert with_gram == pytest.approx(per_subset, rel=1e-5)  # the precomputed kernel is stored as float32


# --- the Inception network and its weights file -----------------------------------------------------------

def test_inception_has_the_published_layout() -> None:
    model = FidInceptionV3()
    # torchvision's Inception-v3 has 27,161,264 parameters; without its auxiliary head (3,326,696) and with
    # the TF graph's 1008 classes instead of 1000 (+8 * 2049) that is 23,850,960.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    keys = model.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean", "Mixed_5b.branch1x1.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.running_var", "Mixed_7a.branch7x7x3_4.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.bn.bias", "fc.weight", "fc.bias"):
        assert key in keys
    assert tuple(keys["fc.weight"].shape) == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in keys)
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def test_mixed_block_average_pool_ignores_padding() -> None:
    block = FidInceptionV3().eval().Mixed_5b
    with torch.no_grad():
        block.branch_pool.conv.weight.fill_(1.0 / 192)  # the pool branch averages its input's channels
    ones = torch.ones(1, 192, 5, 5)
    pool_out = block(ones)[:, -32:]
    # count_include_pad=False: the border windows average only real pixels, so a constant stays constant.
    assert torch.allclose(pool_out, pool_out[0, 0, 2, 2].expand_as(pool_out))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_fid_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="module")
def evaluator(weights_file: Path) -> FidEvaluator:
    return FidEvaluator(load_fid_inception(weights_file), device="cpu", batch_size=3)


def _images(seed: int, n: int, size: int = 32, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_inception_features_are_2048d_deterministic_and_batch_size_invariant(evaluator: FidEvaluator) -> None:
    images = _images(0, 3)
    feats = evaluator.features(images)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std() > 0
    assert not np.allclose(feats[0], feats[1])
    assert np.array_equal(evaluator.features(images), feats)
    one_by_one = FidEvaluator(evaluator.inception, batch_size=1).features(images)
    np.testing.assert_allclose(one_by_one, feats, rtol=1e-4, atol=1e-5 * np.abs(feats).max())
    assert torch.backends.cudnn.allow_tf32  # switched off for the features only, then restored
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast region does not reach the network
        assert np.array_equal(evaluator.features(images), feats)


def test_grey_and_rgba_images_are_accepted(evaluator: FidEvaluator) -> None:
    grey = _images(1, 1, channels=1)
    np.testing.assert_allclose(evaluator.features(grey), evaluator.features(np.repeat(grey, 3, axis=-1)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        evaluator.features(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_evaluate_samples_runs_end_to_end_with_a_weights_file(weights_file: Path) -> None:
    result = evaluate_samples(_images(2, 4), _images(3, 3), str(weights_file), batch_size=4)
    assert result["enabled"] and result["n_generated"] == 4 and result["n_real"] == 3
    assert result["fid"] > 0 and math.isfinite(result["kid_mean"])
    assert result["fid_meaningful"] is False and "KID" in result["note"] and str(FID_MIN_SAMPLES) in result["note"]
    assert result["kid_subset_size"] == 3 and result["kid_std"] is not None


def test_full_state_dict_with_batch_counters_also_loads(tmp_path: Path, weights_file: Path) -> None:
    model = FidInceptionV3()
    model.load_state_dict(torch.load(weights_file, weights_only=True), strict=False)
    path = tmp_path / "full.pth"
    torch.save(model.state_dict(), path)
    loaded = load_fid_inception(path)
    assert torch.equal(loaded.Mixed_6b.branch7x7_2.conv.weight, model.Mixed_6b.branch7x7_2.conv.weight)


# --- errors people see ------------------------------------------------------------------------------------

def test_missing_weights_file_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(InceptionWeightsError) as info:
        load_fid_inception(tmp_path / "nope.pth")
    text = str(info.value)
    assert "nope.pth" in text and WEIGHTS_URL in text and CONFIG_KEY in text
    assert isinstance(info.value, UserError)


def test_foreign_weights_file_names_the_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, path)
    with pytest.raises(InceptionWeightsError, match=r"Missing \d+ of \d+ keys: Conv2d_1a_3x3\.conv\.weight.*"
                                                    r"conv1\.weight"):
        load_fid_inception(path)


def test_imagenet_inception_is_told_apart_from_the_fid_one(tmp_path: Path, weights_file: Path) -> None:
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    with pytest.raises(InceptionWeightsError, match="torchvision's ImageNet Inception"):
        load_fid_inception(path)


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(InceptionWeightsError, match="Cannot read Inception weights"):
        load_fid_inception(path)


def test_without_weights_the_metric_is_disabled_not_faked() -> None:
    for path in (None, ""):
        result = evaluate_samples(_images(4, 2), _images(5, 2), path)
        assert result["enabled"] is False and result["note"] == DISABLED_NOTE
        assert result["fid"] is None and result["kid_mean"] is None and result["kid_std"] is None
        assert "eval.inception_weights" in result["note"]


def test_compare_features_flags_fid_as_meaningful_only_from_the_minimum_count() -> None:
    rng = np.random.default_rng(8)
    big = compare_features(rng.normal(size=(FID_MIN_SAMPLES, 8)), rng.normal(size=(FID_MIN_SAMPLES, 8)),
                           kid_subsets=5)
    assert big["fid_meaningful"] is True and big["note"] == "" and big["kid_subset_size"] == 1000
    small = compare_features(rng.normal(size=(50, 8)), rng.normal(size=(FID_MIN_SAMPLES, 8)), kid_subsets=5)
    assert small["fid_meaningful"] is False and small["fid"] is not None and "noisy" in small["note"]
    none = compare_features(rng.normal(size=(1, 8)), rng.normal(size=(5, 8)))
    assert none["fid"] is None and none["kid_mean"] is None and "at least 2" in none["note"]
