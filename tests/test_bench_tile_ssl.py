"""benchmarks/bench_tile_ssl.py (and bench_tile_finetune.py's verdicts): option variants are read as typed
``pretrain`` options, and the verdicts of a budget curve / a variant come from the paired rows (which budget first
meets the goal, better / worse / not distinguishable from the row compared with)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_tile_ssl  # noqa: E402


def test_variants_are_typed_options() -> None:
    assert bench_tile_ssl.parse_variant("") == {}
    assert bench_tile_ssl.parse_variant("n_local=2  local_scale=[0.05, 0.4] augment=pathology,rot90=0") == {
        "n_local": 2, "local_scale": [0.05, 0.4], "augment": "pathology,rot90=0"}
    with pytest.raises(SystemExit, match="not key=value"):
        bench_tile_ssl.parse_variant("n_local")


def _d(diff: float, lo: float, hi: float) -> dict:
    return {"diff": diff, "ci_low": lo, "ci_high": hi, "p_value": 0.01}


def _row(name: str, budget: str, acc: float, delta: float, vs: tuple | None = None, variant: str = "") -> dict:
    r = {"name": name, "method": "mocov2", "budget": budget, "variant": variant,
         "linear": {"balanced_accuracy": {"value": acc, "ci_low": acc - 0.01, "ci_high": acc + 0.01}},
         "paired": {"linear_balanced_accuracy": _d(delta, delta - 0.01, delta + 0.01)}}
    if vs:
        r["paired_vs"] = {"than": vs[0], "linear_balanced_accuracy": _d(*vs[1:])}
    return r


def test_budget_curve_verdicts_come_from_the_rows() -> None:
    rows = [{"name": "random init"}, _row("mocov2, 5m", "5m", 0.76, 0.02),
            _row("mocov2, 15m", "15m", 0.79, 0.052, ("mocov2, 5m", 0.03, 0.01, 0.05)),
            _row("mocov2, 45m", "45m", 0.85, 0.11, ("mocov2, 15m", 0.06, -0.01, 0.12))]
    lines = bench_tile_ssl.comparison_lines(rows, ["5m", "15m", "45m"])
    assert lines[0].startswith("- mocov2, 15m vs mocov2, 5m: Δ linear bal. acc. +0.030") and lines[0].endswith("**better**")
    assert lines[1].endswith("**not distinguishable**")
    # the Δ goal first at 15m; Δ and >= 0.84 together only at 45m
    assert lines[2] == ("- mocov2: Δ ≥ +0.05 over random init first at 15m; Δ goal and ≥ 0.84 together at 45m")


def test_a_variant_is_compared_with_its_defaults_and_makes_no_curve() -> None:
    rows = [{"name": "random init"}, _row("mocov2", "15m", 0.78, 0.04),
            _row("mocov2, n_local=2", "15m", 0.75, 0.01, ("mocov2", -0.03, -0.05, -0.01), variant="n_local=2")]
    assert bench_tile_ssl.comparison_lines(rows, ["15m"]) == [
        "- mocov2, n_local=2 vs mocov2: Δ linear bal. acc. -0.030 [-0.050, -0.010], p=0.01: **worse**"]
    rows += [{**_row("swav", "15m", 0.77, 0.03), "method": "swav"},
             {**_row("swav, n_local=2", "15m", 0.77, 0.03, ("swav", 0.0, -0.01, 0.01), variant="n_local=2"),
              "method": "swav"}]
    assert bench_tile_ssl.comparison_lines(rows, ["15m"])[-1] == (
        "- `n_local=2` vs the defaults, over 2 methods: not distinguishable 1, worse 1")


def test_each_row_states_the_settings_its_run_recorded() -> None:
    rows = [{"name": "mocov2", "method_hparams": {"temperature": 0.2, "queue": 4096}, "git_commit": "abcdef0123"},
            {"name": "mocov2, old", "method_hparams": None, "git_commit": None}]
    assert bench_tile_ssl.settings_lines(rows)[3:] == [
        "- mocov2: queue 4096, temperature 0.2; git HEAD when trained abcdef0",
        "- mocov2, old: not recorded (run predates the record); git HEAD when trained unknown"]


def test_a_row_trained_in_another_precision_than_todays_default_is_flagged() -> None:
    # simclr has a cpu_bf16_basis (auto trains it in bf16 on a native-bf16 CPU); dino and swav have none
    rows = [{**_row("simclr", "15m", 0.76, 0.02), "method": "simclr", "precision": {"resolved": "fp32"}},
            {**_row("mocov2", "15m", 0.78, 0.04), "precision": {"resolved": "bf16"}},
            {**_row("dino", "15m", 0.77, 0.03), "method": "dino", "precision": {"resolved": "bf16"}},
            {**_row("swav", "15m", 0.75, 0.01), "method": "swav", "precision": {"resolved": "fp32"}}]
    assert bench_tile_ssl.stale_precision_lines(rows, native_bf16=True) == [
        "- simclr: trained in fp32; `--precision auto` now trains simclr in bf16 on this CPU, so this row is not "
        "today's default",
        "- dino: trained in bf16; `--precision auto` now trains dino in fp32 on this CPU, so this row is not "
        "today's default"]
    flagged = bench_tile_ssl.stale_precision_lines(rows, native_bf16=False)  # emulated bf16: auto trains fp32
    assert [ln.split(":")[0] for ln in flagged] == ["- mocov2", "- dino"]


def _section(rows: list[dict], budget: str = "15m", random_acc: float = 0.74) -> dict:
    rnd = {"name": "random init", "linear": {"balanced_accuracy": {"value": random_acc, "ci_low": random_acc - 0.015,
                                                                    "ci_high": random_acc + 0.015}}}
    return {"args": {"budget": budget, "backbone": "resnet18", "tile_size": 96, "methods": "x"}, "results": [rnd, *rows]}


def test_the_goal_takes_each_methods_row_from_the_last_section_that_rechecked_it() -> None:
    old = _section([{**_row("mocov2", "15m", 0.78, 0.04)}, {**_row("swav", "15m", 0.72, -0.01), "method": "swav"}])
    new = _section([{**_row("mocov2", "15m", 0.80, 0.06)}])
    new["args"]["score_on"] = "valid"  # an option added later: what the older section ran with
    rows, src = bench_tile_ssl.goal_rows({"defaults": old, "recheck": new}, ["defaults", "recheck"])
    assert [(r["name"], r["linear"]["balanced_accuracy"]["value"]) for r in rows] == [
        ("random init", 0.74), ("mocov2", 0.80), ("swav", 0.72)]
    assert src == {"mocov2": "recheck", "swav": "defaults"}
    lines = bench_tile_ssl.goal_lines(rows)
    assert lines[0].startswith("- mocov2: Δ +0.060") and lines[0].endswith("**met**")
    with pytest.raises(SystemExit, match="protocol"):  # another budget is another protocol
        bench_tile_ssl.goal_rows({"defaults": old, "b": _section([], budget="5m")}, ["defaults", "b"])
    with pytest.raises(SystemExit, match="random"):  # another random-init score: other test tiles
        bench_tile_ssl.goal_rows({"defaults": old, "b": _section([], random_acc=0.75)}, ["defaults", "b"])


def test_the_goal_says_whether_the_budget_curve_closes_the_gap() -> None:
    curve = _section([_row("mocov2, 5m", "5m", 0.76, 0.02),
                      _row("mocov2, 15m", "15m", 0.77, 0.03, ("mocov2, 5m", 0.01, -0.003, 0.022)),
                      _row("mocov2, 45m", "45m", 0.775, 0.035, ("mocov2, 15m", 0.004, -0.009, 0.016))],
                     budget="5m,15m,45m")
    sections = {"defaults": _section([_row("mocov2", "15m", 0.77, 0.03)]), "budget": curve}
    lines = bench_tile_ssl.budget_lines(sections, "defaults")
    assert lines[2].startswith("- mocov2, 5m: Δ vs random init +0.020")
    assert lines[5].startswith("- mocov2, 15m vs mocov2, 5m: Δ linear bal. acc. +0.010")
    assert lines[-1] == ("- 0 of 2 longer budgets better than the budget before it (paired 95 % CI above 0): for mocov2, "
                         "more training time on this CPU does not close the gap")
    curve["results"][-1]["paired_vs"]["linear_balanced_accuracy"] = _d(0.03, 0.01, 0.05)
    assert bench_tile_ssl.budget_lines(sections, "defaults")[-1].endswith(": mocov2, 45m")
    # a curve on other test tiles (another random-init score) says nothing about these rows
    sections["budget"]["results"][0]["linear"]["balanced_accuracy"]["value"] = 0.75
    assert bench_tile_ssl.budget_lines(sections, "defaults") == []


def test_the_goal_remembers_its_sections(tmp_path: Path) -> None:
    out = tmp_path / "tile_ssl.md"
    out.with_suffix(".json").write_text(json.dumps({"sections": {
        "defaults": _section([_row("mocov2", "15m", 0.78, 0.04)]),
        "recheck": _section([_row("mocov2", "15m", 0.80, 0.06)])}}))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert bench_tile_ssl.goal_sections(saved) == "defaults"
    bench_tile_ssl.write_goal(out, "defaults, recheck")
    saved = json.loads(out.with_suffix(".json").read_text())
    assert bench_tile_ssl.goal_sections(saved) == "defaults,recheck"
    assert "mocov2 from `recheck`" in out.read_text() and "- mocov2: Δ +0.060" in out.read_text()


def test_the_goal_has_one_block_per_protocol(tmp_path: Path) -> None:
    out = tmp_path / "tile_ssl.md"
    small = _section([_row("mocov2", "15m", 0.77, 0.03)])
    big = _section([_row("mocov2", "15m", 0.79, 0.045)], random_acc=0.745)
    big["args"]["probe_train"] = 10000  # another protocol: its rows cannot join the 2,000-tile rows
    out.with_suffix(".json").write_text(json.dumps({"sections": {"defaults": small, "probe10k": big}}))
    with pytest.raises(SystemExit, match="protocol"):
        bench_tile_ssl.write_goal(out, "defaults,probe10k")
    bench_tile_ssl.write_goal(out, "defaults; probe10k")
    text = out.read_text()
    blocks = text.split("## Against the issue's goal")[1:]
    assert len(blocks) == 2 and "fitted on 10000 PCam train tiles" in blocks[1]
    assert "- mocov2: Δ +0.030" in blocks[0] and "- mocov2: Δ +0.045" in blocks[1]
    assert bench_tile_ssl.goal_sections(json.loads(out.with_suffix(".json").read_text())) == "defaults;probe10k"


def test_the_goal_can_take_a_sections_variant_rows(tmp_path: Path) -> None:
    sec = _section([_row("mocov2", "15m", 0.77, 0.03),
                    _row("mocov2, augment=x", "15m", 0.80, 0.055, ("mocov2", 0.025, 0.01, 0.04), variant="augment=x")])
    rows, src = bench_tile_ssl.goal_rows({"s": sec}, ["s@variant"])
    assert [r["name"] for r in rows] == ["random init", "mocov2, augment=x"] and src == {"mocov2": "s@variant"}
    assert [r["name"] for r in bench_tile_ssl.goal_rows({"s": sec}, ["s"])[0]] == ["random init", "mocov2"]
    out = tmp_path / "tile_ssl.md"
    out.with_suffix(".json").write_text(json.dumps({"sections": {"s": sec}}))
    bench_tile_ssl.write_goal(out, "s;s@variant")
    blocks = out.read_text().split("## Against the issue's goal")[1:]
    assert "**not met**" in blocks[0] and "- mocov2, augment=x: Δ +0.055" in blocks[1] and "**met**" in blocks[1]
    assert "`augment=x`" in blocks[1] and "`augment=x`" not in blocks[0]
    with pytest.raises(SystemExit, match="NAME@variant"):
        bench_tile_ssl.goal_rows({"s": sec}, ["s@other"])


def test_sections_made_from_other_sections_come_last(tmp_path: Path) -> None:
    out = tmp_path / "tile_ssl.md"
    for name in ("goal", "recheck2", "finetune", "defaults", "budget", "recheck"):
        out.write_text(bench_tile_ssl.merge_section(out, name, f"## {name}\n"))
    order = [ln.split()[2] for ln in out.read_text().splitlines() if ln.startswith("<!-- section:")]
    # make bench re-runs recorded commands in file order: fine-tuning reads the encoders the rechecks train
    assert order == ["budget", "defaults", "recheck", "recheck2", "finetune", "goal"]


def test_finetune_verdicts_count_the_paired_rows() -> None:
    import bench_tile_finetune

    assert bench_tile_ssl.verdict(_d(0.1, 0.08, 0.12)) == "better"
    assert bench_tile_ssl.verdict(_d(-0.008, -0.02, 0.003)) == "not distinguishable"
    assert bench_tile_ssl.verdict(_d(-0.03, -0.05, -0.01)) == "worse"
    lines = bench_tile_finetune.verdict_lines({"finetune_1%": ["better"] * 5,
                                                "finetune_10%": ["better", "not distinguishable", "not distinguishable"]})
    assert lines == ["- 1% labels: of 5 SSL encoders, better 5",
                     "- 10% labels: of 3 SSL encoders, better 1, not distinguishable 2"]


def _probs(y: np.ndarray, acc: float, seed: int) -> np.ndarray:
    """[N, 2] probabilities right on a random ``acc`` share of each class's items (balanced accuracy ``acc``)."""
    rng = np.random.default_rng(seed)
    right = np.zeros(len(y), bool)
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        right[rng.choice(idx, round(acc * len(idx)), replace=False)] = True
    pred = np.where(right, y, 1 - y)
    return np.stack([np.where(pred == 0, 0.9, 0.1), np.where(pred == 1, 0.9, 0.1)], 1)


