"""Bad input: every case shows the user a message naming the file or key and what is wrong,
and loses nothing already written.

Data and study-file cases go through the real command line (`harness check-data`, `harness study`):
in-process through `harness.cli.main` to stay fast, and a few through a subprocess to see the exit
code and stderr exactly as a user does. Trial failures go through `run_study` on the default study's
smoke variant. docs/robustness.md lists every case with its message.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from conftest import REPO, harness_env, people, write_competition, write_image
from harness.cli import main
from harness.config import ConfigError, load_study
from harness.data.cache import ImageDecodeError
from harness.data.prepare import prepare_data
from harness.data.readers import DataError, read_train
from harness.io import atomic_torch_save, load_checkpoint
from harness.losses import LOSSES
from harness.runtime import StudyError
from harness.study import run_study, status, trials_frame
from harness.tracking import run_id_for, study_key

FOLDERS = people(12)  # write_competition gives folder i the suffix .jpg, .jpeg, .png, .JPG for i % 4 = 0..3

# A trial that costs about a second: one epoch of two batches on the smallest backbone.
FAST_TRIAL = {"train.epochs": 1, "train.max_train_batches": 2, "params.backbone": "resnet10t",
              "search.trials": 1, "tracking.mode": "disabled"}


def _nan_loss(num_classes, focal_gamma, label_smoothing):
    return lambda logits, target: logits.sum() * float("nan")


INTERRUPT_AFTER_CHECKPOINT: list[Path] = []  # while it names a last.pt that exists, the next train step is Ctrl-C


def _interrupting_loss(num_classes, focal_gamma, label_smoothing):
    def loss(logits, target):
        if torch.is_grad_enabled() and INTERRUPT_AFTER_CHECKPOINT and INTERRUPT_AFTER_CHECKPOINT[0].is_file():
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return torch.nn.functional.cross_entropy(logits, target)

    return loss


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def broken_losses(monkeypatch):
    """Losses that misbehave on purpose, registered for one test only: other test files parametrize over
    LOSSES.names() at collection, so a module-level registration here would run them there too."""
    monkeypatch.setitem(LOSSES._entries, "bad_input_nan", _nan_loss)
    monkeypatch.setitem(LOSSES._entries, "bad_input_ctrl_c", _interrupting_loss)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (what must survive a failure)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, str], folder: Path) -> None:
    after = snapshot(folder)
    lost = sorted(name for name in before if name not in after)
    changed = sorted(name for name in before if name in after and after[name] != before[name])
    assert not lost and not changed, f"under {folder}: lost {lost}, changed {changed}"


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`harness ARGS` in this process: (exit code, stdout, stderr). An escaping exception fails the test."""
    if "WANDB_SERVICE" in os.environ:  # main() drops it for its own process; give it back to this one afterwards
        monkeypatch.setenv("WANDB_SERVICE", os.environ["WANDB_SERVICE"])
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def harness_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=harness_env(), timeout=300)


def study_file(tmp_path: Path, root: Path, extra: str = "", name: str = "bad-input") -> Path:
    """A small study file on a hand-made dataset: tiny images, cache built in this process, the context audit
    at the smoke variants' size (what is tested here is the data's problems, not the audit)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        runs_dir: {tmp_path / 'runs'}
        shortcuts: {{audit_permutations: 5, audit_folds: 3}}
        data:
          root: {root}
          cache_dir: {tmp_path / 'cache'}
          cache_workers: 1
          image_size: {{height: 32, width: 24}}
        """) + extra)
    return path


def rename_person(root: Path, old: str, new: str, **csv_changes: str) -> Path:
    """Rename a person folder and point its train.csv row at the new name (with optional column changes)."""
    images = root / "train" / "images"
    (images / old).rename(images / new)
    edit_csv_row(root, old, path=new, **csv_changes)
    return images / new


def edit_csv_row(root: Path, folder: str, **changes: str) -> Path:
    csv = root / "train" / "train.csv"
    table = pd.read_csv(csv, dtype=str)
    for column, value in changes.items():
        table.loc[table["path"] == folder, column] = value
    table.to_csv(csv, index=False)
    return csv


# ------------------------------------------------------------------------- data cases


def corrupt_jpeg(root: Path) -> dict:
    file = root / "train" / "images" / FOLDERS[0] / "mask2.jpg"
    file.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg at all " * 20)
    return {"file": file}


