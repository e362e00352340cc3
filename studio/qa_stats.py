"""Statistics of QA listening tests: MOS/SMOS with intervals, pairwise tests, A/B preferences,
rater consistency, and their export (JSON dict, CSV files, a PNG plot).

Pure functions over plain records; nothing here touches the database, the page or torch. A record
is a mapping (dict, `sqlite3.Row`) or an object with attributes (dataclass, named tuple).

Record formats
--------------
rating answer (MOS and SMOS are passed as separate lists):
    {"rater": ..., "item": ..., "system": ..., "score": 1..5}
    `item` is the test item (a test-set row id); `rater`, `item`, `system` are any hashable ids.
A/B answer:
    {"rater": ..., "item": ..., "system_a": ..., "system_b": ..., "choice": ..., "reason": ...}
    `choice` is the preferred system's name (one of the two), or None / "" for no preference;
    `reason` is optional (free text or a category); counted per pair and choice. Which side a
    system was played on does not matter: (x, y) and (y, x) are the same pair.
objective measurement:
    {"system": ..., "latency_s": 1.2, "rtf": 0.3, "wer": ...}  any numeric fields; None/NaN skipped.

Methods and references
----------------------
* MOS with a 95 % t-interval over answers (Student's t, answers taken as independent) and a
  two-way bootstrap percentile interval that resamples raters and items together (each resample
  draws raters with replacement and items with replacement and keeps the scores at their
  crossings, weighted by how often each was drawn), which accounts for both sources of variation
  in a listening test (ITU-T P.800.2 asks for a MOS to be reported with its interval);
  Efron & Tibshirani, "An Introduction to the Bootstrap" (1993) ch. 13 (percentile interval); two-way (crossed)
  resampling as in Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2), 2007.
* Pairwise systems: Wilcoxon signed-rank test on per-item mean scores over the items both
  systems have (scipy.stats.wilcoxon), Holm's step-down correction across the pairs of one test
  (Holm, Scand. J. Statist. 6, 1979), written here (`holm`) rather than adding statsmodels.
* A/B: exact two-sided binomial sign test of the preferences excluding ties
  (scipy.stats.binomtest, p = 0.5), Holm across pairs.
* Rater consistency: Krippendorff's alpha, ordinal metric, units = (item, system), values = all
  answers to a unit (Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011), computed
  by the `krippendorff` package; A/B raters' agreement with the leave-one-out per-unit majority.

Undefined statistics are None (never NaN, so the report is strict JSON) with a `note` saying why.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import krippendorff
import numpy as np
from scipy import stats

#: Two-sided confidence level of every interval.
CONFIDENCE = 0.95
#: Family-wise error rate for "significant" (after Holm's correction).
SIGNIFICANCE = 0.05
#: Bootstrap resamples: percentile intervals need about 1000 or more (Efron & Tibshirani ch. 19);
#: 2000 takes a few milliseconds per system here (matrix products, no Python loop).
BOOTSTRAP_RESAMPLES = 2000
#: Fixed seed so that the same answers always give the same interval.
BOOTSTRAP_SEED = 20261206
#: Rating scale of MOS and SMOS (absolute category rating, ITU-T P.800).
SCORE_MIN, SCORE_MAX = 1.0, 5.0
#: scipy's Wilcoxon permutation test enumerates all 2**n sign patterns when 2**n is at most its
#: default 9999 resamples, i.e. n <= 13: an exact p-value even with tied or zero differences.
WILCOXON_ENUMERATE_MAX_N = 13
#: Above this, scipy's exact null distribution is replaced by its normal approximation (as 'auto').
WILCOXON_EXACT_MAX_N = 50
#: Per-item means are rounded before ranking so that 1/3 - 1/3 style float noise does not break ties.
DIFFERENCE_DECIMALS = 9
#: Fields of objective records that are identifiers, never statistics.
ID_FIELDS = frozenset({"system", "item", "rater", "id", "row_id", "run_id", "test_id", "session_id"})
RATING_TESTS = ("MOS", "SMOS")
NO_PREFERENCE = "no preference"

#: Column order of each exported table (so empty tables still get a CSV header).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "ratings": ("test", "system", "n_answers", "n_raters", "n_items", "mean", "sd", "t_low", "t_high",
                "boot_low", "boot_high", "boot_resamples", "note"),
    "rating_pairs": ("test", "system_a", "system_b", "n_items", "mean_a", "mean_b", "mean_difference",
                     "statistic", "p", "p_holm", "significant", "method", "note"),
    "ab": ("system_a", "system_b", "n_answers", "n_raters", "n_items", "prefer_a", "prefer_b", "no_preference",
           "tie_rate", "prefer_a_rate", "p", "p_holm", "significant", "note"),
    "ab_reasons": ("system_a", "system_b", "choice", "reason", "n"),
    "agreement": ("test", "alpha", "level", "n_raters", "n_units", "n_values", "note"),
    "raters": ("rater", "mos_answers", "mos_items", "mos_mean", "smos_answers", "smos_items", "smos_mean",
               "ab_answers", "ab_no_preference", "ab_compared", "ab_agreement", "note"),
    "objective": ("system", "field", "n", "mean", "sd", "t_low", "t_high", "note"),
}


class Rating(NamedTuple):
    rater: Any
    item: Any
    system: Any
    score: float


class ABAnswer(NamedTuple):
    rater: Any
    item: Any
    pair: tuple[Any, Any]  # the two systems in a fixed (sorted) order
    choice: Any  # one of `pair`, or None for no preference
    reason: str | None = None  # free text or a category from the page; None when not given


# ---------------------------------------------------------------------------------------------
# Records


_MISSING = object()


def _as_dict(record: Any) -> dict:
    """A record's fields as a dict: mappings, `sqlite3.Row` (has keys()), dataclasses, objects."""
    if isinstance(record, Mapping):
        return dict(record)
    if hasattr(record, "keys"):
        return {k: record[k] for k in record.keys()}
    if is_dataclass(record) and not isinstance(record, type):
        return asdict(record)
    if hasattr(record, "_asdict"):
        return record._asdict()
    return dict(vars(record))