def _seed_rows(y: np.ndarray) -> list[dict]:
    from gigaslide.evaluation.metrics import balanced_accuracy

    def row(variant: str, seed: int, acc: float) -> dict:
        p = _probs(y, acc, 100 + seed + (50 if variant else 0))
        name = ", ".join(["mocov2"] + ([variant] if variant else []) + ([f"seed {seed}"] if seed else []))
        return {"name": name, "method": "mocov2", "budget": "5m", "variant": variant, "seed": seed,
                "probs": {"linear": p}, "linear": {"balanced_accuracy": {"value": balanced_accuracy(y, p)}}}

    base = {"name": "random init", "probs": {"linear": _probs(y, 0.6, 7)}}
    # the defaults' two seeds differ a lot (0.70 vs 0.80); the variant's two agree (0.75, 0.76)
    return [base, row("", 0, 0.70), row("", 1, 0.80), row("gray=0.3", 0, 0.75), row("gray=0.3", 1, 0.76)]


def test_seed_replicates_show_seed_noise_and_widen_the_variant_verdict() -> None:
    from gigaslide.evaluation.metrics import paired_difference

    y = np.repeat([0, 1], 1000)
    rows = _seed_rows(y)
    s = bench_tile_ssl.seed_comparisons(rows, y, 500)
    assert [a["name"] for a in s["arms"]] == ["mocov2", "mocov2, gray=0.3"]
    assert s["arms"][0]["accs"] == pytest.approx([0.70, 0.80])
    assert s["arms"][0]["sd"] == pytest.approx(np.std([0.70, 0.80], ddof=1))
    # two seeds of the same settings: the single-run test calls one "better" (that is seed noise)
    (pair_d, pair_v) = [(p, bench_tile_ssl.verdict(p)) for p in s["pairs"] if p["name"] == "mocov2"][0]
    assert (pair_d["a"], pair_d["b"], pair_v) == (1, 0, "better")
    assert pair_d["diff"] == pytest.approx(0.10)
    # seed 0 alone says the variant is better (+0.05); over seeds the CI covers the defaults' seed spread
    single = paired_difference(y, rows[3]["probs"]["linear"], rows[1]["probs"]["linear"], "balanced_accuracy",
                               n_bootstrap=500, seed=0)
    assert bench_tile_ssl.verdict(single) == "better"
    (v,) = s["variants"]
    assert (v["name"], v["than"], v["runs"]) == ("mocov2, gray=0.3", "mocov2", [2, 2])
    assert v["diff"] == pytest.approx((0.75 + 0.76) / 2 - (0.70 + 0.80) / 2)
    assert bench_tile_ssl.verdict(v) == "not distinguishable"
    fixed = paired_difference(y, np.stack([r["probs"]["linear"] for r in rows[3:]]),
                              np.stack([r["probs"]["linear"] for r in rows[1:3]]), "balanced_accuracy",
                              n_bootstrap=500, seed=0)  # the seeds kept, not resampled: test tiles only
    assert v["ci_high"] - v["ci_low"] > 1.5 * (fixed["ci_high"] - fixed["ci_low"])
    text = "\n".join(bench_tile_ssl.seed_lines(s))
    assert "| mocov2 | 0, 1 | 0.700, 0.800 | 0.750 ± 0.071 |" in text
    assert "- over 2 same-settings pairs: better 1, not distinguishable 1; largest |Δ| 0.100" in text
    assert "- mocov2, gray=0.3 (2 seeds) vs mocov2 (2 seeds): Δ +0.005" in text