def truncated_png(root: Path) -> dict:
    file = root / "train" / "images" / FOLDERS[2] / "mask1.png"
    write_image(file, seed=5, size=(96, 128))  # big enough that half of it cuts into the pixel data
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return {"file": file}


def zero_byte(root: Path) -> dict:
    file = root / "train" / "images" / FOLDERS[1] / "normal.jpeg"
    file.write_bytes(b"")
    return {"file": file}


def macos_junk(root: Path) -> dict:
    file = root / "train" / "images" / FOLDERS[0] / "._mask1.jpg"
    file.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X resource fork")
    return {"file": file}


def six_of_seven(root: Path) -> dict:
    folder = root / "train" / "images" / FOLDERS[3]
    (folder / "mask4.JPG").unlink()
    return {"folder": folder}


def wrong_csv_columns(root: Path) -> dict:
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text().replace("id,gender,race,age,path", "id,sex,race,age,path", 1))
    return {"csv": csv}


def non_numeric_age_in_folder(root: Path) -> dict:
    return {"folder": rename_person(root, FOLDERS[4], "000004_male_Asian_sixty", age="sixty")}


def non_numeric_age_in_csv(root: Path) -> dict:
    return {"csv": edit_csv_row(root, FOLDERS[5], age="sixty-three"), "person": FOLDERS[5]}


def unknown_gender(root: Path) -> dict:
    return {"folder": rename_person(root, FOLDERS[6], "000006_robot_Asian_22", gender="robot")}


@dataclass(frozen=True)
class DataCase:
    id: str
    breaks: Callable[[Path], dict]  # damages the dataset; returns the names the messages mention
    check_exit: int  # `harness check-data`: 0 fit to train, 1 problems listed, 2 cannot even read the data
    check_says: str  # in check-data's report (stdout) or, for exit 2, its error (stderr)
    study_error: type[Exception] | None  # what `harness study` (prepare_data) stops with; None: it trains
    study_says: str = ""


DATA_CASES = [
    DataCase("corrupt-jpeg", corrupt_jpeg, 1, "[error] {file}: unreadable image: ",
             ImageDecodeError, "cannot decode image {file}: "),
    DataCase("truncated-png", truncated_png, 1, "[error] {file}: unreadable image: ",
             ImageDecodeError, "cannot decode image {file}: "),
    DataCase("zero-byte-file", zero_byte, 1, "[error] {file}: zero-byte image",
             DataError, "{file}: zero-byte image"),
    DataCase("macos-junk-skipped", macos_junk, 0, "[warning] {file}: junk file skipped", None),
    DataCase("person-with-6-of-7-images", six_of_seven, 1,
             "[error] {folder}: person has 6 of 7 images; missing ['mask4']",
             DataError, "{folder}: person has 6 of 7 images; missing ['mask4']"),
    DataCase("wrong-train-csv-columns", wrong_csv_columns, 2,
             "error: {csv}: missing column(s) ['gender']; expected columns ['id', 'gender', 'race', 'age', 'path']",
             DataError, "{csv}: missing column(s) ['gender']"),
    DataCase("non-numeric-age-in-folder-name", non_numeric_age_in_folder, 1,
             "[error] {folder}: age 'sixty' is not a whole number of years",
             DataError, "{folder}: age 'sixty' is not a whole number of years"),
    DataCase("non-numeric-age-in-train-csv", non_numeric_age_in_csv, 1,
             "[error] {csv}: row for '{person}' says id=000005, gender=female, age=sixty-three; "
             "the folder name says otherwise", DataError, "age=sixty-three; the folder name says otherwise"),
    DataCase("unknown-gender", unknown_gender, 1, "[error] {folder}: unknown gender 'robot'; expected male or female",
             DataError, "{folder}: unknown gender 'robot'"),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda case: case.id)
def test_data_problem_is_named_and_nothing_is_lost(case, tmp_path, monkeypatch, capsys):
    root = write_competition(tmp_path / "data", FOLDERS)
    path = study_file(tmp_path, root)
    cfg = load_study(path)
    prepare_data(cfg, progress=False)  # a cache of the good data, built before anything broke
    cache_before = snapshot(cfg.data.cache_dir)
    names = case.breaks(root)
    data_before = snapshot(root)

    code, out, err = run_cli(["check-data", str(path), "--quiet"], monkeypatch, capsys)
    assert code == case.check_exit, out + err
    assert case.check_says.format(**names) in (err if code == 2 else out), out + err

    if case.study_error is None:
        frame = prepare_data(cfg, progress=False).frame
        assert len(frame) == len(FOLDERS) * 7 and not frame["path"].str.contains("/._").any()
    else:
        with pytest.raises(case.study_error) as raised:
            prepare_data(cfg, progress=False)
        assert case.study_says.format(**names) in str(raised.value)
    assert_kept(data_before, root)  # the harness reports bad files; it never deletes or rewrites them
    assert_kept(cache_before, cfg.data.cache_dir)


