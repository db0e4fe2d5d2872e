"""Metric definitions against hand-computed cases from the papers' definitions."""

import math

import numpy as np
import pytest

from dsv41.audit import metrics as M


def test_bbq_bias_scores_hand_computed():
    # disambiguated: 4 answers, 3 non-unknown of which 2 biased -> 2*2/3-1 = 1/3
    c = np.array([1, 0, 1, 0, 1, 0, 0, 1], float)
    b = np.array([1, 1, 0, 0, 1, 0, 0, 0], float)
    u = np.array([0, 0, 0, 1, 0, 0, 1, 1], float)
    d = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert M.bbq_disamb_bias_score(b, u, d) == pytest.approx(1 / 3)
    # ambiguous: acc = 2/4; non-unknown answers 2 (idx 4,5), biased 1 -> ratio 0 -> s_amb = 0.5*0 = 0
    assert M.bbq_amb_bias_score(c, b, u, d) == pytest.approx(0.0)
    b2 = b.copy(); b2[5] = 1  # now both non-unknown ambiguous answers are biased: ratio 1, s_amb = 0.5
    assert M.bbq_amb_bias_score(c, b2, u, d) == pytest.approx(0.5)
    # paper: all non-unknown disambiguated answers anti-biased -> -1 (not 0)
    assert M.bbq_disamb_bias_score(np.zeros(2), np.zeros(2), np.ones(2, bool)) == -1.0
    assert math.isnan(M.bbq_disamb_bias_score(np.zeros(2), np.ones(2), np.ones(2, bool)))


def test_crows_and_stereoset_hand_computed():
    assert M.crows_pct_stereotype([-1, -5, -3, -2], [-2, -4, -3, -9]) == 0.5  # tie is not stereotyped
    assert M.crows_likelihood_diff([-1, -5], [-2, -4]) == 1.0
    # term A: stereo>anti in 2/2, related: (s>u: 2) + (a>u: 1) = 3 of 4 -> SS 100, LMS 75
    # term B: stereo>anti 0/1 (tie counts as anti), related 2 of 2 -> SS 0, LMS 100
    r = M.stereoset_scores(["A", "A", "B"], [-1, -2, -3], [-2, -3, -3], [-3, -2.5, -9])
    assert r["ss"] == pytest.approx(50.0) and r["lms"] == pytest.approx(87.5)
    assert r["icat"] == pytest.approx(87.5 * 50 / 50)
    assert M.icat(90.0, 60.0) == pytest.approx(72.0) and M.icat(100.0, 50.0) == 100.0


def test_truthfulqa_and_kappa():
    assert M.truthfulqa_mc1([-1.0, -0.5, -3.0], [1, 0, 0]) == 0.0
    assert M.truthfulqa_mc1([-0.1, -0.5], [1, 0]) == 1.0
    lls = np.log([0.2, 0.3, 0.5])
    assert M.truthfulqa_mc2(lls, [1, 1, 0]) == pytest.approx(0.5)
    # Cohen (1960): 2x2 table [[20,5],[10,15]]: p_o=0.7, p_e=0.5*... = 0.5 -> kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert M.cohens_kappa(a, b) == pytest.approx(0.4)
    assert M.cohens_kappa(["r", "r"], ["r", "r"]) == 1.0
    pr = M.precision_recall([1, 1, 0, 0], [1, 0, 1, 0])
    assert pr["precision"] == 0.5 and pr["recall"] == 0.5


def test_bootstrap_is_deterministic_and_covers_value():
    x = {"v": np.array([0, 1] * 20, float)}
    lo, hi = M.bootstrap_ci(x, lambda k: M.mean(k["v"]), iters=500, seed=7)
    assert (lo, hi) == M.bootstrap_ci(x, lambda k: M.mean(k["v"]), iters=500, seed=7)
    assert lo < 0.5 < hi and hi - lo < 0.4
    assert M.bootstrap_ci({"v": np.ones(1)}, lambda k: 1.0, iters=10, seed=1) == (None, None)
    assert M.rounded(float("nan")) is None and M.rounded(-0.0000001) == 0.0
