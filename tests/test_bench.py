"""`make bench` end to end at --quick sizes, outputs in tmp_path. Structure only: no timing assertions."""

import json

import pytest
import torch

from harness.bench import __main__ as bench
from harness.bench.common import DEFAULT_STUDY
from harness.bench.study import fewest_epochs
from harness.config import load_study

ROW_KEYS = {"name", "harness", "reference", "ratio", "unit", "target", "better", "met"}
CHEAP_GROUPS = ["loader", "trial", "ensemble", "report"]


def test_quick_bench_writes_every_row_of_the_cheap_groups(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--only", ",".join(CHEAP_GROUPS), "--out", str(out)]) == 0

    report = json.loads((out / "bench.json").read_text())
    assert report["complete"] is True and report["quick"] is True
    assert list(report["group_seconds"]) == CHEAP_GROUPS
    assert report["machine"]["cpus"] >= 1 and len(report["load_average_start"]) == 3
    names = [row["name"] for row in report["rows"]]
    assert len(names) == len(set(names))
    assert {"loader_images_per_s", "loader_images_per_s_in_process", "cache_build_seconds",
            "trial_train_images_per_s", "probe_cost_share_of_epoch", "ensemble_selection_seconds",
            "predict_images_per_s", "report_seconds", "report_megabytes"} <= set(names)
    for row in report["rows"]:
        assert ROW_KEYS <= set(row), row
        assert row["better"] in ("higher", "lower")
        assert isinstance(row["met"], bool)
        assert all(isinstance(row[key], (int, float)) for key in ("harness", "reference", "ratio", "target")), row
        assert row["harness"] > 0 and row["reference"] > 0, row
        if row["name"] != "ensemble_selection_seconds":  # met on its own absolute budget (`met_when`)
            sign = 1 if row["better"] == "higher" else -1
            assert row["met"] == (sign * row["ratio"] >= sign * row["target"]), row

    # one row per claim: channels_last against NCHW on this device; a constant reference says it is one
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"trial_channels_last_{device}_images_per_s" in names
    by_name = {row["name"]: row for row in report["rows"]}
    assert by_name["report_seconds"]["reference_is"].startswith("a constant, not measured")
    assert "reference_is" not in by_name["trial_train_images_per_s"]

    # the mixed-precision row exists only where it can be measured; elsewhere a note says so
    if torch.cuda.is_available():
        assert "trial_amp_images_per_s" in names
    else:
        assert "trial_amp_images_per_s" not in names
        assert "trial_amp_images_per_s: no CUDA device: skipped" in report["notes"]

    # every output stayed under --out: the quick trial's smoke data too
    assert (out / "smoke-data" / "default").is_dir() and (out / "loader.json").is_file()


@pytest.mark.parametrize("first_run", ["killed after its first group", "finished, with --only"])
def test_resume_keeps_the_groups_measured_before_and_runs_the_rest(tmp_path, first_run):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--only", "report", "--out", str(out)]) == 0
    first = json.loads((out / "bench.json").read_text())
    if first_run.startswith("killed"):
        first["complete"] = False  # what a run killed after its first group leaves
        (out / "bench.json").write_text(json.dumps(first))

    assert bench.main(["--quick", "--only", "report,ensemble", "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "bench.json").read_text())
    assert resumed["complete"] is True and resumed["when"] == first["when"] and len(resumed["resumed"]) == 1
    assert resumed["group_seconds"]["report"] == first["group_seconds"]["report"]
    assert resumed["rows"][: len(first["rows"])] == first["rows"]
    assert {"ensemble_selection_seconds", "predict_images_per_s"} <= {row["name"] for row in resumed["rows"]}


def test_an_unknown_group_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--only", "loader,nonsense"])
    assert "'nonsense'" in capsys.readouterr().err


def test_the_pruners_floors_count_the_epochs_they_must_train():
    cfg = load_study(DEFAULT_STUDY).replace({"search.trials": 10, "train.epochs": 4})
    median = {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2}
    assert fewest_epochs(cfg.replace({"search.pruner": median})) == 3 * 4 + 7 * 2  # startup trials run in full
    halving = {"name": "successive_halving", "n_warmup_steps": 1}
    assert fewest_epochs(cfg.replace({"search.pruner": halving})) == 4 + 9 * 1  # the first trial has no rival
    assert fewest_epochs(cfg.replace({"search.pruner.name": "none"})) is None


@pytest.mark.slow
def test_quick_budget_bench_runs_the_plain_script_the_reference_and_both_budgets_on_one_seed(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--only", "budget", "--out", str(out)]) == 0
    rows = {row["name"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"budget_half_eval_f1", "budget_full_eval_f1", "budget_wall", "budget_half_cost"}
    run = rows["budget_wall"]["runs"]["0"] if "0" in rows["budget_wall"]["runs"] else rows["budget_wall"]["runs"][0]
    assert run["plain"]["trials"] == 2 and run["plain"]["epochs"] >= 2
    assert run["full"]["budget_s"] == pytest.approx(max(run["plain"]["seconds"], 90), abs=0.1)
    assert run["half"]["budget_s"] == pytest.approx(max(run["plain"]["seconds"], 90) / 2, abs=0.1)
    for label in ("full", "half"):  # each budgeted run ends with a submission, whatever it came from
        assert run[label]["source"] in ("promotion", "ensemble", "best trial alone") and run[label]["eval_f1"] >= 0
    assert rows["budget_wall"]["reference_is"].startswith("a constant, not measured")
