"""ACC, NMI, ARI and homogeneity against brute force, textbook formulas and scikit-learn."""

import numpy as np
import pytest
from reference import ari_pairs, brute_force_acc, homogeneity, nmi_arithmetic
from sklearn import metrics as skm

from lightning_protos.eval.metrics import cluster_acc, clustering_scores

CASES = {  # (y_true, y_pred), hand-made
    "K=C": ([0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [1, 1, 0, 0, 0, 2, 2, 2, 2, 1]),
    "K=C permuted exactly": ([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1]),
    "K<C": ([0, 0, 1, 1, 2, 2, 3, 3, 3], [0, 0, 0, 1, 1, 1, 1, 0, 1]),
    "K>C": ([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 2, 3, 3, 3, 4]),
    "K>C non-contiguous ids": ([1, 1, 1, 5, 5, 5, 5], [7, 7, 3, 9, 9, 9, 3]),
    "one cluster": ([0, 1, 2, 0, 1, 2], [4, 4, 4, 4, 4, 4]),
}


@pytest.mark.parametrize("case", CASES)
def test_cluster_acc_matches_brute_force(case):
    y_true, y_pred = CASES[case]
    assert cluster_acc(y_true, y_pred) == pytest.approx(brute_force_acc(y_true, y_pred))


def test_cluster_acc_random_labels_brute_force():
    rng = np.random.default_rng(0)
    for n_classes, n_clusters in [(3, 3), (2, 5), (5, 2), (4, 6)]:
        y_true = rng.integers(0, n_classes, 25)
        y_pred = rng.integers(0, n_clusters, 25)
        assert cluster_acc(y_true, y_pred) == pytest.approx(brute_force_acc(y_true, y_pred))


def test_cluster_acc_hand_values():
    assert cluster_acc([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 0]) == pytest.approx(4 / 6)  # K < C
    assert cluster_acc([0, 0, 1, 1], [0, 1, 2, 3]) == pytest.approx(2 / 4)  # K > C
    assert cluster_acc([3, 3, 7, 7], [1, 1, 0, 0]) == 1.0


@pytest.mark.parametrize("case", CASES)
def test_scores_match_formulas_and_sklearn(case):
    y_true, y_pred = CASES[case]
    scores = clustering_scores(y_true, y_pred)
    assert set(scores) == {"acc", "nmi", "ari", "homogeneity"}
    assert scores["acc"] == pytest.approx(brute_force_acc(y_true, y_pred))
    assert scores["ari"] == pytest.approx(ari_pairs(y_true, y_pred))
    assert scores["ari"] == pytest.approx(skm.adjusted_rand_score(y_true, y_pred))
    assert scores["homogeneity"] == pytest.approx(homogeneity(y_true, y_pred))
    assert scores["homogeneity"] == pytest.approx(skm.homogeneity_score(y_true, y_pred))
    assert scores["nmi"] == pytest.approx(skm.normalized_mutual_info_score(y_true, y_pred))
    if len(set(y_pred)) > 1:
        assert scores["nmi"] == pytest.approx(nmi_arithmetic(y_true, y_pred))
    else:  # NMI is 0/0 for a single cluster; scikit-learn defines it as 0
        assert scores["nmi"] == 0.0


def test_scores_of_perfect_and_independent_partitions():
    y = [0, 0, 1, 1, 2, 2]
    perfect = clustering_scores(y, [5, 5, 3, 3, 4, 4])
    assert perfect == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0, "homogeneity": 1.0})
    # each cluster holds one sample of every class: no information
    independent = clustering_scores([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1])
    assert independent["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert independent["homogeneity"] == pytest.approx(0.0, abs=1e-12)
    assert independent["ari"] == pytest.approx(-4 / 11)  # TP, FN, FP, TN = 0, 3, 6, 6
    assert independent["ari"] == pytest.approx(ari_pairs([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]))