def _field(record: dict, name: str, default: Any = _MISSING) -> Any:
    if name in record:
        return record[name]
    if default is _MISSING:
        raise ValueError(f"record has no field {name!r}: {record!r}")
    return default


def _sort_key(value: Any) -> tuple[str, str]:
    # ids may mix types (int row ids, str names); order by type name then text for a stable order
    return (type(value).__name__, str(value))


def _number(value: Any) -> float | None:
    """A finite float, or None for None / NaN / non-numbers (bool is not a number here)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_ratings(answers: Iterable[Any]) -> list[Rating]:
    """Rating records -> `Rating` tuples; raises ValueError on a missing field or a score off 1..5."""
    out = []
    for record in answers:
        r = _as_dict(record)
        score = _number(_field(r, "score"))
        if score is None or not SCORE_MIN <= score <= SCORE_MAX:
            raise ValueError(f"score must be a number in {SCORE_MIN:g}..{SCORE_MAX:g}: {r!r}")
        out.append(Rating(_field(r, "rater"), _field(r, "item"), _field(r, "system"), score))
    return out


def parse_ab(answers: Iterable[Any]) -> list[ABAnswer]:
    """A/B records -> `ABAnswer` tuples with the pair in sorted order; None or "" choice = no preference."""
    out = []
    for record in answers:
        r = _as_dict(record)
        a, b = _field(r, "system_a"), _field(r, "system_b")
        if a == b:
            raise ValueError(f"an A/B answer needs two different systems: {r!r}")
        choice = _field(r, "choice", None)
        if choice == "":
            choice = None
        if choice is not None and choice not in (a, b):
            raise ValueError(f"choice must be system_a, system_b or None: {r!r}")
        pair = tuple(sorted((a, b), key=_sort_key))
        reason = _field(r, "reason", None)
        reason = None if reason is None else (str(reason).strip() or None)  # blank = not given
        out.append(ABAnswer(_field(r, "rater"), _field(r, "item"), pair, choice, reason))
    return out


# ---------------------------------------------------------------------------------------------
# Building blocks (each usable on its own)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student's t interval of the mean: mean +- t_{(1+c)/2, n-1} * s / sqrt(n).

    None for fewer than 2 values (no variance). All-equal values give a zero-width interval (the
    textbook formula, not scipy.stats.t.interval, which is NaN for a zero scale).
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    mean = float(x.mean())
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean - half, mean + half


def bootstrap_two_way_ci(
    ratings: Sequence[Rating],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[tuple[float, float] | None, int]:
    """Percentile interval of the mean score by a two-way bootstrap over raters and items.

    Each resample draws the raters (R of them) with replacement and the items (I) with
    replacement, independently; a score of rater r on item i then counts a_r * b_i times, where
    a_r, b_i are how often each was drawn (multinomial counts = draws with replacement), so the
    resampled mean is (a^T S b) / (a^T C b) with S, C the rater x item sums and counts of scores.
    Resamples in which no drawn rater scored a drawn item (possible in sparse designs) are
    dropped. Returns ((low, high) or None, resamples used); None when fewer than 2 answers.
    """
    if len(ratings) < 2:
        return None, 0
    # sorted ids, so that the same answers in another order (e.g. from a database) draw the same
    raters = {r: k for k, r in enumerate(sorted({x.rater for x in ratings}, key=_sort_key))}
    items = {i: k for k, i in enumerate(sorted({x.item for x in ratings}, key=_sort_key))}
    sums = np.zeros((len(raters), len(items)))
    counts = np.zeros_like(sums)
    rows = [raters[x.rater] for x in ratings]
    cols = [items[x.item] for x in ratings]
    np.add.at(sums, (rows, cols), [x.score for x in ratings])
    np.add.at(counts, (rows, cols), 1.0)
    rng = np.random.default_rng(seed)
    a = rng.multinomial(len(raters), np.full(len(raters), 1 / len(raters)), size=resamples).astype(float)
    b = rng.multinomial(len(items), np.full(len(items), 1 / len(items)), size=resamples).astype(float)
    num = ((a @ sums) * b).sum(axis=1)
    den = ((a @ counts) * b).sum(axis=1)
    means = num[den > 0] / den[den > 0]
    if means.size == 0:
        return None, 0
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])  # numpy's default (linear) quantile
    return (float(low), float(high)), int(means.size)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979); None entries stay None and are not counted.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(k) = max_{j<=k} min(1, (m - j + 1) p_(j)).
    Written here (five lines) rather than depending on statsmodels' multipletests(method="holm").
    """
    defined = [k for k, p in enumerate(p_values) if p is not None]
    m = len(defined)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, k in enumerate(sorted(defined, key=lambda k: p_values[k])):
        running = max(running, min(1.0, (m - rank) * p_values[k]))  # max keeps the order monotone
        adjusted[k] = running
    return adjusted


