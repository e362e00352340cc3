"""Tests of studio/qa_stats.py against values worked out by hand (in the comments), never recomputed
by the code under test."""

from __future__ import annotations

import csv
import dataclasses
import json
import sqlite3
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from studio import qa_stats as q


def ratings(rows):
    """(rater, item, system, score) tuples -> rating records."""
    return [{"rater": r, "item": i, "system": s, "score": x} for r, i, s, x in rows]


def ab(rows):
    """(rater, item, system_a, system_b, choice) tuples -> A/B records."""
    return [{"rater": r, "item": i, "system_a": a, "system_b": b, "choice": c} for r, i, a, b, c in rows]


# ---------------------------------------------------------------------------------------------
# t-interval


def test_t_interval_six_scores_by_hand():
    # scores 3 4 4 5 2 3: mean 21/6 = 3.5; squared deviations .25 .25 .25 2.25 2.25 .25 sum 5.5;
    # s^2 = 5.5/5 = 1.1, s = 1.048809, se = s/sqrt(6) = 0.428174; t table (df 5, 0.975) = 2.571;
    # half width = 2.571 * 0.428174 = 1.10084 -> [2.3992, 4.6008] (table's 3 decimals: +-3e-4)
    scores = [3, 4, 4, 5, 2, 3]
    low, high = q.t_interval(scores)
    assert low == pytest.approx(2.3992, abs=1e-3)
    assert high == pytest.approx(4.6008, abs=1e-3)
    row, = q.rating_table(ratings((f"r{k}", f"i{k}", "A", x) for k, x in enumerate(scores)))
    assert (row["n_answers"], row["n_raters"], row["n_items"]) == (6, 6, 6)
    assert row["mean"] == 3.5
    assert row["sd"] == pytest.approx(1.048809, abs=1e-6)
    assert (row["t_low"], row["t_high"]) == pytest.approx((2.3992, 4.6008), abs=1e-3)


def test_objective_mean_and_t_interval_by_hand():
    # latency 1 2 3: mean 2, s 1, se 1/sqrt(3) = 0.57735; t table (df 2, 0.975) = 4.303;
    # half 2.4843 -> [-0.4843, 4.4843]. rtf has one value: no interval. None/NaN skipped, ids skipped.
    records = [
        {"system": "A", "id": 7, "latency_s": 1.0, "rtf": 0.5},
        {"system": "A", "id": 8, "latency_s": 2.0, "rtf": None},
        {"system": "A", "id": 9, "latency_s": 3.0, "rtf": float("nan")},
        {"system": "B", "id": 10, "rtf": 0.25, "run_id": 3},
    ]
    rows = {(r["system"], r["field"]): r for r in q.objective_table(records)}
    assert set(rows) == {("A", "latency_s"), ("A", "rtf"), ("B", "rtf")}
    lat = rows[("A", "latency_s")]
    assert (lat["n"], lat["mean"], lat["sd"]) == (3, 2.0, 1.0)
    assert (lat["t_low"], lat["t_high"]) == pytest.approx((-0.4843, 4.4843), abs=1e-3)
    rtf = rows[("A", "rtf")]
    assert (rtf["n"], rtf["mean"], rtf["t_low"], rtf["t_high"]) == (1, 0.5, None, None)
    assert "one value" in rtf["note"]
    assert [r["field"] for r in q.objective_table(records, fields=["rtf"])] == ["rtf", "rtf"]


# ---------------------------------------------------------------------------------------------
# Bootstrap


def test_two_way_bootstrap_resamples_raters_and_items_by_hand():
    # 2 raters x 2 items, score = 1 + 2*rater + item: [[1, 2], [3, 4]]. A resample draws raters
    # (0,0), (0,1), (1,1) with prob 1/4, 1/2, 1/4 and items likewise, independently; its mean is
    # 1 + 2*(share of rater 1) + (share of item 1). Minimum 1 needs raters (0,0) and items (0,0):
    # prob 1/16 = 6.25 % > 2.5 %, maximum 4 likewise, so the 95 % percentile interval is [1, 4].
    # Items alone would give [2, 3] and raters alone [1.5, 3.5]: only the two-way draw gives [1, 4].
    data = q.parse_ratings(ratings([(0, 0, "A", 1), (0, 1, "A", 2), (1, 0, "A", 3), (1, 1, "A", 4)]))
    ci, used = q.bootstrap_two_way_ci(data)
    assert ci == (1.0, 4.0)
    assert used == q.BOOTSTRAP_RESAMPLES


