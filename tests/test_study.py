"""Optuna studies: search space, resume rules, crash-safe resume, pruning, W&B read back."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import harness_env, smoke_study_args, wait_for
from harness.context_audit import BLANKED, as_records, audit_key, audit_study_data, study_methods
from harness.folders import StudyFolder
from harness.runtime import StudyError, default_storage
from harness.study import default_trial_params, make_sampler, open_study, run_study, suggest_params, trials_frame
from harness.tracking import read_offline_run, run_id_for, study_key, study_run_id

REPO = Path(__file__).resolve().parents[1]


def test_conditional_params_appear_only_when_their_parent_allows(smoke_study):
    cfg = smoke_study()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        trial = study.ask()
        params = suggest_params(trial, cfg)
        assert ("focal_gamma" in trial.params) == (params.loss == "focal")
        assert ("label_smoothing" in trial.params) == (params.loss == "label_smoothing")
        assert ("freeze_k" in trial.params) == (params.freeze in ("warmup_head", "late_freeze"))
        assert {"backbone", "loss", "freeze", "aug_strength", "preprocess", "head", "lr", "weight_decay"} <= set(
            trial.params)
        study.tell(trial, 0.0)


def test_trial_zero_is_the_study_files_defaults(smoke_study):
    cfg = smoke_study()
    defaults = default_trial_params(cfg)
    assert defaults["backbone"] == cfg.params.backbone and defaults["lr"] == cfg.params.lr
    assert "focal_gamma" not in defaults  # loss 'ce' leaves it inactive


def draw_params(cfg, studies, trials):
    """Ask `trials` trials, taking turns between `studies` (processes sharing one storage)."""
    drawn = {}
    for n in range(trials):
        study = studies[n % len(studies)]
        trial = study.ask()
        drawn[trial.number] = suggest_params(trial, cfg).model_dump()
        study.tell(trial, 0.1 * (trial.number % 3))
    return drawn


def test_processes_sharing_a_study_draw_apart_and_a_rerun_draws_the_same(smoke_study, tmp_path):
    cfg = smoke_study()  # TPE, seed 0: 4 random startup trials, then TPE proper
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first = optuna.create_study(study_name="s", storage=shared, sampler=make_sampler(cfg), direction="maximize")
    second = optuna.load_study(study_name="s", storage=shared, sampler=make_sampler(cfg))
    together = draw_params(cfg, [first, second], trials=8)
    assert len({repr(sorted(p.items())) for p in together.values()}) == 8  # the same seed, yet no repeated draw

    alone = optuna.create_study(storage=f"sqlite:///{tmp_path / 'alone.db'}", sampler=make_sampler(cfg),
                                direction="maximize")
    assert draw_params(cfg, [alone], trials=8) == together  # a trial's draw depends on its number, not its process


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "qmc"])
def test_every_sampler_draws_the_default_space(smoke_study, sampler):
    cfg = smoke_study(**{"search.sampler.name": sampler, "search.sampler.n_startup_trials": 2})
    study = optuna.create_study(sampler=make_sampler(cfg), direction="maximize")
    drawn = draw_params(cfg, [study], trials=6)  # past the startup trials: the sampler's own draws
    assert len(drawn) == 6 and all(p["backbone"] in cfg.search.space["backbone"].choices for p in drawn.values())
    assert len({p["lr"] for p in drawn.values()}) > 1


def test_a_changed_split_or_space_refuses_to_resume(smoke_study):
    cfg = smoke_study()
    study = open_study(cfg, None, split_hash="aaaa")
    assert study.trials[0].state == TrialState.WAITING and study.trials[0].user_attrs["reference"]
    assert len(open_study(cfg, None, split_hash="aaaa").trials) == 1  # loading again enqueues nothing
    with pytest.raises(StudyError, match=r"different data split .*new `name:`"):
        open_study(cfg, None, split_hash="bbbb")
    for change in ({"search.space.lr.high": 0.5}, {"train.epochs": cfg.train.epochs + 1},
                   {"data.image_size": {"height": 32, "width": 24}}):
        with pytest.raises(StudyError, match="different search space, defaults or training settings"):
            open_study(cfg.replace(change), None, split_hash="aaaa")
    same = cfg.replace({"train.num_workers": 2, "search.trials": 9, "search.pruner.name": "none"})
    assert len(open_study(same, None, split_hash="aaaa").trials) == 1  # where and how long: not the experiment


def test_an_unreachable_storage_is_a_clear_error(smoke_study):
    cfg = smoke_study()
    with pytest.raises(StudyError, match=r"storage postgresql://u:\*\*\*@127.0.0.1:1/db cannot be opened"):
        open_study(cfg, "postgresql://u:secret@127.0.0.1:1/db", split_hash="aaaa")


def harness_study(args, env_extra=None, **kwargs):
    env = harness_env(**(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "study", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_config_errors_exit_non_zero_before_any_trial(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: bad\nruns_dir: {tmp_path}\ntrain: {{epochs: 0}}\n")
    process = harness_study([str(bad)])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "train.epochs" in output and "greater than or equal to 1" in output
    assert not (tmp_path / "bad").exists()


def check_wandb_history(cfg, frame):
    """Every trial's W&B offline run (read back from W&B's own files) has val/f1 and gap/f1 per epoch."""
    for row in frame.itertuples():
        run = read_offline_run(cfg.study_dir / "wandb", run_id_for(study_key(cfg), row.trial))
        epochs = sorted({int(h["epoch"]) for h in run["history"] if "val/f1" in h and "gap/f1" in h})
        assert epochs == list(range(1, row.epochs + 1)), (row.trial, epochs)  # counted from 1
        assert run["group"] == cfg.name and run["job_type"] == "trial"


@pytest.mark.slow
def test_killed_study_resumes_to_the_exact_target(smoke_study, shared_data, tmp_path):
    cfg = smoke_study(**{"search.heartbeat_s": 1, "train.epochs": 3, "search.pruner.name": "none"})
    args = smoke_study_args(tmp_path, shared_data, "--set", f"name={cfg.name}")
    victim = harness_study(args)
    last = StudyFolder.of(cfg).trial(1).path / "last.pt"
    assert wait_for(last, victim), victim.communicate()[0][-3000:]
    victim.send_signal(signal.SIGKILL)  # mid-trial: after its first epoch's checkpoint
    victim.wait()
    rerun = harness_study(args)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{cfg.study_dir / 'study.db'}")
    states = [t.state for t in study.trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == cfg.search.trials
    assert TrialState.RUNNING not in states
    frame = trials_frame(study)
    # one row per identity; the killed trial 1 is among them (a fresh trial takes the next free number)
    assert len(frame) == cfg.search.trials and frame["trial"].is_unique and 1 in set(frame["trial"])
    metrics = pd.read_csv(cfg.study_dir / "trials" / "1" / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1, 2]  # resumed from last.pt, no epoch repeated
    retried = [t for t in study.trials if t.user_attrs.get("identity") == 1]
    assert [t.state for t in retried] == [TrialState.FAIL, TrialState.COMPLETE]
    assert len({t.user_attrs["wandb_run_id"] for t in retried}) == 1
    check_wandb_history(cfg, frame)
    assert (cfg.study_dir / "trials.csv").is_file()


def test_study_runs_to_target_and_logs_every_trial(smoke_study):
    cfg = smoke_study(**{"search.pruner.name": "none"})
    study = run_study(cfg, progress=False)
    frame = trials_frame(study)
    assert len(frame) == cfg.search.trials and set(frame["state"]) <= {"complete", "pruned"}
    reference = [t for t in study.trials if t.user_attrs.get("reference")]
    assert len(reference) == 1 and reference[0].number == 0
    for t in study.trials:
        assert {"gap_f1", "gap_bgswap", "val_f1", "val_f1_bgswap", "best_epoch", "epochs_run", "images_per_s",
                "run_dir", "wandb_run_id", "weights", "foreground"} <= set(t.user_attrs)
        assert Path(t.user_attrs["run_dir"], "metrics.csv").is_file()
    check_wandb_history(cfg, frame)
    shortcuts = study.user_attrs["shortcuts"]  # measured once, when the study was created
    assert shortcuts["foreground"]["applies"] and shortcuts["foreground"]["users"][0] == "search.objective robust/f1"
    assert [(row["view"], row["task"]) for row in shortcuts["audit"]][:3] == [
        ("as loaded", "mask"), ("as loaded", "gender"), ("as loaded", "age")]
    removed = [row for row in shortcuts["audit"] if row["view"] == "remove_background"]
    assert len(removed) == 3 and all(row["region"] == BLANKED and not row["flagged"] for row in removed)
    run = read_offline_run(cfg.study_dir / "wandb", study_run_id(study_key(cfg)))
    assert run["tables"]["shortcut_audit"]["columns"][:3] == ["view", "region", "task"]
    assert run["summary"]["shortcut/probe_applies"] is True
    assert len(run["tables"]["shortcut_audit"]["data"]) == len(shortcuts["audit"])
    assert len(run_study(cfg, progress=False).trials) == cfg.search.trials  # rerun: nothing more to do
    assert len(run_study(cfg, trials=cfg.search.trials + 1, progress=False).trials) == cfg.search.trials + 1


def test_the_context_audit_is_kept_beside_the_cache_and_read_by_the_next_study(smoke_study, tmp_path):
    from harness.data.prepare import prepare_data

    # a copy of the session's cache (its decoded images and foreground, not its audits): the stored audit is
    # edited below, and the session's studies read theirs
    shared = Path(smoke_study().data.cache_dir)
    if shared.is_dir():
        shutil.copytree(shared, tmp_path / "cache", ignore=shutil.ignore_patterns("context_audit"))
    cfg = smoke_study(**{"data.cache_dir": str(tmp_path / "cache"), "search.trials": 1, "train.epochs": 1,
                         "search.pruner.name": "none", "tracking.mode": "disabled"})
    data = prepare_data(cfg, progress=False)
    first = audit_study_data(cfg, data)
    stored = Path(cfg.data.cache_dir) / "context_audit" / f"{audit_key(cfg, data, study_methods(cfg))}.json"
    rows = json.loads(stored.read_text())
    assert rows == json.loads(json.dumps(as_records(first)))
    rows[0]["flagged"] = not rows[0]["flagged"]  # a mark only a read of the stored file can carry
    stored.write_text(json.dumps(rows))
    study = run_study(cfg, progress=False)
    assert study.user_attrs["shortcuts"]["audit"][0]["flagged"] == rows[0]["flagged"]
    other = cfg.replace({"shortcuts.audit_permutations": cfg.shortcuts.audit_permutations + 1})
    assert audit_key(other, data, study_methods(other)) != stored.stem  # other settings are measured anew


def study_with_reference_trials(cfg, value: float, count: int = 2) -> None:
    """Complete trials whose val F1 is `value` after every epoch: what the median pruner compares against.

    A real trial's F1 lies in [0, 1], so references at 2.0 are always better and at -1.0 always worse:
    the pruner's decision no longer depends on the floating-point noise of a random model's F1.
    """
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=cfg.name, storage=default_storage(cfg), direction="maximize")
    for _ in range(count):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=value,
                                                  intermediate_values={step: value for step in range(1, 4)}))


@pytest.mark.parametrize("reference, epochs, state, epochs_run", [
    (2.0, 3, TrialState.PRUNED, 2),  # worse than every reference: stopped at the first prunable epoch (2)
    (2.0, 2, TrialState.COMPLETE, 2),  # the first prunable epoch is the last: the pruner is never asked there
    (-1.0, 3, TrialState.COMPLETE, 3),  # better than every reference: trains all its epochs
], ids=["pruned-at-first-prunable-epoch", "never-after-the-last-epoch", "not-pruned"])
def test_pruned_trials_stop_where_the_pruner_decides(smoke_study, reference, epochs, state, epochs_run):
    cfg = smoke_study(**{
        "search.trials": 3, "train.epochs": epochs, "params.lr": 0.003, "search.sampler": {"name": "random", "seed": 3},
        "search.pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 2},  # prunable from epoch 2
        "search.space": {"lr": {"type": "categorical", "choices": [0.003]}},
    })
    study_with_reference_trials(cfg, reference)
    study = run_study(cfg, progress=False)
    trial = next(t for t in study.trials if t.user_attrs.get("reference"))  # trial 0 of the study file
    assert trial.state == state and trial.user_attrs["epochs_run"] == epochs_run
    # the pruner's step is the number of epochs trained (1, 2, ...), reported after every epoch, the last too
    assert sorted(trial.intermediate_values) == list(range(1, epochs_run + 1))


def test_successive_halving_stops_trials_at_its_rungs_only(smoke_study):
    cfg = smoke_study(**{
        "search.trials": 5, "train.epochs": 3, "params.lr": 0.003, "search.sampler": {"name": "random", "seed": 3},
        "search.pruner": {"name": "successive_halving", "n_warmup_steps": 1, "reduction_factor": 2},
        "search.space": {"lr": {"type": "categorical", "choices": [0.003, 1.0e-9]}},
    })
    study = run_study(cfg, progress=False)
    epochs_run = {t.number: t.user_attrs["epochs_run"] for t in study.trials}
    pruned = [t.number for t in study.trials if t.state == TrialState.PRUNED]
    assert all(epochs_run[n] in (1, 2) for n in pruned)  # rungs after epochs 1 and 2; never after the last (3)
    assert all(epochs_run[t.number] == 3 for t in study.trials if t.state == TrialState.COMPLETE)
    assert all(sorted(t.intermediate_values) == list(range(1, epochs_run[t.number] + 1)) for t in study.trials)


# the default and the template in `make test`; the other study files' smoke runs (20 s each) with the long suites
LONG_SMOKE = {"digits", "mask"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in LONG_SMOKE else p
                                  for p in sorted((REPO / "studies").glob("*.yaml"))], ids=lambda p: p.stem)
def test_every_study_file_runs_its_smoke_variant(smoke_study, path):
    cfg = smoke_study(path)
    study = run_study(cfg, progress=False)
    frame = trials_frame(study)
    assert len(frame) == cfg.search.trials
    assert (frame["state"] == "complete").any(), frame[["trial", "state", "reason"]]
    if cfg.data.format != "competition":  # nothing there needs portraits: no face searched, no probe
        assert study.user_attrs["shortcuts"]["foreground"] is None
        assert frame["val_f1_bgswap"].isna().all() and not list(cfg.study_dir.rglob("bgswap_logits.npy"))
