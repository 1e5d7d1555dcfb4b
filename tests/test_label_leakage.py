"""Label-leakage attacks on gradients a server receives, and the defences, on cases with a known answer (CPU, seconds)."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from splitrpc.privacy import label_leakage
from splitrpc.errors import UserError

CLASSES = 10
N = 2000

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def softmax_gradients(n: int, classes: int, seed: int, logit_scale: float = 2.0, bias: torch.Tensor | None = None):
    """(g, labels): gradients of softmax cross-entropy wrt random logits, g = softmax(z) - onehot(y).

    What the server would receive if the hospital's tail were only the loss: the
    label is written into the sign pattern of g (the one negative entry).
    """
    generator = torch.Generator().manual_seed(seed)
    logits = logit_scale * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    if bias is not None:
        logits = logits + bias
    labels = torch.randint(classes, (n,), generator=generator)
    return torch.softmax(logits, 1) - F.one_hot(labels, classes).double(), labels


def imbalanced_binary_gradients(n: int, seed: int, positive_share: float = 0.1):
    """Li et al.'s setting: a rare positive class the model still scores low, two logits."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=generator) < positive_share).long()
    logits = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 0.5
    logits[:, 1] -= 2.0  # p(positive) around 0.12 for every sample: positives are badly fitted
    return torch.softmax(logits, 1) - F.one_hot(labels, 2).double(), labels


def pairwise_auc(scores, positives) -> float:
    """The definition: over all (positive, negative) pairs, 1 if the positive scores higher, 1/2 on a tie."""
    pos = [float(s) for s, p in zip(scores, positives) if p]
    neg = [float(s) for s, p in zip(scores, positives) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_the_pairwise_definition_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (57,), generator=generator).double()  # few distinct values: many ties
    positives = torch.rand(57, generator=generator) < 0.3
    assert label_leakage.auc(scores, positives) == pytest.approx(pairwise_auc(scores, positives), abs=1e-12)


def test_auc_extremes_and_bad_input():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert label_leakage.auc(scores, torch.tensor([False, False, True, True])) == 1.0
    assert label_leakage.auc(scores, torch.tensor([True, True, False, False])) == 0.0
    assert label_leakage.auc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5
    with pytest.raises(UserError, match="positives and negatives"):
        label_leakage.auc(scores, torch.zeros(4, dtype=torch.bool))


# --------------------------------------------------------------------------- attacks on a known case
def test_direction_attacks_recover_labels_from_softmax_gradients():
    g, labels = softmax_gradients(N, CLASSES, seed=0)
    report = label_leakage.label_leakage_report(g, labels, CLASSES, known_per_class=3, seed=0)
    assert report["samples"] == N - 3 * CLASSES
    assert report["direction_mean_acc"] == 1.0
    assert report["direction_nearest_acc"] > 0.99
    assert report["cosine_auc_min"] > 0.99
    assert report["cluster_hungarian_acc"] > 0.99
    assert report["cluster_known_acc"] > 0.99
    assert report["cluster_oracle_acc"] >= max(report["cluster_known_acc"], report["cluster_hungarian_acc"])


def test_norm_attack_separates_a_rare_badly_fitted_class():
    g, labels = imbalanced_binary_gradients(N, seed=0)
    assert label_leakage.auc(label_leakage.norm_scores(g), labels == 1) > 0.99
    # the direction attack too: the positives' gradients all point along (+1, -1)
    positive = int((labels == 1).nonzero()[0])
    assert label_leakage.auc(label_leakage.cosine_scores(g, g[positive]), labels == 1) == 1.0


def test_gradients_independent_of_labels_leak_nothing():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(CLASSES, (N,), generator=generator)
    g = torch.randn(N, 64, generator=generator, dtype=torch.float64)
    report = label_leakage.label_leakage_report(g, labels, CLASSES, known_per_class=5, seed=0)
    # AUC over ~200 positives and ~1800 negatives has a standard error of ~0.02
    for key in ("norm_auc", "cosine_auc", "direction_mean_auc"):
        assert abs(report[key] - 0.5) < 0.03, key
    # accuracy over ~1950 samples at chance 0.1 has a standard error of ~0.007
    for key in ("direction_mean_acc", "direction_nearest_acc", "cluster_known_acc"):
        assert abs(report[key] - 0.1) < 0.02, key


def test_hungarian_matching_is_the_best_one_to_one_labelling():
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        cost = torch.randint(0, 9, (5, 5), generator=generator).double()
        best = min(sum(cost[r, c].item() for r, c in enumerate(p)) for p in itertools.permutations(range(5)))
        match = label_leakage.hungarian(cost)
        assert sorted(match) == list(range(5))
        assert sum(cost[r, c].item() for r, c in enumerate(match)) == best


def test_clusters_named_by_known_labels_and_by_the_oracle():
    # three tight, well separated directions; cluster ids are arbitrary, names must follow the labels
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    g = F.one_hot(labels, 3).double() + 0.01 * torch.randn(15, 3, generator=torch.Generator().manual_seed(0))
    clusters = label_leakage.kmeans_directions(g, 3, seed=0)
    assert len(set(clusters.tolist())) == 3
    assert torch.equal(label_leakage.labels_by_hungarian(clusters, labels, 3), labels)
    known = torch.tensor([0, 5, 10])
    assert torch.equal(label_leakage.labels_from_known(clusters, known, labels[known], 3), labels)