def test_two_way_bootstrap_one_rater_two_items_by_hand():
    # One rater, items scoring 1 and 5: resample means 1, 3, 5 with prob 1/4, 1/2, 1/4 -> [1, 5].
    data = q.parse_ratings(ratings([("r", 0, "A", 1), ("r", 1, "A", 5)]))
    assert q.bootstrap_two_way_ci(data)[0] == (1.0, 5.0)


def _synthetic(n_raters, n_items, seed):
    # rater bias + item difficulty + noise, clipped to the 1..5 scale
    rng = np.random.default_rng(seed)
    bias, hard = rng.normal(0, 0.4, n_raters), rng.normal(0, 0.5, n_items)
    return ratings((r, i, "A", int(np.clip(round(3.5 + bias[r] + hard[i] + rng.normal(0, 0.7)), 1, 5)))
                   for r in range(n_raters) for i in range(n_items))


def test_bootstrap_deterministic_contains_mean_and_narrows():
    small = _synthetic(4, 6, seed=1)
    large = _synthetic(24, 60, seed=2)
    first, = q.rating_table(small)
    again, = q.rating_table(small)
    assert (first["boot_low"], first["boot_high"]) == (again["boot_low"], again["boot_high"])
    shuffled, = q.rating_table(small[::-1])
    assert (shuffled["boot_low"], shuffled["boot_high"]) == (first["boot_low"], first["boot_high"])
    big, = q.rating_table(large)
    for row in (first, big):
        assert row["boot_low"] < row["mean"] < row["boot_high"]
        assert row["boot_resamples"] == q.BOOTSTRAP_RESAMPLES
    assert big["boot_high"] - big["boot_low"] < 0.5 * (first["boot_high"] - first["boot_low"])
    # clustering by rater and item: the two-way interval is wider than the t-interval over answers
    assert big["boot_high"] - big["boot_low"] > big["t_high"] - big["t_low"]


def test_bootstrap_system_interval_independent_of_other_systems():
    data = _synthetic(5, 8, seed=3)
    alone, = q.rating_table(data)
    with_other = q.rating_table(data + [dict(r, system="B") for r in _synthetic(3, 4, seed=4)])
    assert with_other[0]["system"] == "A"
    assert (with_other[0]["boot_low"], with_other[0]["boot_high"]) == (alone["boot_low"], alone["boot_high"])


# ---------------------------------------------------------------------------------------------
# Pairwise Wilcoxon + Holm


def test_holm_three_p_values_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3 = 0.03, x2 = 0.06, x1 = 0.04 raised to 0.06 (monotone)
    assert q.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # None is not counted in m: m = 2, sorted 0.02 x 2 = 0.04, 0.6 x 1 = 0.6
    assert q.holm([None, 0.6, 0.02]) == [None, pytest.approx(0.6), pytest.approx(0.04)]
    # capped at 1: sorted 0.5 x 2 = 1.0, 0.6 x 1 = 0.6 raised to 1.0
    assert q.holm([0.6, 0.5]) == [1.0, 1.0]
    assert q.holm([]) == []


def _wilcoxon_example():
    # 2 raters per item; per-item means of A and B and their differences:
    # i1 A (4,4)=4   B (3,4)=3.5  d = 0.5
    # i2 A (4,4)=4   B (3,3)=3    d = 1
    # i3 A (2,3)=2.5 B (4,4)=4    d = -1.5
    # i4 A (5,5)=5   B (3,3)=3    d = 2
    # i5 A (5,4)=4.5 B (2,2)=2    d = 2.5
    scores = {"A": [(4, 4), (4, 4), (2, 3), (5, 5), (5, 4)], "B": [(3, 4), (3, 3), (4, 4), (3, 3), (2, 2)]}
    return ratings((f"r{k}", f"i{i}", s, pair[k]) for s, per_item in scores.items()
                   for i, pair in enumerate(per_item, 1) for k in (0, 1))


