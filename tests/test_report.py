"""The HTML report: one offline file, every figure drawn by a real browser without a JavaScript error.

The browser tests open the report in headless Chromium (Debian's `chromium` package) with
every host name unresolvable, so anything that tried the network would fail to load and be
counted. The report's own watchdog script writes the error count and the number of drawn
plots onto <html>; `--dump-dom` hands back that DOM after the page has run.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plotly.offline import get_plotlyjs

from conftest import CHROMIUM, ENABLE_BROWSER_TESTS
from harness.bench.report import bench_study_config, make_fake_study, write_fake_ensemble
from harness.config import ConfigError
from harness.report import IMPORTANCE_MIN_TRIALS, WATCHDOG_JS, external_references, write_report
from harness.study import trials_frame

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=f"no chromium on PATH: `{ENABLE_BROWSER_TESTS}`")
ALWAYS = {"history", "parallel", "overfitting", "background", "curves", "per_class_f1", "confusion_best"}
HOSTILE = '</script><script>document.documentElement.dataset.pwned="1"</script><b onmouseover=alert(1)>x'


# ------------------------------------------------------------------------------ browser


def chromium(tmp_path: Path, page: Path, *action: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any network request fails (and is counted)
               "--virtual-time-budget=10000", *action, page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def render(tmp_path: Path, page: Path) -> tuple[dict[str, str], str, str]:
    """The <html> element's data attributes after the page ran, the whole DOM, and chromium's log."""
    done = chromium(tmp_path, page, "--dump-dom")
    opening = re.search(r"<html([^>]*)>", done.stdout)
    assert opening, f"chromium returned no DOM:\n{done.stdout[:500]}\n{done.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', opening.group(1)))
    return attrs, done.stdout, done.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and "Uncaught" in line]


def assert_all_figures_drawn(tmp_path: Path, page: Path, expected: set[str]) -> str:
    attrs, dom, log = render(tmp_path, page)
    assert attrs.get("checked") == "1", f"the watchdog never ran after load: {attrs}"
    assert attrs["js-errors"] == "0", f"JavaScript errors: {attrs.get('js-error-messages')}"
    assert not console_errors(log), console_errors(log)
    assert int(attrs["figures"]) == int(attrs["plots-total"]) == int(attrs["plots-drawn"]) == len(expected), attrs
    assert set(re.findall(r'data-figure="([^"]+)"', dom)) == expected
    return dom


# ------------------------------------------------------------------------------ helpers


def figure_names(page: str) -> set[str]:
    return set(re.findall(r'data-figure="([^"]+)"', page))


def expected_figures(study, ensemble: bool, intervals: bool = True) -> set[str]:
    """`intervals`: the trials have stored valid predictions (real trials do; the bench's fake ones do not)."""
    values = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    importances = {"importances"} if len(values) >= IMPORTANCE_MIN_TRIALS and np.std(values) > 0 else set()
    return (ALWAYS | importances | ({"confusion_ensemble"} if ensemble else set())
            | ({"intervals"} if intervals else set()))


def cell(label: str, value) -> str:
    return f"<th>{label}</th><td>{value}</td>"


# -------------------------------------------------------------------------------- tests


@needs_chromium
def test_the_watchdog_counts_script_errors_and_network_loads(tmp_path):
    """Guards the browser checks below against passing vacuously."""
    page = tmp_path / "broken.html"
    page.write_text(f"<!DOCTYPE html><html><head><script>{WATCHDOG_JS}</script></head><body>"
                    '<img src="https://example.invalid/x.png"><script>notDefined();</script></body></html>')
    attrs, _, log = render(tmp_path, page)
    assert attrs["js-errors"] == "2" and attrs["checked"] == "1"
    assert "notDefined" in attrs["js-error-messages"] and "example.invalid" in attrs["js-error-messages"]
    assert len(console_errors(log)) == 1


@needs_chromium
def test_report_of_a_smoke_study_draws_every_figure_offline(smoke_study, tmp_path):
    from harness.data.prepare import prepare_data
    from harness.promotion.ensemble import run_ensemble
    from harness.study import run_study

    cfg = smoke_study()
    study = run_study(cfg, progress=False)
    path = write_report(cfg)
    page = path.read_text()
    assert path == cfg.study_dir / "report.html"
    assert "no ensemble yet" in page
    assert_all_figures_drawn(tmp_path, path, expected_figures(study, ensemble=False))

    # the data section counts the same persons and images as the study's split
    data = prepare_data(cfg, progress=False)
    persons = {part: len(data.split.persons(data.frame, part)) for part in ("train", "valid")}
    assert cell("persons valid", persons["valid"]) in page and cell("persons train", persons["train"]) in page
    assert cell("images valid", len(data.split.valid)) in page and cell("split hash", data.split.hash) in page
    assert "the study was created with" not in page  # the split read now is the study's
    assert f"Study {cfg.name}</h1>" in page and "best robust/f1: 0." in page
    assert "no trial has an eval F1" in page  # the truth section, before the trials are scored on eval
    shortcuts = page[page.index('<section id="shortcuts">'):]
    shortcuts = shortcuts[:shortcuts.index("</section>")]
    assert "the person-based probe and remedies apply" in shortcuts and "context audit: " in shortcuts
    assert shortcuts.count("<tr><td>as loaded</td>") == 3  # mask, gender, age

    run_ensemble(cfg, log_to_wandb=False)
    page = write_report(cfg).read_text()
    assert "no ensemble yet" not in page and "Honest score" in page
    members = (cfg.study_dir / "ensemble" / "members.json").read_text()
    for trial in re.findall(r'"trial": (\d+)', members):
        assert f"<tr><td>{trial}</td>" in page
    assert_all_figures_drawn(tmp_path, path, expected_figures(study, ensemble=True))
    assert_screenshot_shows_a_page(tmp_path, path)


def assert_screenshot_shows_a_page(tmp_path: Path, path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(tmp_path, path, "--hide-scrollbars", "--window-size=1400,4000", f"--screenshot={shot}")
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (4000, 1400)
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few kB
    colours = np.unique(image[::4, ::4].reshape(-1, 3), axis=0)
    assert len(colours) > 200 and image.std() > 10, "the screenshot is (nearly) one colour"


def test_report_is_one_self_contained_file(tmp_path):
    cfg = bench_study_config(tmp_path / "runs", name="fake")
    study = make_fake_study(cfg, trials=12)
    write_fake_ensemble(cfg, study)
    page = write_report(cfg).read_text()
    plotly = get_plotlyjs()
    assert page.count(plotly[:2000]) == 1 and page.count(plotly[-2000:]) == 1  # inlined, once
    assert external_references(page) == []
    assert not re.search(r"<script[^>]*\bsrc=", page) and not re.search(r"<link[^>]*\bhref=", page)
    assert "@import" not in page and "fonts.googleapis" not in page
    assert figure_names(page) == expected_figures(study, ensemble=True, intervals=False)
    assert "trials: 12 (" in page
    assert sorted(p.name for p in cfg.study_dir.iterdir()) == ["ensemble", "report.html", "study.db", "trials"]


@needs_chromium
def test_user_strings_are_escaped_and_secrets_kept_out(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k-very-secret-0123456789")
    cfg = bench_study_config(tmp_path / "runs", name="hostile")
    choices = cfg.search.space["backbone"].choices
    cfg = cfg.replace({"search.space.backbone.choices": [*choices, HOSTILE],
                       "tracking.entity": "k-very-secret-0123456789"})  # a key pasted into the wrong field
    study = make_fake_study(cfg, trials=12, hostile=HOSTILE, with_data_summary=False)
    path = write_report(cfg)
    page = path.read_text()
    assert HOSTILE not in page and "k-very-secret" not in page
    assert "&lt;/script&gt;&lt;script&gt;document.documentElement.dataset.pwned" in page  # shown, as text
    assert "no data summary: the data root" in page and "no ensemble yet" in page
    dom = assert_all_figures_drawn(tmp_path, path, expected_figures(study, ensemble=False, intervals=False))
    assert "pwned" not in re.search(r"<html[^>]*>", dom).group(0)


@pytest.mark.parametrize("trials", [1, 3])
def test_too_few_complete_trials_explain_the_missing_importances(tmp_path, trials):
    cfg = bench_study_config(tmp_path / "runs", name="few")
    make_fake_study(cfg, trials=trials)
    page = write_report(cfg).read_text()
    assert f"they need at least {IMPORTANCE_MIN_TRIALS} complete trials" in page
    assert "importances" not in figure_names(page) and "history" in figure_names(page)


def test_a_study_that_does_not_exist_is_a_clear_error(tmp_path):
    cfg = bench_study_config(tmp_path / "runs", name="missing")
    with pytest.raises(ConfigError, match=r"no study 'missing' yet .* run `harness study` first"):
        write_report(cfg)


def test_a_study_without_finished_trials_gets_notes_instead_of_figures(tmp_path):
    import optuna

    from harness.runtime import default_storage

    cfg = bench_study_config(tmp_path / "runs", name="empty")
    cfg.study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=cfg.name, storage=default_storage(cfg), direction="maximize")
    study.enqueue_trial({"lr": 0.002})  # what a new study holds before its first trial runs
    page = write_report(cfg).read_text()
    assert figure_names(page) == set()
    assert "no complete trial yet" in page and "no trial has a metrics.csv yet" in page
    assert "trials: 1 (1 waiting)" in page and "best robust/f1: –" in page


def test_the_truth_section_plots_the_objective_against_eval_f1_and_shows_the_remedies(tmp_path):
    cfg = bench_study_config(tmp_path / "runs", name="truth")
    study = make_fake_study(cfg, trials=12)
    frame = trials_frame(study)
    finished = frame[frame["objective"].notna()]
    study.set_user_attr("eval_f1", {str(t): float(v) - 0.05 for t, v in zip(finished["trial"], finished["objective"])})
    (cfg.study_dir / "remedies.json").write_text(json.dumps({"note": "two seeds", "seeds": 2, "rows": [
        {"remedy": "none", "preprocess": "none", "bgswap_p": 0.0, "val_f1": 0.7, "val_f1_bgswap": 0.2, "eval_f1": 0.18},
        {"remedy": "remove_background", "preprocess": "remove_background", "bgswap_p": 0.0, "val_f1": 0.75,
         "val_f1_bgswap": 0.75, "eval_f1": 0.67}]}))
    page = write_report(cfg).read_text()
    assert "truth" in figure_names(page)
    assert "Spearman correlation with eval F1 over" in page and "robust/f1 1.00." in page  # eval = objective - 0.05
    assert "(+0.0500)" in page  # the best trial's objective minus its own eval F1
    assert "Remedies for the background shortcut" in page and "<td>remove_background</td>" in page
    assert "<td>0.6700</td>" in page