# --------------------------------------------------------------------------- defences
def test_max_norm_equalises_expected_norms_and_blunts_the_norm_attack():
    g, labels = imbalanced_binary_gradients(N, seed=0)
    generator = torch.Generator().manual_seed(0)
    before = label_leakage.auc(label_leakage.norm_scores(g), labels == 1)
    defended = label_leakage.max_norm_defence(g, generator)
    after = label_leakage.auc(label_leakage.norm_scores(defended), labels == 1)
    assert before > 0.99 and after < 0.75
    # a perfectly fitted sample (gradient exactly 0) stays 0 instead of turning NaN, also in float32
    zeroed = g.float().clone()
    zeroed[0] = 0
    assert torch.equal(label_leakage.max_norm_defence(zeroed, generator)[0], torch.zeros(2))
    assert torch.isfinite(label_leakage.max_norm_defence(zeroed, generator)).all()
    # every perturbed gradient stays on its own line
    cos = (F.normalize(defended, dim=1) * F.normalize(g, dim=1)).sum(1).abs()
    assert torch.allclose(cos, torch.ones_like(cos))
    # E|g'|^2 = max |g|^2: check over many draws of one batch
    draws = torch.stack([label_leakage.max_norm_defence(g[:50], generator).norm(dim=1) ** 2 for _ in range(4000)])
    assert torch.allclose(draws.mean(0), g[:50].norm(dim=1).max() ** 2 * torch.ones(50, dtype=torch.float64), rtol=0.1)


def test_gaussian_noise_blunts_the_direction_attack_in_proportion():
    g, labels = softmax_gradients(N, CLASSES, seed=0)
    generator = torch.Generator().manual_seed(0)
    accuracies = [label_leakage.label_leakage_report(label_leakage.gaussian_noise_defence(g, ratio, generator), labels,
                                               CLASSES, seed=0)["direction_mean_acc"] for ratio in (0.0, 1.0, 5.0)]
    assert accuracies[0] == 1.0
    assert accuracies[0] > accuracies[1] > accuracies[2]
    assert accuracies[2] < 0.3
    noisy = label_leakage.gaussian_noise_defence(torch.zeros(4, 100), 1.0, generator)
    assert torch.equal(noisy, torch.zeros(4, 100))  # the scale is relative to the largest gradient


def test_bad_input_is_a_user_error():
    g, labels = softmax_gradients(20, 3, seed=0)
    with pytest.raises(UserError, match="label the server knows"):
        label_leakage.class_direction_scores(g, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(UserError, match="clusters"):
        label_leakage.kmeans_directions(g, 30)
    with pytest.raises(UserError, match="non-negative"):
        label_leakage.gaussian_noise_defence(g, -1.0, torch.Generator())


# --------------------------------------------------------------------------- the bench entry point
def test_bench_emulates_u_shaped_gradients_and_records_every_setting(tmp_path, cache_dir, capsys):
    from bench import label_leakage

    out = tmp_path / "ll.jsonl"
    code = label_leakage.main(["--steps", "3", "--window", "2", "--deeper-tails", "3", "--out", str(out),
                               "--set", "dataset=synthetic", "--set", f"cache_dir={cache_dir}",
                               "--set", "synthetic_train=512", "--set", "synthetic_test=64", "--set", "batch_size=64",
                               "--set", "limit_test=0"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["mode"] == "vanilla" and rows[0]["label_inference_acc"] == 1.0
    settings = [(r["task"], r["tail"], r["defence"], r.get("noise_ratio")) for r in rows[1:]]
    assert settings == [("10-class", 1, "none", None), ("10-class", 1, "noise", 1.0), ("10-class", 1, "noise", 4.0),
                        ("10-class", 1, "max_norm", None), ("10-class", 3, "none", None),
                        ("binary", 1, "none", None), ("binary", 1, "max_norm", None)]
    for row in rows[1:]:
        assert [p["steps"] for p in row["points"]] == [[1, 2], [2, 3]]  # start, middle, end of 3 steps
        assert all(p["samples"] + p["known_labels"] == 128 for p in row["points"])
    # the server is attacked on what the hospital returned, defence included (measured 1.0 against 0.31 and 0.46)
    assert all(p["direction_mean_acc"] == 1.0 for p in rows[1]["points"])
    assert all(p["direction_mean_acc"] < 0.6 for p in rows[3]["points"])
    # what the server gets back has the shape of what its trunk sent down: VGG-11 x0.25 stages 7 and 5
    assert rows[1]["gradient_shape"] == [128, 2, 2]
    assert rows[5]["gradient_shape"] == [128, 4, 4]
    table = label_leakage.table(str(out)).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| labels (vanilla split) |")
    assert table[3].startswith("| gradient, tail 1 | 10-class |") and "1.000 -> 1.000" in table[3]
    code = label_leakage.main(["--deeper-tails", "8", "--steps", "1", "--window", "1", "--out", str(out),
                               "--set", "dataset=synthetic", "--set", f"cache_dir={cache_dir}"])
    assert code == 2
    assert "leaves the server no stage" in capsys.readouterr().err