def test_wilcoxon_exact_by_enumeration():
    # |d| ranks 1..5 (no ties); negative: rank 3 -> W- = 3, W+ = 12, statistic min = 3.
    # Null: each of 2^5 = 32 sign patterns equally likely; patterns with W+ <= 3 are the rank
    # subsets {}, {1}, {2}, {3}, {1,2}: 5. Two-sided p = 2 * 5/32 = 0.3125.
    row, = q.pairwise_table(_wilcoxon_example())
    assert (row["system_a"], row["system_b"], row["n_items"]) == ("A", "B", 5)
    assert row["mean_a"] == pytest.approx(4.0) and row["mean_b"] == pytest.approx(3.1)
    assert row["mean_difference"] == pytest.approx(0.9)  # (0.5 + 1 - 1.5 + 2 + 2.5) / 5
    assert row["statistic"] == 3.0
    assert row["p"] == pytest.approx(0.3125)
    assert row["p_holm"] == pytest.approx(0.3125)  # one pair: Holm changes nothing
    assert row["significant"] is False
    assert row["method"] == "exact"


def test_wilcoxon_ties_and_zero_by_enumeration():
    # d = 1, 1, -1, 2, 0: the zero is dropped; |d| 1,1,1,2 -> ranks 2,2,2,4; W+ = 8, W- = 2.
    # 16 sign patterns: W+ = 2k + 4j (k of the three 2s, j in {0,1}): counts of W+ >= 8:
    # k=2,j=1 (3) and k=3,j=1 (1) = 4; P(W+ <= 8) = 15/16. p = 2 * min(4/16, 15/16) = 0.5.
    a = [4, 4, 2, 5, 3]
    b = [3, 3, 3, 3, 3]
    data = ratings([("r", i, "A", x) for i, x in enumerate(a)] + [("r", i, "B", x) for i, x in enumerate(b)])
    row, = q.pairwise_table(data)
    assert row["p"] == pytest.approx(0.5)
    assert row["statistic"] == 2.0
    assert row["method"] == "permutation"
    assert "1 zero" in row["note"]


def test_wilcoxon_all_zero_differences_p_is_one():
    data = ratings([("r", i, s, 4) for i in range(4) for s in ("A", "B")])
    row, = q.pairwise_table(data)
    assert row["p"] == 1.0 and row["p_holm"] == 1.0 and row["significant"] is False
    assert row["mean_difference"] == 0.0
    assert "all per-item differences are zero" in row["note"]


def test_pairwise_uses_shared_items_and_holm_across_three_pairs():
    # C shares no item with A or B: those pairs have no test; Holm's m counts only the A-B pair.
    data = _wilcoxon_example() + ratings([("r0", "other", "C", 3)])
    rows = {(r["system_a"], r["system_b"]): r for r in q.pairwise_table(data, "SMOS")}
    assert set(rows) == {("A", "B"), ("A", "C"), ("B", "C")}
    assert rows[("A", "C")]["n_items"] == 0 and rows[("A", "C")]["p"] is None
    assert rows[("A", "C")]["p_holm"] is None and rows[("A", "C")]["significant"] is None
    assert "no items" in rows[("A", "C")]["note"]
    assert rows[("A", "B")]["p_holm"] == pytest.approx(0.3125)
    assert all(r["test"] == "SMOS" for r in rows.values())


# ---------------------------------------------------------------------------------------------
# A/B


def test_ab_sign_test_8_vs_2_with_3_ties_by_hand():
    # Exact two-sided binomial, n = 10 (ties excluded), k = 8, p = 1/2:
    # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * (1 + 10 + 45) / 1024 = 112/1024 = 0.109375
    rows = [(f"r{k}", f"i{k}", "A", "B", "A") for k in range(5)]
    rows += [(f"r{k}", f"i{k}", "B", "A", "A") for k in range(5, 8)]  # A on the other side
    rows += [(f"r{k}", f"i{k}", "A", "B", "B") for k in range(8, 10)]
    rows += [(f"r{k}", f"i{k}", "A", "B", None) for k in range(10, 12)]
    rows += [("r12", "i12", "B", "A", "")]  # empty string = no preference too
    row, = q.ab_table(ab(rows))
    assert (row["system_a"], row["system_b"]) == ("A", "B")
    assert (row["n_answers"], row["prefer_a"], row["prefer_b"], row["no_preference"]) == (13, 8, 2, 3)
    assert row["tie_rate"] == pytest.approx(3 / 13)
    assert row["prefer_a_rate"] == pytest.approx(0.8)
    assert row["p"] == pytest.approx(0.109375)
    assert row["p_holm"] == pytest.approx(0.109375)
    assert row["significant"] is False
    assert q.sign_test(8, 10) == pytest.approx(0.109375)