def test_no_seed_section_without_replicates() -> None:
    y = np.repeat([0, 1], 50)
    rows = [r for r in _seed_rows(y) if not r.get("seed")]
    assert bench_tile_ssl.seed_comparisons(rows, y, 100) == {"arms": [], "pairs": [], "variants": []}
    assert bench_tile_ssl.seed_lines(bench_tile_ssl.seed_comparisons(rows, y, 100)) == []


def test_the_goal_and_the_variant_tally_read_seed_0_rows_only() -> None:
    sec = _section([_row("mocov2", "15m", 0.78, 0.04), {**_row("mocov2, seed 1", "15m", 0.80, 0.06), "seed": 1}])
    rows, src = bench_tile_ssl.goal_rows({"defaults": sec}, ["defaults"])
    assert [r["name"] for r in rows if r.get("method")] == ["mocov2"]


def test_the_goal_also_reads_the_mean_over_seeds_of_a_section_of_its_protocol() -> None:
    def arm(name: str, variant: str, diff: float) -> dict:
        return {"name": name, "variant": variant, "seeds": [0, 1, 2], "accs": [0.78, 0.79, 0.80], "mean": 0.79,
                "sd": 0.01, "vs_random": _d(diff, diff - 0.015, diff + 0.015)}

    first = _section([_row("mocov2", "15m", 0.788, 0.044)])
    seeds = {**_section([_row("mocov2", "15m", 0.788, 0.044)]),
             "seeds": {"arms": [arm("mocov2", "", 0.052), arm("mocov2, gray=0.3", "gray=0.3", 0.06)]}}
    other = {**_section([], budget="5m"), "seeds": {"arms": [arm("mocov2", "", 0.03)]}}  # another budget: not read
    lines = bench_tile_ssl.seed_goal_lines({"probe10k": first, "seeds15": seeds, "seeds5": other}, "probe10k")
    assert lines[2:] == ["- mocov2 over seeds 0, 1, 2 (section `seeds15`): mean Δ +0.052 [+0.037, +0.067], p=0.01 "
                         "(goal ≥ +0.05): **met**; linear bal. acc. 0.790 ± 0.010 over seeds",
                         "- over seeds, 1 of 1 arm(s) meet the Δ goal; best mean mocov2 0.790 (goal ≥ 0.84): "
                         "**not met**"]
    seeds["seeds"]["arms"][0] = arm("mocov2", "", 0.049)
    swav = {**seeds, "seeds": {"arms": [{**arm("swav", "", 0.051), "mean": 0.85}]}}
    lines = bench_tile_ssl.seed_goal_lines({"probe10k": first, "seeds15": seeds, "seeds15_swav": swav}, "probe10k")
    assert lines[2].endswith("**not met**; linear bal. acc. 0.790 ± 0.010 over seeds")
    assert lines[-1] == "- over seeds, 1 of 2 arm(s) meet the Δ goal; best mean swav 0.850 (goal ≥ 0.84): **met**"
    assert bench_tile_ssl.seed_goal_lines({"probe10k": first}, "probe10k") == []
