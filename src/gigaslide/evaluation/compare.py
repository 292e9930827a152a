"""Paired comparisons of two evaluated models on the same test items: the one way gigaslide says "A beats B".

Two results are compared only on identical test items (tiles: the test set's fingerprint, names + labels +
content; slides: the same slide ids with the same labels), and the difference of each metric is bootstrapped
with one resample index for both (:func:`gigaslide.evaluation.metrics.paired_difference`; tiles: resampled within
each class, as their CIs are), never read off two overlapping CIs. ``evaluate tiles`` / ``evaluate finetune`` /
``evaluate slides --baseline`` and ``gigaslide benchmark`` write their comparisons through this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.evaluation.metrics import fmt_diff, paired_difference

#: metrics of a comparison table, in column order
COMPARE_METRICS = ("balanced_accuracy", "auc")

Diffs = dict[str, dict[str, dict[str, float]]]  # protocol -> metric -> paired_difference result


def compare_probs(labels: np.ndarray, probs: Mapping[str, np.ndarray], base_probs: Mapping[str, np.ndarray], *,
                  n_bootstrap: int = 1000, seed: int = 0, strata: np.ndarray | None = None,
                  metrics: Sequence[str] = COMPARE_METRICS, same_draws: bool = False) -> Diffs:
    """Each protocol both have (in ``probs``' order): metric -> paired difference ``probs - base_probs``. A protocol
    with several draws ([R, N, C]: few-shot label subsets) has its draws resampled too, since which labels were
    drawn moves the score as much as the test tiles do: with one index for both sides when ``same_draws`` (both
    drew the same subsets: the same training tiles and seed) and R agrees, else each side on its own."""
    def mode(p: str) -> str | None:
        a, b = np.ndim(probs[p]), np.ndim(base_probs[p])
        if a < 3 and b < 3:
            return None
        return "paired" if same_draws and np.shape(probs[p])[0] == np.shape(base_probs[p])[0] else "independent"

    return {p: {m: paired_difference(labels, probs[p], base_probs[p], m, n_bootstrap=n_bootstrap, seed=seed,
                                     strata=strata, draws=mode(p)) for m in metrics}
            for p in probs if p in base_probs}


def compare_reports(report: Mapping[str, Any], base: Mapping[str, Any], *, path: str | os.PathLike | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, fix_tiles: str = "compare results on the same --test tiles",
                    fix_protocols: str = "evaluate the baseline with the same protocols",
                    fix_train: str = "train both on the same tiles") -> Diffs:
    """``report`` minus ``base``, paired on the same test tiles, per protocol both have. Both are reports with
    ``test.fingerprint`` plus ``test_probs`` (protocol -> probabilities) and ``test_labels``; refused in one line
    (``path``: the baseline, for the message) when the test tiles differ, the training tiles differ (where both
    record them: ``train.fingerprint``), or no protocol is shared. The test tiles are
    resampled within each class (their CIs' bootstrap), so AUC is defined on every replicate."""
    check_same_tiles(report["test"].get("fingerprint"), base, path=path, fix=fix_tiles)
    if not np.array_equal(np.asarray(report["test_labels"]), np.asarray(base["test_labels"])):  # same fingerprint
        raise GigaslideError("the baseline's test labels differ from this result's", path=path, fix=fix_tiles)
    train_fp = (report.get("train") or {}).get("fingerprint")
    check_same_training(train_fp, base, path=path, fix=fix_train)
    same_draws = bool(train_fp) and train_fp == (base.get("train") or {}).get("fingerprint") and \
        report.get("seed") == base.get("seed") and report.get("fewshot_draws") == base.get("fewshot_draws")
    labels = np.asarray(report["test_labels"])
    diffs = compare_probs(labels, report["test_probs"], base["test_probs"], n_bootstrap=n_bootstrap,
                          seed=seed, same_draws=same_draws, strata=labels)
    if not diffs:
        raise GigaslideError(f"no protocol in common (baseline: {', '.join(base['test_probs'])})", path=path,
                             fix=fix_protocols)
    return diffs


def check_same_tiles(fingerprint: str | None, base: Mapping[str, Any], *, path: str | os.PathLike | None = None,
                     fix: str = "compare results on the same --test tiles") -> None:
    """Refuse, in one line, a baseline (a report) not tested on the tiles ``fingerprint`` names; callers check
    before any work, and :func:`compare_reports` again."""
    base_fp = base["test"].get("fingerprint")
    if not fingerprint or fingerprint != base_fp:
        what = ("tested on other tiles than this result" if fingerprint and base_fp
                else "no record of which tiles were tested")
        raise GigaslideError(f"{what} (baseline: {base['test'].get('path')}, n={base['test'].get('n')})",
                             path=path, fix=fix)


def check_same_training(fingerprint: str | None, base: Mapping[str, Any], *, path: str | os.PathLike | None = None,
                        fix: str = "train both on the same tiles") -> None:
    """Refuse, in one line, a baseline whose probes were trained on other tiles than ``fingerprint`` names (both
    recorded): the two would differ in their training labels as well as their encoders."""
    base_fp = (base.get("train") or {}).get("fingerprint")
    if fingerprint and base_fp and fingerprint != base_fp:
        raise GigaslideError(f"trained on other tiles than this result (baseline: {base['train'].get('path')}, "
                             f"n={base['train'].get('n')})", path=path, fix=fix)


def comparison_markdown(diffs: Diffs, baseline: str, items: str = "test tiles") -> str:
    """A table of paired differences (this minus ``baseline``) per protocol, with 95 % CI and p."""
    lines = [f"## Paired vs `{baseline}` (same {items}; paired bootstrap, 95 % CI, two-sided p)", "",
             *([f"Rows with several draws (few-shot label subsets) resample the draws too ({_draw_modes(diffs)}).", ""]
               if _draw_modes(diffs) else []),
             *([f"Resampled: patients, each with all its slides ({_patients(diffs)} patients).", ""]
               if _patients(diffs) else []),
             "| protocol | " + " | ".join(f"Δ {_label(m)}" for m in COMPARE_METRICS)
             + f" | verdict (Δ {_label(COMPARE_METRICS[0])}) |",
             "|---|" + "---|" * (len(COMPARE_METRICS) + 1)]
    for p, d in diffs.items():
        cells = [fmt_diff(d[m]) for m in COMPARE_METRICS if m in d]
        lines.append(f"| {p} | {' | '.join(cells)} | {verdict(d[COMPARE_METRICS[0]])} |")
    return "\n".join(lines) + "\n"


def _patients(diffs: Diffs) -> int | None:
    """The number of patients a comparison resampled (cluster bootstrap), or None where it resampled items."""
    n = [d.get("n_patients") for row in diffs.values() for d in row.values() if d.get("resampled") == "patients"]
    return n[0] if n else None


def _draw_modes(diffs: Diffs) -> str:
    modes = sorted({d.get("draws", "fixed") for row in diffs.values() for d in row.values()} - {"fixed"})
    words = {"paired": "the same draws on both sides", "independent": "each side's draws on their own"}
    return "; ".join(words[m] for m in modes)


def verdict(d: Mapping[str, float]) -> str:
    """``better`` / ``worse`` when the paired 95 % CI excludes 0, else ``not distinguishable``."""
    if d["ci_low"] > 0:
        return "better"
    if d["ci_high"] < 0:
        return "worse"
    return "not distinguishable"


def tally(verdicts: Sequence[str]) -> str:
    """``["better", "better", "worse"]`` -> ``better 2, worse 1`` (in the order better, not distinguishable, worse)."""
    return ", ".join(f"{w} {verdicts.count(w)}" for w in ("better", "not distinguishable", "worse") if w in verdicts)


def _label(metric: str) -> str:
    return {"balanced_accuracy": "balanced acc", "auc": "AUC"}.get(metric, metric)


__all__ = ["COMPARE_METRICS", "check_same_tiles", "check_same_training", "compare_probs", "compare_reports",
           "comparison_markdown", "tally",
           "verdict"]