def test_ab_holm_over_pairs_and_all_ties_pair():
    # A-B: 6 vs 0 -> p = 2/64 = 0.03125; A-C: 5 vs 0 -> 2/32 = 0.0625; B-C: only ties -> no test.
    # Holm over the 2 defined: 0.03125 * 2 = 0.0625, 0.0625 * 1 = 0.0625 -> neither significant.
    rows = [(f"r{k}", "i", "A", "B", "A") for k in range(6)]
    rows += [(f"r{k}", "i", "C", "A", "A") for k in range(5)]
    rows += [(f"r{k}", "i", "B", "C", None) for k in range(4)]
    table = {(r["system_a"], r["system_b"]): r for r in q.ab_table(ab(rows))}
    assert table[("A", "B")]["p"] == pytest.approx(0.03125)
    assert table[("A", "C")]["p"] == pytest.approx(0.0625)
    assert table[("A", "B")]["p_holm"] == pytest.approx(0.0625)
    assert table[("A", "C")]["p_holm"] == pytest.approx(0.0625)
    assert table[("A", "B")]["significant"] is False
    ties = table[("B", "C")]
    assert (ties["tie_rate"], ties["prefer_a_rate"], ties["p"], ties["p_holm"]) == (1.0, None, None, None)
    assert "no answers excluding ties" in ties["note"]


def test_ab_reasons_counted_per_pair_and_choice():
    records = ab([("r1", "i1", "A", "B", "A"), ("r2", "i1", "B", "A", "A"), ("r3", "i2", "A", "B", None),
                  ("r4", "i2", "A", "B", "B"), ("r5", "i3", "A", "B", "A")])
    for record, reason in zip(records, ["natural", " natural ", "same", "", None]):
        record["reason"] = reason
    rows = q.ab_reasons_table(records)
    assert rows == [
        {"system_a": "A", "system_b": "B", "choice": "A", "reason": "natural", "n": 2},
        {"system_a": "A", "system_b": "B", "choice": "no preference", "reason": "same", "n": 1},
    ]


def test_ab_rejects_a_choice_outside_the_pair():
    with pytest.raises(ValueError, match="choice"):
        q.ab_table(ab([("r", "i", "A", "B", "C")]))


def test_ab_majority_agreement_leave_one_out_by_hand():
    # i1 (A,B): r1 A, r2 A, r3 A, r4 B.  r1..r3: others' majority A -> agree; r4: others A -> disagree.
    # i2 (A,B): r1 none, r2 B, r3 B.  r1: others B,B -> B, disagrees;
    #          r2: others none,B tie -> skipped; r3 likewise.
    # r1 1/2, r2 1/1, r3 1/1, r4 0/1.  r5 answered alone (i3): nothing compared.
    rows = [("r1", "i1", "A", "B", "A"), ("r2", "i1", "B", "A", "A"), ("r3", "i1", "A", "B", "A"),
            ("r4", "i1", "A", "B", "B"), ("r1", "i2", "A", "B", None), ("r2", "i2", "A", "B", "B"),
            ("r3", "i2", "A", "B", "B"), ("r5", "i3", "A", "B", "A")]
    got = q.ab_majority_agreement(ab(rows))
    assert {r: (v["compared"], v["agreed"]) for r, v in got.items()} == {
        "r1": (2, 1), "r2": (1, 1), "r3": (1, 1), "r4": (1, 0), "r5": (0, 0)}
    assert got["r1"]["agreement"] == 0.5 and got["r5"]["agreement"] is None
    table = {r["rater"]: r for r in q.rater_table(ab=ab(rows))}
    assert table["r1"]["ab_answers"] == 2 and table["r1"]["ab_no_preference"] == 1
    assert table["r4"]["ab_agreement"] == 0.0
    assert "no A/B answer comparable" in table["r5"]["note"]