def wilcoxon_signed_rank(differences: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired differences (scipy.stats.wilcoxon).

    Zero differences are dropped (zero_method="wilcox", Wilcoxon's original). The method is
    chosen here and reported: "exact" null distribution without ties or zeros (n <= 50);
    "permutation" (all 2**n sign patterns enumerated: exact, n <= 13) with ties or zeros;
    "normal" approximation (tie-corrected variance, continuity correction) otherwise.
    All-zero differences: the test is undefined; p = 1 (no evidence of any difference) and a note.
    Returns {"statistic" (min(W+, W-)), "p", "method", "note"}.
    """
    d = np.round(np.asarray(differences, dtype=float), DIFFERENCE_DECIMALS)
    if d.size == 0:
        return {"statistic": None, "p": None, "method": None, "note": "no items rated for both systems"}
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return {"statistic": 0.0, "p": 1.0, "method": None,
                "note": "all per-item differences are zero: test undefined, p set to 1"}
    has_ties = np.unique(np.abs(nonzero)).size < nonzero.size
    if not has_ties and nonzero.size == d.size and d.size <= WILCOXON_EXACT_MAX_N:
        method, scipy_method = "exact", "exact"
    elif d.size <= WILCOXON_ENUMERATE_MAX_N:
        method, scipy_method = "permutation", stats.PermutationMethod()
    else:
        method, scipy_method = "normal", "asymptotic"
    res = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method=scipy_method)
    note = f"{d.size - nonzero.size} zero differences dropped" if nonzero.size < d.size else ""
    return {"statistic": float(res.statistic), "p": float(min(1.0, res.pvalue)), "method": method, "note": note}


def sign_test(successes: int, trials: int) -> float | None:
    """Exact two-sided binomial (sign) test against 1/2 (scipy.stats.binomtest); None for 0 trials."""
    if trials == 0:
        return None
    return float(stats.binomtest(successes, trials, 0.5, alternative="two-sided").pvalue)


# ---------------------------------------------------------------------------------------------
# Tables


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _sd(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def rating_table(
    answers: Iterable[Any],
    test: str = "MOS",
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> list[dict]:
    """One row per system: n answers/raters/items, mean, sd, t-interval and two-way bootstrap interval.

    Every system is resampled from the same `seed`, so its interval does not depend on which
    other systems are in the test. One answer: sd and both intervals None, with a note.
    """
    by_system: dict[Any, list[Rating]] = defaultdict(list)
    for x in parse_ratings(answers):
        by_system[x.system].append(x)
    rows = []
    for system in sorted(by_system, key=_sort_key):
        ratings = by_system[system]
        scores = [x.score for x in ratings]
        t_ci = t_interval(scores, confidence)
        boot_ci, used = bootstrap_two_way_ci(ratings, resamples, seed, confidence)
        notes = []
        if len(scores) < 2:
            notes.append("one answer: no interval")
        elif len(set(scores)) == 1:
            notes.append("all scores identical: zero-width intervals")
        elif boot_ci is None:
            notes.append("no bootstrap resample had a score")
        elif used < resamples:
            notes.append(f"{resamples - used} bootstrap resamples had no score and were dropped")
        rows.append({
            "test": test, "system": system, "n_answers": len(scores),
            "n_raters": len({x.rater for x in ratings}), "n_items": len({x.item for x in ratings}),
            "mean": _mean(scores), "sd": _sd(scores),
            "t_low": t_ci[0] if t_ci else None, "t_high": t_ci[1] if t_ci else None,
            "boot_low": boot_ci[0] if boot_ci else None, "boot_high": boot_ci[1] if boot_ci else None,
            "boot_resamples": used, "note": "; ".join(notes),
        })
    return rows


def per_item_means(ratings: Iterable[Rating]) -> dict[Any, dict[Any, float]]:
    """{system: {item: mean score over that item's answers}}."""
    grouped: dict[Any, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for x in ratings:
        grouped[x.system][x.item].append(x.score)
    return {s: {i: float(np.mean(v)) for i, v in items.items()} for s, items in grouped.items()}


def pairwise_table(answers: Iterable[Any], test: str = "MOS", *, significance: float = SIGNIFICANCE) -> list[dict]:
    """Every pair of systems: Wilcoxon signed-rank on per-item means over shared items, Holm across pairs.

    `mean_difference` = mean over the shared items of (system_a's item mean - system_b's);
    systems are ordered by name, so system_a sorts first. `significant` uses the Holm-adjusted p.
    """
    means = per_item_means(parse_ratings(answers))
    rows = []
    for a, b in itertools.combinations(sorted(means, key=_sort_key), 2):
        shared = sorted(means[a].keys() & means[b].keys(), key=_sort_key)
        xa = [means[a][i] for i in shared]
        xb = [means[b][i] for i in shared]
        test_result = wilcoxon_signed_rank(np.subtract(xa, xb))
        rows.append({
            "test": test, "system_a": a, "system_b": b, "n_items": len(shared),
            "mean_a": _mean(xa), "mean_b": _mean(xb),
            "mean_difference": _mean(np.subtract(xa, xb)) if shared else None,
            "statistic": test_result["statistic"], "p": test_result["p"], "p_holm": None,
            "significant": None, "method": test_result["method"], "note": test_result["note"],
        })
    _add_holm(rows, significance)
    return rows


def _add_holm(rows: list[dict], significance: float) -> None:
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row["p_holm"] = adjusted
        row["significant"] = None if adjusted is None else bool(adjusted < significance)


def ab_table(answers: Iterable[Any], *, significance: float = SIGNIFICANCE) -> list[dict]:
    """Per pair: preferences for each side, no-preference answers, rates, sign test, Holm over pairs.

    The pair is ordered by name (system_a sorts first), whichever side each was played on.
    `tie_rate` = no_preference / n_answers; `prefer_a_rate` = prefer_a / (prefer_a + prefer_b),
    ties excluded; p = exact two-sided binomial test of prefer_a out of prefer_a + prefer_b.
    Answers are taken as independent trials (the usual A/B analysis), although one rater answers
    many items: with few raters, read p alongside the raters table.
    """
    by_pair: dict[tuple, list[ABAnswer]] = defaultdict(list)
    for x in parse_ab(answers):
        by_pair[x.pair].append(x)
    rows = []
    for pair in sorted(by_pair, key=lambda p: (_sort_key(p[0]), _sort_key(p[1]))):
        xs = by_pair[pair]
        votes = Counter(x.choice for x in xs)
        prefer_a, prefer_b, ties = votes[pair[0]], votes[pair[1]], votes[None]
        decided = prefer_a + prefer_b
        rows.append({
            "system_a": pair[0], "system_b": pair[1], "n_answers": len(xs),
            "n_raters": len({x.rater for x in xs}), "n_items": len({x.item for x in xs}),
            "prefer_a": prefer_a, "prefer_b": prefer_b, "no_preference": ties,
            "tie_rate": ties / len(xs), "prefer_a_rate": prefer_a / decided if decided else None,
            "p": sign_test(prefer_a, decided), "p_holm": None, "significant": None,
            "note": "" if decided else "no answers excluding ties: no preference rate or test",
        })
    _add_holm(rows, significance)
    return rows


def ab_reasons_table(answers: Iterable[Any]) -> list[dict]:
    """How often each reason was given, per pair and choice (choice "no preference" for ties).

    Answers without a reason are not counted; reasons are compared as given (stripped text).
    """
    counts = Counter(
        (x.pair, NO_PREFERENCE if x.choice is None else x.choice, x.reason)
        for x in parse_ab(answers) if x.reason is not None)
    rows = [{"system_a": pair[0], "system_b": pair[1], "choice": choice, "reason": reason, "n": n}
            for (pair, choice, reason), n in counts.items()]
    # by pair, then most frequent reason first
    return sorted(rows, key=lambda r: (_sort_key(r["system_a"]), _sort_key(r["system_b"]), -r["n"],
                                       _sort_key(r["choice"]), r["reason"]))


def ordinal_alpha(answers: Iterable[Any], test: str = "MOS") -> dict:
    """Krippendorff's alpha, ordinal metric, for one rating test.

    Units are (item, system) pairs, coders are raters, and every answer to a unit is one value
    (alpha's coincidence matrix does not use coder identity, so a rater answering a unit twice
    adds two values). Units with a single value are not pairable and are left out (as in
    Krippendorff 2011). Computed by `krippendorff.alpha(value_counts=..., level_of_measurement=
    "ordinal")` over the observed scores (unobserved scale points do not change ordinal alpha).
    Undefined (None, with a note): fewer than two raters, no unit with two values, or all values
    equal (expected disagreement is zero: 0/0).
    """
    ratings = parse_ratings(answers)
    raters = {x.rater for x in ratings}
    units: dict[tuple, list[float]] = defaultdict(list)
    for x in ratings:
        units[(x.item, x.system)].append(x.score)
    pairable = [v for v in units.values() if len(v) >= 2]
    row = {"test": test, "alpha": None, "level": "ordinal", "n_raters": len(raters),
           "n_units": len(pairable), "n_values": sum(len(v) for v in pairable), "note": ""}
    if len(raters) < 2:
        row["note"] = "fewer than two raters: alpha undefined"
    elif not pairable:
        row["note"] = "no unit (item, system) rated twice: alpha undefined"
    else:
        domain = sorted({s for v in pairable for s in v})
        if len(domain) < 2:
            row["note"] = "all paired scores identical: no variation, alpha undefined"
        else:
            index = {s: k for k, s in enumerate(domain)}
            value_counts = np.zeros((len(pairable), len(domain)))
            for u, values in enumerate(pairable):
                for s in values:
                    value_counts[u, index[s]] += 1
            row["alpha"] = float(krippendorff.alpha(
                value_counts=value_counts, value_domain=domain, level_of_measurement="ordinal"))
    return row


def ab_majority_agreement(answers: Iterable[Any]) -> dict[Any, dict]:
    """Each rater's agreement with the leave-one-out majority of the other raters, per A/B unit.

    A unit is (item, pair). An answer is one of three labels: either system or no preference.
    For each of a rater's answers, the other raters' answers to the same unit (all answers by
    this rater excluded) are counted; the answer agrees when it equals their single most frequent
    label. Units where no other rater answered, or where the others' top label is tied, are not
    compared. Returns {rater: {"compared", "agreed", "agreement" (None if nothing compared)}}.
    """
    return _majority_agreement(parse_ab(answers))


def _majority_agreement(xs: list[ABAnswer]) -> dict[Any, dict]:
    by_unit: dict[tuple, list[ABAnswer]] = defaultdict(list)
    for x in xs:
        by_unit[(x.item, x.pair)].append(x)
    out: dict[Any, dict] = {x.rater: {"compared": 0, "agreed": 0, "agreement": None} for x in xs}
    for unit_answers in by_unit.values():
        for x in unit_answers:
            others = Counter(y.choice for y in unit_answers if y.rater != x.rater).most_common(2)
            if not others or (len(others) == 2 and others[0][1] == others[1][1]):
                continue
            out[x.rater]["compared"] += 1
            out[x.rater]["agreed"] += int(x.choice == others[0][0])
    for counts in out.values():
        if counts["compared"]:
            counts["agreement"] = counts["agreed"] / counts["compared"]
    return out


def rater_table(mos: Iterable[Any] = (), smos: Iterable[Any] = (), ab: Iterable[Any] = ()) -> list[dict]:
    """One row per rater: answers, items and mean score per rating test; A/B answers, no-preference
    answers and agreement with the others' majority (`ab_majority_agreement`)."""
    tests = {"mos": parse_ratings(mos), "smos": parse_ratings(smos)}
    ab_answers = parse_ab(ab)
    agreement = _majority_agreement(ab_answers)
    raters = {x.rater for ratings in tests.values() for x in ratings} | {x.rater for x in ab_answers}
    rows = []
    for rater in sorted(raters, key=_sort_key):
        row: dict[str, Any] = {"rater": rater}
        for name, ratings in tests.items():
            mine = [x for x in ratings if x.rater == rater]
            row[f"{name}_answers"] = len(mine)
            row[f"{name}_items"] = len({x.item for x in mine})
            row[f"{name}_mean"] = _mean([x.score for x in mine])
        mine_ab = [x for x in ab_answers if x.rater == rater]
        row["ab_answers"] = len(mine_ab)
        row["ab_no_preference"] = sum(x.choice is None for x in mine_ab)
        agree = agreement.get(rater, {"compared": 0, "agreement": None})
        row["ab_compared"] = agree["compared"]
        row["ab_agreement"] = agree["agreement"]
        lonely = mine_ab and not agree["compared"]
        row["note"] = "no A/B answer comparable with other raters' majority" if lonely else ""
        rows.append(row)
    return rows


def objective_table(
    records: Iterable[Any], fields: Sequence[str] | None = None, *, confidence: float = CONFIDENCE
) -> list[dict]:
    """Mean, sd and t-interval of each numeric field per system, where the system has values.

    `fields` None: every field with a numeric value in some record, except identifiers
    (`ID_FIELDS` and names ending in "_id"). None, NaN and non-numeric values are skipped.
    """
    values: dict[tuple, list[float]] = defaultdict(list)
    found: dict[str, None] = {}
    for record in records:
        r = _as_dict(record)
        system = _field(r, "system")
        names = fields if fields is not None else [
            k for k in r if k not in ID_FIELDS and not str(k).endswith("_id")]
        for name in names:
            x = _number(r.get(name))
            if x is not None:
                values[(system, name)].append(x)
                found.setdefault(name, None)
    order = list(fields) if fields is not None else list(found)
    rows = []
    for system, name in sorted(values, key=lambda k: (_sort_key(k[0]), order.index(k[1]))):
        xs = values[(system, name)]
        ci = t_interval(xs, confidence)
        rows.append({"system": system, "field": name, "n": len(xs), "mean": _mean(xs), "sd": _sd(xs),
                     "t_low": ci[0] if ci else None, "t_high": ci[1] if ci else None,
                     "note": "" if ci else "one value: no interval"})
    return rows


# ---------------------------------------------------------------------------------------------
# The whole report and its export


def qa_report(
    mos: Iterable[Any] = (),
    smos: Iterable[Any] = (),
    ab: Iterable[Any] = (),
    objective: Iterable[Any] = (),
    *,
    objective_fields: Sequence[str] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    significance: float = SIGNIFICANCE,
) -> dict:
    """All tables of a listening test as a JSON-serialisable dict (strict JSON: no NaN).

    {"settings": {...}, "methods": {...}, "tables": {name: [row dict, ...]}} with the tables of
    `TABLE_COLUMNS`: ratings (MOS and SMOS rows, column `test`), rating_pairs, ab, ab_reasons, agreement
    (alpha per rating test), raters, objective. Undefined values are None, with a `note`.
    """
    mos, smos, ab, objective = list(mos), list(smos), list(ab), list(objective)
    rating_inputs = {"MOS": mos, "SMOS": smos}
    tables: dict[str, list[dict]] = {name: [] for name in TABLE_COLUMNS}
    for test, answers in rating_inputs.items():
        if not answers:
            continue
        tables["ratings"] += rating_table(answers, test, resamples=resamples, seed=seed, confidence=confidence)
        tables["rating_pairs"] += pairwise_table(answers, test, significance=significance)
        tables["agreement"].append(ordinal_alpha(answers, test))
    tables["ab"] = ab_table(ab, significance=significance)
    tables["ab_reasons"] = ab_reasons_table(ab)
    tables["raters"] = rater_table(mos, smos, ab)
    tables["objective"] = objective_table(objective, objective_fields, confidence=confidence)
    return {
        "settings": {"confidence": confidence, "significance": significance,
                     "bootstrap_resamples": resamples, "bootstrap_seed": seed,
                     "score_range": [SCORE_MIN, SCORE_MAX]},
        "methods": {
            "t_interval": "Student t over answers (answers taken as independent)",
            "bootstrap": "two-way percentile bootstrap: raters and items drawn with replacement, "
                         "scores at their crossings kept",
            "rating_pairs": "Wilcoxon signed-rank on per-item means over shared items (zeros dropped), "
                            "Holm across pairs of one test",
            "ab": "exact two-sided binomial sign test excluding no-preference answers, Holm across pairs",
            "agreement": "Krippendorff's alpha, ordinal, units (item, system), coders raters",
            "ab_agreement": "agreement with the majority of the other raters per (item, pair), "
                            "rater excluded; units with no others or a tied majority skipped",
        },
        "tables": {name: [_plain_row(row) for row in rows] for name, rows in tables.items()},
    }


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (strict JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain_row(row: dict) -> dict:
    return {k: _plain(v) for k, v in row.items()}


def write_csv(report: dict, directory: str | os.PathLike) -> list[Path]:
    """One CSV file per table (`<table>.csv`, columns in `TABLE_COLUMNS` order) under `directory`.

    One file per table rather than one long-format file: each opens directly as a spreadsheet
    with its own columns. None is written as an empty cell. Returns the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, columns in TABLE_COLUMNS.items():
        path = directory / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in report["tables"].get(name, []):
                writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
        paths.append(path)
    return paths


#: Colours of the A/B stacked bars: first system, no preference, second system.
AB_COLOURS = ("#2563eb", "#d1d5db", "#f97316")


def write_plot(report: dict, path: str | os.PathLike) -> Path:
    """PNG: mean score per system with bootstrap-interval error bars (one panel each for MOS and
    SMOS) and A/B preferences as stacked bars (share of answers per pair). Drawn with matplotlib's
    object API on the Agg canvas (imported here, so importing this module does not load it);
    written atomically. Panels without data are left out; with no data at all it says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratings = report["tables"].get("ratings", [])
    ab = report["tables"].get("ab", [])
    tests = [t for t in RATING_TESTS if any(r["test"] == t for r in ratings)]
    panels = len(tests) + (1 if ab else 0)
    fig = Figure(figsize=(5 * max(1, panels), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0] if panels else []
    for ax, test in zip(axes, tests):
        rows = [r for r in ratings if r["test"] == test]
        x = np.arange(len(rows))
        means = [r["mean"] for r in rows]
        # rows without an interval get a zero error bar rather than disappearing
        lower = [r["mean"] - r["boot_low"] if r["boot_low"] is not None else 0 for r in rows]
        upper = [r["boot_high"] - r["mean"] if r["boot_high"] is not None else 0 for r in rows]
        ax.errorbar(x, means, yerr=[lower, upper], fmt="o", capsize=4, color="#2563eb")
        ax.set_xticks(x, [str(r["system"]) for r in rows], rotation=20)
        ax.set_ylim(SCORE_MIN - 0.2, SCORE_MAX + 0.2)
        ax.set_ylabel(f"{test} ({report['settings']['confidence']:.0%} bootstrap CI)")
        ax.grid(axis="y", alpha=0.3)
    if ab:
        ax = axes[-1]
        y = np.arange(len(ab))
        left = np.zeros(len(ab))
        for key, colour, label in zip(("prefer_a", "no_preference", "prefer_b"), AB_COLOURS,
                                      ("first preferred", NO_PREFERENCE, "second preferred")):
            share = np.array([r[key] / r["n_answers"] for r in ab])
            ax.barh(y, share, left=left, color=colour, label=label)
            left += share
        ax.set_yticks(y, [f"{r['system_a']} vs {r['system_b']}" for r in ab])
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of A/B answers")
        # above the axes, so it never hides a bar
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize="small", frameon=False)
    if not panels:
        fig.text(0.5, 0.5, "no listening-test answers", ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path