def test_a_folder_with_a_bad_name_is_not_also_called_missing(tmp_path):
    root = write_competition(tmp_path / "data", FOLDERS)
    folder = unknown_gender(root)["folder"]
    report = "\n".join(str(p) for p in read_train(load_study(study_file(tmp_path, root)).data).problems)
    assert f"{folder}: unknown gender 'robot'" in report
    assert "no such folder" not in report, report



def test_check_data_cli_lists_a_corrupt_jpeg_and_exits_1(tmp_path):
    root = write_competition(tmp_path / "data", FOLDERS)
    file = corrupt_jpeg(root)["file"]
    before = snapshot(root)
    result = harness_subprocess("check-data", str(study_file(tmp_path, root)), "--quiet")
    assert result.returncode == 1, result.stderr
    assert f"[error] {file}: unreadable image: " in result.stdout
    assert "problems: 1 error(s)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert_kept(before, root)


def test_check_data_refuses_a_csv_path_escaping_the_data_root(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    write_image(root / "cats" / "a.jpg", 0)
    write_image(tmp_path / "outside.jpg", 1)
    (root / "index.csv").write_text("path,label\ncats/a.jpg,cat\n../outside.jpg,dog\n")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["check-data", str(study_file(tmp_path, root, "  format: csv\n  csv: index.csv\n")),
                              "--quiet"], monkeypatch, capsys)
    assert code == 2, out
    assert (f"error: {root / 'index.csv'}: path '../outside.jpg' escapes the data root {root}; "
            "paths in data files must stay inside it") in err
    assert_kept(before, tmp_path)


# -------------------------------------------------------------------- study-file cases