# ---------------------------------------------------------------------------------------------
# Krippendorff's alpha


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
# values 1..5, missing = None. Published: nominal .743, ordinal .815, interval .849, ratio .797;
# 40 pairable values (unit 12 has one value and is not pairable).
KRIPPENDORFF_C = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}


def _reference_alpha(units, metric):
    """Independent route (plain Python, pairwise form of Krippendorff 2011, eqs. for D_o and D_e):
    alpha = 1 - D_o / D_e with D_o = 1/n * sum_u 1/(m_u - 1) * sum_{i != j in u} delta(v_i, v_j)
    and D_e = 1/(n (n - 1)) * sum_{i != j over all pairable values} delta(v_i, v_j)."""
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    n = len(values)
    freq = {v: values.count(v) for v in set(values)}

    def delta(c, k):
        if metric == "nominal":
            return float(c != k)
        if metric == "interval":
            return float(c - k) ** 2
        lo, hi = min(c, k), max(c, k)  # ordinal: (sum of n_g for c <= g <= k  -  (n_c + n_k)/2)^2
        return (sum(f for g, f in freq.items() if lo <= g <= hi) - (freq[c] + freq[k]) / 2) ** 2

    d_o = sum(sum(delta(u[i], u[j]) for i in range(len(u)) for j in range(len(u)) if i != j) / (len(u) - 1)
              for u in units) / n
    d_e = sum(delta(values[i], values[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return 1 - d_o / d_e


def test_reference_alpha_reproduces_krippendorff_2011_published_values():
    units = [[KRIPPENDORFF_C[o][u] for o in "ABCD" if KRIPPENDORFF_C[o][u] is not None] for u in range(12)]
    assert round(_reference_alpha(units, "nominal"), 3) == 0.743
    assert round(_reference_alpha(units, "interval"), 3) == 0.849
    assert round(_reference_alpha(units, "ordinal"), 3) == 0.815


def test_ordinal_alpha_krippendorff_2011_example():
    data = ratings((o, u, "sys", v) for o, vs in KRIPPENDORFF_C.items() for u, v in enumerate(vs) if v is not None)
    row = q.ordinal_alpha(data)
    assert row["alpha"] == pytest.approx(0.815, abs=5e-4)
    assert (row["n_raters"], row["n_units"], row["n_values"]) == (4, 11, 40)
    assert row["level"] == "ordinal" and row["note"] == ""


def test_ordinal_alpha_units_are_item_and_system():
    # Two raters agree on the order within each item but the same item id appears under two
    # systems: units (item, system) keep them apart. Perfect agreement -> alpha = 1.
    data = ratings([(r, i, s, x) for r in ("r1", "r2") for i, s, x in
                    [(0, "A", 5), (0, "B", 1), (1, "A", 4), (1, "B", 2)]])
    assert q.ordinal_alpha(data)["alpha"] == pytest.approx(1.0)


def test_ordinal_alpha_undefined_cases():
    one_rater = q.ordinal_alpha(ratings([("r", i, "A", 1 + i) for i in range(4)]))
    assert one_rater["alpha"] is None and "fewer than two raters" in one_rater["note"]
    disjoint = q.ordinal_alpha(ratings([("r1", 0, "A", 3), ("r2", 1, "A", 4)]))
    assert disjoint["alpha"] is None and "no unit" in disjoint["note"]
    same = q.ordinal_alpha(ratings([(r, i, "A", 4) for r in ("r1", "r2") for i in range(3)]))
    assert same["alpha"] is None and "identical" in same["note"]


# ---------------------------------------------------------------------------------------------
# Edge cases of the rating table


def test_one_answer_and_identical_scores():
    data = ratings([("r", "i", "solo", 4)] + [(f"r{k}", f"i{k % 2}", "flat", 3) for k in range(4)])
    rows = {r["system"]: r for r in q.rating_table(data)}
    solo = rows["solo"]
    assert (solo["n_answers"], solo["mean"], solo["sd"]) == (1, 4.0, None)
    assert (solo["t_low"], solo["t_high"], solo["boot_low"], solo["boot_high"]) == (None, None, None, None)
    assert "one answer" in solo["note"]
    flat = rows["flat"]
    assert (flat["t_low"], flat["t_high"], flat["boot_low"], flat["boot_high"]) == (3.0, 3.0, 3.0, 3.0)
    assert flat["sd"] == 0.0 and "identical" in flat["note"]


def test_rejects_scores_off_the_scale():
    with pytest.raises(ValueError, match="score"):
        q.rating_table(ratings([("r", "i", "A", 6)]))
    with pytest.raises(ValueError, match="score"):
        q.rating_table(ratings([("r", "i", "A", None)]))


def test_records_from_sqlite_rows_and_dataclasses():
    @dataclasses.dataclass
    class Answer:
        rater: str
        item: int
        system: str
        score: int

    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    db.execute("create table a (rater text, item int, system text, score int)")
    db.executemany("insert into a values (?, ?, ?, ?)", [("r1", 1, "A", 3), ("r2", 1, "A", 5)])
    from_db, = q.rating_table(db.execute("select * from a").fetchall())
    from_dc, = q.rating_table([Answer("r1", 1, "A", 3), Answer("r2", 1, "A", 5)])
    assert from_db["mean"] == from_dc["mean"] == 4.0
    assert from_db["n_raters"] == 2 and from_db["n_items"] == 1


# ---------------------------------------------------------------------------------------------
# The whole report and its export


def _report():
    mos = _wilcoxon_example() + ratings([("r9", "i1", "C", 3)])
    smos = ratings([("r0", "i1", "A", 4)])  # one rater: alpha undefined
    answers = ab([("r1", "i1", "A", "B", "A"), ("r2", "i1", "A", "B", None)])
    objective = [{"system": "A", "latency_s": 1.5, "rtf": 0.2}, {"system": "A", "latency_s": 2.5, "rtf": 0.4}]
    return q.qa_report(mos, smos, answers, objective, resamples=200)


def test_report_is_strict_json_with_all_tables():
    report = _report()
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    assert set(report["tables"]) == set(q.TABLE_COLUMNS)
    for name, rows in report["tables"].items():
        for row in rows:
            assert tuple(row) == q.TABLE_COLUMNS[name], name
    assert report["settings"]["bootstrap_resamples"] == 200
    assert {r["test"] for r in report["tables"]["ratings"]} == {"MOS", "SMOS"}
    alpha = {r["test"]: r for r in report["tables"]["agreement"]}
    assert alpha["SMOS"]["alpha"] is None and "fewer than two raters" in alpha["SMOS"]["note"]
    raters = {r["rater"]: r for r in report["tables"]["raters"]}
    assert raters["r0"]["mos_answers"] == 10 and raters["r0"]["smos_answers"] == 1


def test_empty_report():
    report = q.qa_report()
    assert all(rows == [] for rows in report["tables"].values())
    json.dumps(report, allow_nan=False)


def test_write_csv_one_file_per_table(tmp_path):
    paths = q.write_csv(_report(), tmp_path / "csv")
    assert sorted(p.name for p in paths) == sorted(f"{name}.csv" for name in q.TABLE_COLUMNS)
    with open(tmp_path / "csv" / "ratings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == q.TABLE_COLUMNS["ratings"]
    by_system = defaultdict(dict)
    for row in rows:
        by_system[row["test"]][row["system"]] = row
    assert float(by_system["MOS"]["A"]["mean"]) == pytest.approx(4.0)
    assert by_system["SMOS"]["A"]["t_low"] == ""  # None -> empty cell
    with open(tmp_path / "csv" / "ab.csv", newline="") as f:
        assert next(csv.DictReader(f))["prefer_a"] == "1"


def test_write_plot_png(tmp_path):
    path = q.write_plot(_report(), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = q.write_plot(q.qa_report(), tmp_path / "empty.png")
    assert empty.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))


def test_import_loads_neither_matplotlib_nor_torch():
    code = "import sys, studio.qa_stats; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