@pytest.mark.parametrize("text, says", [
    ("train:\n  epoch: 3\n", "train.epoch: unknown key; remove it or check its spelling"),
    ("train:\n  epochs: three\n", "train.epochs: Input should be a valid integer, unable to parse string as an "
                                  "integer (got 'three')"),
    ("data:\n  valid_fraction: 1.5\n", "data.valid_fraction: Input should be less than 1 (got 1.5)"),
    ("search:\n  space:\n    lr: {type: float, low: 0.1, high: 0.01}\n",
     "search.space.lr: low (0.1) must not exceed high (0.01)"),
    ("search:\n  space:\n    learning_rate: {type: float, low: 0.001, high: 0.1}\n",
     "space.learning_rate: unknown parameter; searchable ones are ['aug_strength', 'backbone'"),
    ("train: {epochs: 2\n", "not valid YAML"),
], ids=["unknown-key", "wrong-type", "out-of-range", "empty-range", "unknown-search-param", "not-yaml"])
def test_study_file_error_names_file_and_key_before_anything_runs(text, says, tmp_path, monkeypatch, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: bad\nruns_dir: {tmp_path / 'runs'}\n{text}")
    earlier = tmp_path / "runs" / "bad" / "trials.csv"  # an earlier run's output
    earlier.parent.mkdir(parents=True)
    earlier.write_text("number,state\n0,complete\n")
    before = snapshot(tmp_path / "runs")

    code, out, err = run_cli(["study", str(path)], monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"error: {path}: ") and says in err, err
    assert snapshot(tmp_path / "runs") == before  # nothing lost, nothing started


def test_a_set_override_that_is_not_yaml_names_the_override(tmp_path, monkeypatch, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: bad\nruns_dir: {tmp_path / 'runs'}\n")
    code, out, err = run_cli(["study", str(path), "--set", "lr=[0.1"], monkeypatch, capsys)
    assert code == 2 and "--set 'lr=[0.1'" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_default_outside_its_search_choices_is_refused_at_load(smoke_study):
    try:
        smoke_study(**{"params.backbone": "resnet18"})  # default.yaml searches three other backbones
        message = ""
    except ConfigError as error:
        message = str(error)
    assert "params.backbone" in message and "search.space.backbone" in message, message


# ------------------------------------------------------------------ trials that fail


@pytest.mark.parametrize("param, bad, good, says, extra", [
    ("freeze_k", 99, 1, "freeze 'partial' with k=99: backbone 'resnet10t' has only", {"params.freeze": "partial"}),
    ("loss", "bad_input_nan", "ce", "non-finite loss (nan) at epoch 1, step 1; lower the learning rate or check the data",
     {}),
], ids=["freeze-beyond-the-backbone", "nan-loss"])
def test_a_failed_trial_keeps_its_reason_and_the_study_goes_on(param, bad, good, says, extra, smoke_study, monkeypatch,
                                                              broken_losses):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = smoke_study(**{
        **FAST_TRIAL, **extra, f"params.{param}": bad,  # trial 0 is the study file's defaults: it fails
        "search.space": {param: {"type": "categorical", "choices": [bad, good]}},
        "search.sampler": {"name": "random", "seed": 0}, "search.max_failed": 5})
    study = run_study(cfg, progress=False)

    first = study.trials[0]
    assert first.state == TrialState.FAIL and says in first.user_attrs["reason"]
    result = json.loads((cfg.study_dir / "trials" / "0" / "result.json").read_text())
    assert result["state"] == "failed" and says in result["reason"]
    assert (cfg.study_dir / "trials" / "0" / "config.yaml").is_file()
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 1 and complete[0].params[param] == good  # the study went on to its target
    assert (Path(complete[0].user_attrs["run_dir"]) / "last.pt").is_file()
    table = status(cfg).set_index("trial")
    assert says in table.loc[0, "reason"] and table.loc[complete[0].number, "state"] == "complete"


@contextmanager
def optuna_stderr():
    """What Optuna's own log handler writes (to a user's terminal) while the block runs."""
    buffer = io.StringIO()
    handlers = [h for h in logging.getLogger("optuna").handlers if isinstance(h, logging.StreamHandler)]
    streams = [handler.setStream(buffer) for handler in handlers]
    try:
        yield buffer
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)


def test_too_many_failed_trials_stop_the_study_with_a_message(smoke_study, monkeypatch, capsys, broken_losses):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = smoke_study(**{**FAST_TRIAL, "params.loss": "bad_input_nan", "search.space": {}, "search.max_failed": 1})
    with pytest.raises(StudyError, match=r"^1 trials failed \(search.max_failed = 1\); see their reasons with "
                                         r"`harness status`; the study stops here$"):
        run_study(cfg, progress=False)
    assert "trial    0 failed: " in capsys.readouterr().out
    assert "non-finite loss" in status(cfg).loc[0, "reason"]  # kept for `harness status`


def test_a_failed_trial_is_one_line_not_a_traceback(smoke_study, monkeypatch, capsys, broken_losses):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = smoke_study(**{**FAST_TRIAL, "params.loss": "bad_input_nan", "search.space": {}, "search.max_failed": 1})
    with optuna_stderr() as optuna_said, pytest.raises(StudyError):
        run_study(cfg, progress=False)
    printed = capsys.readouterr().out
    assert "trial    0 failed: " in printed and "non-finite loss (nan)" in printed
    assert "Traceback" not in optuna_said.getvalue(), optuna_said.getvalue()


def test_empty_search_space_runs_trial_zero(smoke_study, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = smoke_study(**FAST_TRIAL, **{"search.space": {}})
    study = run_study(cfg, progress=False)
    assert [(t.state, t.params, t.user_attrs.get("reference")) for t in study.trials] == [
        (TrialState.COMPLETE, {}, True)]


def test_empty_search_space_does_not_repeat_trial_zero(smoke_study, monkeypatch, capsys, caplog):
    """Nothing to search means only trial 0 can run: either the file is refused at load, naming search.space,
    or the study stops after trial 0 and says why. Training the same config N times is neither."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    caplog.set_level(logging.INFO, logger="harness")
    try:
        cfg = smoke_study(**{**FAST_TRIAL, "search.trials": 3}, **{"search.space": {}})
    except ConfigError as error:
        assert "search.space" in str(error) and "search.trials" in str(error)
        return
    study = run_study(cfg, progress=False)
    said = capsys.readouterr().out + caplog.text
    assert len(study.trials) == 1 and study.trials[0].state == TrialState.COMPLETE
    assert "search.space is empty" in said, said


def test_ctrl_c_mid_trial_then_rerun_continues_that_trial(smoke_study, monkeypatch, broken_losses):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = smoke_study(**{**FAST_TRIAL, "train.epochs": 2, "params.loss": "bad_input_ctrl_c",
                         "search.space": {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}}})
    INTERRUPT_AFTER_CHECKPOINT[:] = [cfg.study_dir / "trials" / "0" / "last.pt"]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(cfg, progress=False)  # interrupted in epoch 1, after epoch 0's checkpoint
    finally:
        INTERRUPT_AFTER_CHECKPOINT.clear()
    assert load_checkpoint(cfg.study_dir / "trials" / "0" / "last.pt")["next_epoch"] == 1

    study = run_study(cfg, progress=False)  # the rerun
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t.user_attrs["identity"] for t in finished] == [0], [(t.number, t.state) for t in study.trials]
    assert finished[0].params == {"lr": cfg.params.lr}  # the reference trial, continued
    assert pd.read_csv(cfg.study_dir / "trials" / "0" / "metrics.csv")["epoch"].tolist() == [0, 1]


def test_unreachable_storage_is_a_message_with_the_password_hidden(tmp_path):
    root = write_competition(tmp_path / "data", FOLDERS)
    path = study_file(tmp_path, root)
    earlier = tmp_path / "runs" / "bad-input" / "trials.csv"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("number,state\n0,complete\n")
    before = snapshot(tmp_path / "runs")
    result = harness_subprocess("study", str(path), "--storage", "postgresql://harness:hunter2@127.0.0.1:1/studies")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "error: storage postgresql://harness:***@127.0.0.1:1/studies cannot be opened: OperationalError" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert_kept(before, tmp_path / "runs")


# ----------------------------------------------------------------------- full disk

FULL_DISK = textwrap.dedent("""\
    import json, resource, signal, sys
    import torch
    from harness.io import atomic_torch_save

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        atomic_torch_save({"model": {"w": torch.ones(250_000)}, "next_epoch": 9}, sys.argv[1])
        print(json.dumps({"raised": None}))
    except Exception as error:
        cause = error if isinstance(error, OSError) else error.__context__
        print(json.dumps({"raised": type(error).__name__, "is_oserror": isinstance(error, OSError),
                          "errno": getattr(error, "errno", None), "cause_errno": getattr(cause, "errno", None),
                          "message": str(error)}))
    """)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A good last.pt, then a bigger one written over it by a process that may not write past 100 kB."""
    folder = tmp_path_factory.mktemp("full-disk")
    last = folder / "last.pt"
    atomic_torch_save({"model": {"w": torch.arange(10.0)}, "next_epoch": 3}, last)
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(last)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr
    return folder, json.loads(run.stdout.strip().splitlines()[-1])


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(full_disk):
    folder, outcome = full_disk
    assert outcome["raised"] and outcome["cause_errno"] == errno.EFBIG, outcome
    state = load_checkpoint(folder / "last.pt")
    assert state["next_epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(10.0))
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]  # the half-written temp file is gone


def test_full_disk_error_names_the_file_and_the_cause(full_disk):
    folder, outcome = full_disk
    assert outcome["is_oserror"] and outcome["errno"] == errno.EFBIG, outcome
    assert "last.pt" in outcome["message"], outcome


# ------------------------------------------------------------------------------ W&B


@pytest.mark.parametrize("provoke", ["WANDB_MODE=bogus", "wandb-folder-is-a-file"])
def test_wandb_failure_is_a_warning_and_the_trial_completes(provoke, smoke_study, monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="harness.tracking")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    cfg = smoke_study(**{**FAST_TRIAL, "tracking.mode": "offline", "search.space": {}})
    blocker = cfg.study_dir / "wandb"
    if provoke == "WANDB_MODE=bogus":
        monkeypatch.setenv("WANDB_MODE", "bogus")
    else:
        monkeypatch.delenv("WANDB_MODE", raising=False)
        blocker.parent.mkdir(parents=True)
        blocker.write_text("a file where W&B's folder should be\n")
    study = run_study(cfg, progress=False)

    frame = trials_frame(study)
    assert frame["state"].tolist() == ["complete"]
    trial = cfg.study_dir / "trials" / "0"
    assert pd.read_csv(trial / "metrics.csv")["epoch"].tolist() == [0] and (trial / "last.pt").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name == "harness.tracking"]
    assert any(f"W&B init failed for run {run_id_for(study_key(cfg), 0)}" in w and "training goes on" in w
               for w in warnings), warnings
    assert not list(tmp_path.rglob("*.wandb"))
    if provoke != "WANDB_MODE=bogus":
        assert blocker.read_text() == "a file where W&B's folder should be\n"
