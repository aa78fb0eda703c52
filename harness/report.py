"""`harness report STUDY.yaml`: one self-contained HTML file about a study, readable offline.

`write_report(cfg)` writes runs/<study>/report.html with Plotly's JavaScript inlined once in
the head and every figure drawn from JSON beside it, so the file opens from a laptop, a
mail attachment or an air-gapped machine: no CDN, no web fonts, no network at all. Sections:

    search      optimization history, parameter importances, parallel coordinates of the
                objective (Optuna's own plots), the overfitting map (val F1 against gap/f1)
                and the background-reliance map (val F1 against gap/bgswap)
    truth       where eval/gt.csv exists: each trial's objective and val F1 against its eval F1,
                with their rank correlations; the remedies table (`harness remedies`)
    curves      train-probe F1, val F1 and gap per epoch of the top trials (their metrics.csv)
    classes     per-class F1 and confusion matrices of the best trial and of the ensemble
    ensemble    members, weights and honest scores (runs/<study>/ensemble/), or "no ensemble yet"
    promotion   `harness promote`: cross-validated F1 with its interval per configuration beside the
                single-split figures, and the label audit's most suspicious rows with thumbnails
    trials      every trial's figures with its objective's person-bootstrap interval (and whether it
                can be told apart from the best), params and failure reason
    data        persons, images and class counts of train/valid, the split hash
    settings    the resolved study file as YAML (secrets stripped)

The data summary is taken from the study's "data_summary" attribute (see `data_summary`) when
it is there, else computed from the data index (no image decoding), else skipped with a note;
the report never needs the decoded-image cache. A small inline script records JavaScript
errors and how many plots were drawn on the <html> element (`data-js-errors`,
`data-plots-drawn`), which the browser test reads back.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

import harness
from harness.config import StudyConfig
from harness.data.prepare import class_names, data_summary
from harness.folders import EnsembleFolder, PromotionFolder, StudyFolder, TrialFolder
from harness.io import atomic_write_text
from harness.records import shown_figures
from harness.remedies import read_remedies
from harness.runtime import default_storage, load_existing_study, redact
from harness.store import find_trial_folder
from harness.study import scored_frame
from harness.tracking import describe_states, strip_secrets

AUDIT_ROWS = 24  # label-audit rows shown with thumbnails
THUMBNAIL_PX = 96
TOP_CURVES = 5  # learning curves of this many best trials
STATE_COLOURS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "failed": "#d62728", "running": "#7f7f7f",
                 "waiting": "#bcbd22"}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
EXTERNAL_REFERENCE = re.compile(r"""<(?:script|link|img|iframe|source|embed|object)\b[^>]*?"""
                                r"""\b(?:src|href|data)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


# ------------------------------------------------------------------------ page pieces


@dataclass
class Section:
    """One titled part of the page: HTML blocks, some of them figures."""

    anchor: str
    title: str
    blocks: list[str] = field(default_factory=list)

    def figure(self, name: str, fig, note: str = "") -> None:
        body = fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG, div_id=f"fig-{name}")
        caption = f'<p class="caption">{esc(note)}</p>' if note else ""
        self.blocks.append(f'<div class="figure" data-figure="{esc(name)}">{body}{caption}</div>')

    def note(self, text: str) -> None:
        self.blocks.append(f'<p class="note">{esc(text)}</p>')

    def html(self, raw: str) -> None:
        self.blocks.append(raw)

    def render(self) -> str:
        return f'<section id="{self.anchor}"><h2>{esc(self.title)}</h2>\n' + "\n".join(self.blocks) + "</section>"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, NaN and None as a dash, everything escaped."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(fmt(v, digits) for v in value)
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return table(value)  # e.g. the ensemble's per-half scores
    if isinstance(value, dict | list):
        return f"<code>{esc(json.dumps(value, default=str))}</code>"
    return esc(value)


def table(rows: list[dict], columns: list[str] | None = None, css: str = "") -> str:
    if not rows:
        return '<p class="note">(none)</p>'
    columns = columns or list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def key_values(pairs: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v)}</td></tr>" for k, v in pairs.items())
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def external_references(page: str) -> list[str]:
    """Tags that would load something from the network (must be none: the report opens offline)."""
    return [match.group(0) for match in EXTERNAL_REFERENCE.finditer(page)]


# ---------------------------------------------------------------------- trial folders


def trial_folder(cfg: StudyConfig, row: pd.Series | dict) -> TrialFolder | None:
    """The trial's folder: the one recorded with it, else runs/<study>/trials/<identity>/."""
    folder, _ = find_trial_folder(cfg, row.get("run_dir") or None, int(row["trial"]))
    return folder


def hover_text(row: pd.Series | dict, params: list[str]) -> str:
    """Trial number, state and params for a point's hover label (user strings escaped: Plotly reads tags)."""
    lines = [f"trial {int(row['trial'])} ({row['state']})"]
    for name in params:
        value = row.get(f"param_{name}")
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            lines.append(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    return "<br>".join(esc(line) for line in lines)


# ------------------------------------------------------------------------ data summary


def summarize_data(cfg: StudyConfig, study: optuna.Study) -> tuple[dict | None, str, list[str]]:
    """The data summary, where it came from, and warnings (or why there is none). Never decodes images."""
    stored = study.user_attrs.get("data_summary")
    if isinstance(stored, dict):
        return stored, "as stored with the study when it was created", []
    root = Path(cfg.data.root)
    if not root.exists():
        return None, "", [f"no data summary: the data root {root} does not exist here and the study stores none"]
    from harness.data.readers import DataError, read_train
    from harness.data.split import split_by_person

    try:
        index = read_train(cfg.data)  # the same index and split prepare_data makes, without the image cache
        summary = data_summary(index.frame, split_by_person(index.frame, cfg.data.valid_fraction, cfg.data.split_seed))
    except (DataError, ValueError, OSError) as error:
        return None, "", [f"no data summary: reading {root} failed: {error}"]
    problems = [f"{len(index.errors)} data problem(s) in {root}: run `harness check-data`"] if index.errors else []
    stored_hash = study.user_attrs.get("split_hash")
    if stored_hash and stored_hash != summary["split_hash"]:
        problems.append(f"the data splits to hash {summary['split_hash']} now, the study was created with "
                         f"{stored_hash}: the data changed, or images were excluded when the cache was built")
    return summary, f"read from {root} now (the study stores no summary)", problems


# ---------------------------------------------------------------------------- ensemble


@dataclass
class Ensemble:
    members: dict | None = None
    metrics: dict | None = None
    per_class_f1: np.ndarray | None = None
    confusion: np.ndarray | None = None
    eval_metrics: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.members is not None or self.metrics is not None


def read_ensemble(folder: EnsembleFolder) -> Ensemble:
    """What harness.promotion.ensemble wrote under runs/<study>/ensemble/; a broken file is a note, not a crash."""
    found, problems = folder.read()
    return Ensemble(**found, problems=problems)


# ------------------------------------------------------------------------------ figures


def search_section(cfg: StudyConfig, study: optuna.Study, frame: pd.DataFrame) -> Section:
    section = Section("search", "Search")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        section.note("no complete trial yet: the optimization history, importances and parallel coordinates "
                     "appear once one finishes")
    else:
        target = cfg.search.objective
        section.figure("history", optuna.visualization.plot_optimization_history(study, target_name=target))
        add_importances(section, study, complete, target)
        add_parallel_coordinates(section, cfg, study, complete, target)
    params = searched_params(cfg, frame)
    add_map(section, "overfitting", frame, "gap_f1", "gap/f1 (train-probe F1 − val F1)", params,
            "Right of zero the model fits its train persons better than new ones; far right is memorising.")
    add_map(section, "background", frame, "gap_bgswap",
            "gap/bgswap (val F1 − val F1 with each person on another valid person's background)", params,
            "Far right: the score leans on the background around the person (the competition's known trap); "
            "what is left at the top left is what survives new backgrounds.")
    return section


# fANOVA fits a random forest to (params -> objective) of the complete trials; on fewer trials than this the
# forest splits on whatever separates a handful of points, and its ranking is noise presented as a finding
IMPORTANCE_MIN_TRIALS = 8


def add_importances(section: Section, study: optuna.Study, complete: list, target: str) -> None:
    values = [t.value for t in complete]
    if len(complete) < IMPORTANCE_MIN_TRIALS or float(np.std(values)) == 0.0:
        section.note(f"parameter importances are not shown: they need at least {IMPORTANCE_MIN_TRIALS} complete "
                     f"trials with different {target} ({len(complete)} complete so far); on fewer, the forest "
                     "behind them ranks whatever separates a handful of points")
        return
    # Optuna warns (to stderr) when a conditional param has few trials; the reader should see that instead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fig = optuna.visualization.plot_param_importances(study, target_name=target)
        except (RuntimeError, ValueError) as error:  # e.g. every complete trial has the same params
            section.note(f"parameter importances could not be computed: {error}")
            return
    doubts = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    section.figure("importances", fig, " ".join([f"Importance of each param for {target} (Optuna's default "
                                                  "evaluator).", *doubts]))


def add_parallel_coordinates(section: Section, cfg: StudyConfig, study: optuna.Study, complete: list,
                             target: str) -> None:
    seen = {name for t in complete for name in t.params}
    axes = [name for name in cfg.search.space if name in seen] or None  # None: whatever the trials have
    fig = optuna.visualization.plot_parallel_coordinate(study, params=axes, target_name=target)
    section.figure("parallel", fig)


def searched_params(cfg: StudyConfig, frame: pd.DataFrame) -> list[str]:
    return [name for name in cfg.search.space if f"param_{name}" in frame.columns]


def add_map(section: Section, name: str, frame: pd.DataFrame, x: str, x_title: str, params: list[str],
            note: str) -> None:
    import plotly.graph_objects as go

    if frame.empty:
        return
    shown = frame[np.isfinite(frame["val_f1"].astype(float)) & np.isfinite(frame[x].astype(float))]
    if shown.empty:
        section.note(f"no trial has both val F1 and {x.replace('_', '/')} yet")
        return
    fig = go.Figure()
    for state, rows in shown.groupby("state", sort=False):
        fig.add_trace(go.Scatter(
            x=rows[x], y=rows["val_f1"], mode="markers", name=state,
            marker={"size": 10, "color": STATE_COLOURS.get(state, "#17becf"), "line": {"width": 1, "color": "white"}},
            text=[hover_text(r, params) for _, r in rows.iterrows()],
            hovertemplate="%{text}<br>" + esc(x) + " %{x:.4f}<br>val F1 %{y:.4f}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dot", line_color="#888")
    fig.update_layout(title=f"val F1 against {x.replace('_', '/')}", xaxis_title=x_title, yaxis_title="val F1",
                      height=460, legend_title="state")
    hidden = len(frame) - len(shown)
    section.figure(name, fig, note + (f" {hidden} trial(s) without figures are not shown." if hidden else ""))


def truth_section(cfg: StudyConfig, frame: pd.DataFrame, remedies: dict | None) -> Section:
    """Does the objective predict the truth? Each trial's objective and val F1 against its eval F1."""
    import plotly.graph_objects as go
    from scipy.stats import spearmanr

    from harness.data.readers import truth_source

    truth = truth_source(cfg.data)
    section = Section("truth", f"Valid against the truth ({truth})")
    scored = frame[np.isfinite(frame["eval_f1"].astype(float)) & np.isfinite(frame["objective"].astype(float))] \
        if not frame.empty else frame
    if scored.empty:
        section.note("no trial has an eval F1: only a held-out set with known labels (the competition's "
                     "eval/gt.csv, which the synthetic data has; a labelled data.test) is scored against the truth, "
                     "after `harness study`")
    else:
        params = searched_params(cfg, frame)
        fig = go.Figure()
        for column, label, symbol in (("objective", cfg.search.objective, "circle"), ("val_f1", "val/f1", "x")):
            fig.add_trace(go.Scatter(
                x=scored["eval_f1"], y=scored[column], mode="markers", name=label, marker={"size": 10, "symbol": symbol},
                text=[hover_text(r, params) for _, r in scored.iterrows()],
                hovertemplate="%{text}<br>eval F1 %{x:.4f}<br>" + esc(label) + " %{y:.4f}<extra></extra>"))
        low = float(min(scored["eval_f1"].min(), scored[["objective", "val_f1"]].min().min(), 0.0))
        fig.add_trace(go.Scatter(x=[low, 1], y=[low, 1], mode="lines", name="= eval F1",
                                 line={"dash": "dot", "color": "#888"}, hoverinfo="skip"))
        fig.update_layout(title="what the study ranks by, against the truth", xaxis_title=f"eval F1 ({truth})",
                          yaxis_title="score on valid", height=480)
        complete = scored[scored["state"] == "complete"]
        facts = []
        if len(complete) >= 3:
            for column, label in (("objective", cfg.search.objective), ("val_f1", "val/f1")):
                rho = spearmanr(complete[column], complete["eval_f1"]).statistic
                facts.append(f"Spearman correlation with eval F1 over {len(complete)} complete trials: {label} "
                             f"{rho:.2f}.")
        best = scored.iloc[0]  # trials_frame sorts by the objective
        facts.append(f"The best trial ({int(best['trial'])}) scores {best['objective']:.4f} on the objective and "
                     f"{best['eval_f1']:.4f} on eval ({best['objective'] - best['eval_f1']:+.4f}).")
        section.figure("truth", fig, "On the dotted line a valid score predicts the eval score; above it, valid "
                                     "flatters. " + " ".join(facts))
    if remedies:
        section.html("<h3>Remedies for the background shortcut, at the same budget</h3>"
                     f"<p class='caption'>{esc(remedies.get('note', ''))}</p>" +
                     table(remedies["rows"], ["remedy", "preprocess", "bgswap_p", "val_f1", "val_f1_bgswap",
                                              "eval_f1", "eval_f1_mask", "eval_f1_gender", "eval_f1_age", "reason"]))
    return section


def curves_section(cfg: StudyConfig, frame: pd.DataFrame) -> Section:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    section = Section("curves", f"Learning curves of the top {TOP_CURVES} trials")
    ranked = frame[np.isfinite(frame["objective"].astype(float))] if not frame.empty else frame
    curves = []
    for _, row in ranked.iterrows():
        folder = trial_folder(cfg, row)
        metrics = folder.metrics() if folder is not None else None
        if metrics is not None:
            curves.append((row, metrics))
        if len(curves) == TOP_CURVES:
            break
    if not curves:
        section.note(f"no trial has a {TrialFolder.METRICS} yet")
        return section
    panels = [("train/f1_probe", "train-probe F1"), ("val/f1", "val F1"), ("gap/f1", "gap/f1 (probe − val)")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title in panels], horizontal_spacing=0.07)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for index, (row, metrics) in enumerate(curves):
        label = f"trial {int(row['trial'])}"
        for col, (column, _) in enumerate(panels, start=1):
            if column not in metrics:
                continue
            fig.add_trace(go.Scatter(x=metrics["epoch"] + 1, y=metrics[column], mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=col == 1,
                                     line={"color": palette[index % len(palette)]},
                                     hovertemplate=f"{label}<br>epoch %{{x}}<br>{column} %{{y:.4f}}<extra></extra>"),
                          row=1, col=col)
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_layout(height=420, legend_title="best first")
    section.figure("curves", fig, "Click a trial in the legend to hide it in all three panels.")
    return section


def classes_section(cfg: StudyConfig, frame: pd.DataFrame, ensemble: Ensemble, summary: dict | None) -> Section:
    section = Section("classes", "Per-class F1 and confusion")
    best = best_complete(frame)
    folder = trial_folder(cfg, best) if best is not None else None
    rows, labels = [], []
    best_confusion = None
    if folder is not None:
        per_class = folder.per_class_f1()
        best_confusion = folder.confusion()
        if per_class is not None:
            rows.append(per_class)
            labels.append(f"best trial {int(best['trial'])}")
    if ensemble.per_class_f1 is not None:
        rows.append(ensemble.per_class_f1)
        labels.append("ensemble")
    if rows and len({len(r) for r in rows}) == 1:
        section.figure("per_class_f1", per_class_heatmap(rows, labels, class_names(summary, len(rows[0]))))
    else:
        section.note("no per-class F1 yet (written with a trial's best epoch)")
    if best_confusion is not None:
        title = f"confusion on valid, best trial {int(best['trial'])}"
        section.figure("confusion_best", confusion_heatmap(best_confusion, class_names(summary, len(best_confusion)),
                                                           title))
    if ensemble.confusion is not None:
        section.figure("confusion_ensemble", confusion_heatmap(
            ensemble.confusion, class_names(summary, len(ensemble.confusion)), "confusion on valid, ensemble"))
    elif not ensemble.exists:
        section.note("no ensemble yet: its per-class F1 and confusion matrix appear after `harness ensemble`")
    return section


def best_complete(frame: pd.DataFrame) -> pd.Series | None:
    if frame.empty:
        return None
    complete = frame[(frame["state"] == "complete") & np.isfinite(frame["objective"].astype(float))]
    return complete.iloc[0] if not complete.empty else None


def per_class_heatmap(rows: list[np.ndarray], labels: list[str], names: list[str]):
    import plotly.graph_objects as go

    z = np.vstack(rows).astype(float)
    fig = go.Figure(go.Heatmap(z=z, x=names, y=labels, zmin=0, zmax=1, colorscale="Viridis",
                               text=np.round(z, 2), texttemplate="%{text:.2f}",
                               hovertemplate="%{y}<br>%{x}<br>F1 %{z:.4f}<extra></extra>"))
    fig.update_layout(title="per-class F1 on valid", height=220 + 60 * len(rows), xaxis_tickangle=-40,
                      yaxis_autorange="reversed")
    return fig


def confusion_heatmap(matrix: np.ndarray, names: list[str], title: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=matrix, x=names, y=names, colorscale="Blues", texttemplate="%{z}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>"))
    fig.update_layout(title=title, height=680, xaxis_title="predicted", yaxis_title="true", xaxis_tickangle=-40,
                      yaxis_autorange="reversed")
    return fig


# ------------------------------------------------------------------------------ tables


def ensemble_section(ensemble: Ensemble) -> Section:
    section = Section("ensemble", "Ensemble")
    for problem in ensemble.problems:
        section.note(problem)
    if not ensemble.exists:
        section.note("no ensemble yet: run `harness ensemble STUDY.yaml` to promote the best trials")
        return section
    members = ensemble.members or {}
    if members:
        section.html("<h3>Members</h3>" + table(members.get("members", []),
                                                ["trial", "weight", "objective", "val_f1", "gap_f1", "run_dir"]))
        section.html(key_values({k: v for k, v in members.items() if k != "members"}))
    metrics = ensemble.metrics or {}
    if "honest" in metrics:
        section.html("<h3>Honest score</h3><p class='caption'>Weights chosen on one half of the valid persons, "
                     "scored on the other: what to expect on new persons.</p>" + key_values(metrics["honest"]))
    if "fitted_on_all_valid" in metrics:
        section.html("<h3>Fitted on all of valid</h3><p class='caption'>Chosen and scored on the same persons: "
                     "optimistic.</p>" + key_values(metrics["fitted_on_all_valid"]))
    rest = {k: v for k, v in metrics.items() if k not in ("honest", "fitted_on_all_valid")}
    if rest:
        section.html(key_values(rest))
    return section


def trials_section(cfg: StudyConfig, frame: pd.DataFrame) -> Section:
    section = Section("trials", "Trials")
    if frame.empty:
        section.note("no trials yet")
        return section
    add_intervals(section, frame)
    section.html(f'<p class="caption">{esc(describe_states(frame, cfg))}</p>')
    columns = ["trial", "state", *shown_figures(frame), "best_epoch", "epochs", "duration_s"]
    columns += [c for c in frame.columns if c.startswith("param_")] + ["machine", "stored", "wandb_run_id", "wandb", "reason"]
    shown = frame[[c for c in columns if c in frame]].astype(object)
    for name, spec in cfg.search.space.items():  # a conditional int param is float in the frame (NaN where inactive)
        if spec.type == "int" and f"param_{name}" in shown:
            shown[f"param_{name}"] = [int(v) if isinstance(v, float) and math.isfinite(v) else v
                                      for v in shown[f"param_{name}"]]
    rows = shown.rename(columns=lambda c: c.removeprefix("param_")).to_dict("records")
    section.html('<div class="scroll">' + table(rows, css="trials") + "</div>")
    return section


def add_intervals(section: Section, frame: pd.DataFrame) -> None:
    """Each trial's objective with its 95% person-bootstrap interval; the ones tied with the best stand out."""
    import plotly.graph_objects as go

    shown = frame[frame["objective_low"].notna()].sort_values("trial")
    if shown.empty:
        return
    tied = shown["tied_with_best"].astype(bool)
    fig = go.Figure()
    for mask, name, colour in ((tied, "cannot be told apart from the best", "#1f77b4"),
                               (~tied, "worse than the best", "#bbbbbb")):
        part = shown[mask]
        fig.add_trace(go.Scatter(
            x=part["trial"], y=part["objective"], mode="markers", name=name, marker={"color": colour, "size": 9},
            error_y={"type": "data", "symmetric": False, "array": part["objective_high"] - part["objective"],
                     "arrayminus": part["objective"] - part["objective_low"]}))
    fig.update_layout(xaxis_title="trial", yaxis_title="objective on valid", height=360, margin={"t": 30})
    from harness.uncertainty import winner_certainty

    section.figure("intervals", fig, "95% person-bootstrap intervals (persons resampled, their images weighted); "
                                     "tied: the paired interval of the difference from the best holds 0. "
                                     + (winner_certainty(frame) or ""))


def promotion_section(cfg: StudyConfig) -> Section:
    from harness.promotion.audit import read_issues
    from harness.promotion.folds import describe_estimate

    section = Section("promotion", "Promotion")
    folder = PromotionFolder.of(cfg)
    try:
        summary = folder.summary()
    except OSError as error:
        section.note(str(error))
        return section
    if summary is None:
        section.note("no promotion yet: `harness promote STUDY.yaml` retrains the best configurations on "
                     "person-grouped folds and audits the labels")
        return section
    low, high = summary["cv_f1_ci95"]
    if estimate := describe_estimate(summary):
        section.html(f"<p class='estimate'><b>Estimate of the submission:</b> {html.escape(estimate)}. The "
                     "out-of-fold figures it was made from follow.</p>")
    section.html(key_values({"folds": summary["folds"], "persons": summary["n_persons"], "images": summary["n_images"],
                             "cv F1 (honest, all persons)": f"{fmt(summary['cv_f1'])} [{fmt(low)}, {fmt(high)}]",
                             "cv F1 on the audit's corrected labels": fmt(summary.get("cv_f1_corrected_labels")),
                             "single-split ensemble (honest)": summary["single_split"].get("ensemble_honest"),
                             "members": ", ".join(f"trial {m['trial']} x{m['weight']}" for m in summary["members"])}))
    rows = [{"trial": c["trial"], "weight": c["weight"], "one fold model cv_f1": c["cv_f1"], "cv_low": c["cv_f1_ci95"][0],
             "cv_high": c["cv_f1_ci95"][1], "single objective": c["single_split"]["objective"],
             "single val_f1": c["single_split"]["val_f1"], "state": c["single_split"]["state"]}
            for c in summary["configs"]]
    section.html("<h3>Configurations</h3><p class='caption'>Out-of-fold F1 of each configuration over every labelled "
                 "person, 95% person-bootstrap interval, beside its figures on the single valid split.</p>" + table(rows))
    issues = read_issues(folder)
    if issues is not None and not issues.empty:
        section.html(audit_gallery(issues.head(AUDIT_ROWS), len(issues),
                                   summary.get("label_issues", {}).get("method", "cleanlab find_label_issues")))
    return section


def budget_section(record: dict) -> Section:
    """What a budgeted `make study` planned, what each step took and what the budget left out (harness.budget)."""
    from harness.budget import describe

    section = Section("budget", "Budget")
    section.html(f"<p class='budget'>{esc(describe(record))}</p>")
    left_out = record.get("left_out") or []
    section.html("<h3>Left out by the budget</h3>" + (
        "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in left_out) + "</ul>" if left_out else "<p>nothing</p>"))
    steps = [{"step": name, "seconds": seconds} for name, seconds in record.get("steps", {}).items()]
    section.html("<h3>Steps</h3><p class='caption'>Seconds each step took (the report, the last one, is written "
                 "before its own time is known).</p>" + table(steps))
    plans = [{k: v for k, v in plan.items() if not isinstance(v, dict)} for plan in record.get("plans", [])]
    section.html("<h3>Plans</h3><p class='caption'>The plan at the start and each revision after a trial: seconds "
                 "since the start, the search's time left, the promotion's reserve, the steps after the search and "
                 "the expected end.</p>" + table(plans))
    return section


def held_out_section(cfg: StudyConfig, summary: dict | None) -> Section:
    """The last scored prediction of the held-out set (`harness predict`): macro and per-class F1, confusion."""
    from harness.data.readers import truth_source
    from harness.predict import held_out_scores

    section = Section("held_out", "Held-out set")
    found = held_out_scores(cfg)
    if found is None:
        section.note("no scored prediction of a held-out set yet: `harness predict STUDY.yaml` scores the "
                     "competition's eval/ against eval/gt.csv, or a labelled data.test set")
        return section
    source, scores = found
    section.html(key_values({"macro F1": fmt(scores["eval_f1"]), "images scored": scores["n_scored"],
                             "predicted by": source, "truth": truth_source(cfg.data), "tta": scores.get("tta") or "none"})
                 + "<p class='caption'>Shown only: nothing in the study is ranked, pruned or promoted by it.</p>")
    members = scores.get("members") or []
    if members:
        section.html("<h3>Members</h3>" + table([{k: m.get(k) for k in ("trial", "fold", "weight", "eval_f1")}
                                                 for m in members]))
    if scores.get("per_class_f1") is not None:
        names = scores.get("class_names") or class_names(summary, len(scores["per_class_f1"]))
        section.figure("held_out_per_class", per_class_heatmap([np.asarray(scores["per_class_f1"])],
                                                                ["held-out"], names))
        section.figure("held_out_confusion", confusion_heatmap(np.asarray(scores["confusion"]), names,
                                                               "confusion on the held-out set"))
    return section


def audit_gallery(rows: pd.DataFrame, total: int, method: str) -> str:
    cards = []
    for row in rows.itertuples():
        image = thumbnail(Path(row.image))
        picture = f'<img alt="{esc(row.target)}" src="{image}">' if image else "<p>(image not found)</p>"
        cards.append(f'<figure class="audit">{picture}<figcaption>{esc(row.task)}: {esc(row.given)} &rarr; '
                     f'{esc(row.suggested)}<br>{esc(row.target)}<br>score {fmt(float(row.score), 3)}</figcaption></figure>')
    return (f"<h3>Label audit</h3><p class='caption'>The {len(rows)} most suspicious of {total} rows of "
            f"label_issues.csv (flagged by {esc(method)}, on out-of-fold probabilities; lower score = more "
            "suspicious). Mark the "
            "accept column and run `harness corrections STUDY.yaml`.</p>" + '<div class="gallery">' + "".join(cards)
            + "</div>")


def thumbnail(path: Path) -> str | None:
    """A small JPEG of the image as a data: URI, so the report stays one file."""
    import base64
    import io

    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def data_section(summary: dict | None, source: str, problems: list[str]) -> Section:
    section = Section("data", "Data")
    for problem in problems:
        section.note(problem)
    if summary is None:
        return section
    section.html(f'<p class="caption">{esc(source)}</p>')
    persons, images = summary.get("persons", {}), summary.get("images", {})
    section.html(key_values({"persons train": persons.get("train"), "persons valid": persons.get("valid"),
                             "images train": images.get("train"), "images valid": images.get("valid"),
                             "excluded images": summary.get("excluded_images"),
                             "split hash": summary.get("split_hash")}))
    counts = summary.get("class_counts", {})
    train, valid = counts.get("train") or [], counts.get("valid") or []
    names = class_names(summary, max(len(train), len(valid)))
    rows = [{"class": i, "name": names[i], "train": train[i] if i < len(train) else None,
             "valid": valid[i] if i < len(valid) else None} for i in range(len(names))]
    section.html("<h3>Images per class</h3>" + table(rows, css="narrow"))
    return section


def shortcuts_section(study: optuna.Study) -> Section:
    """Where the person-based measures apply and the context audit (the study attribute "shortcuts")."""
    from harness.context_audit import TaskAudit, record_lines

    section = Section("shortcuts", "Shortcuts")
    record = study.user_attrs.get("shortcuts")
    if record is None:
        section.note("This study was created before shortcuts were audited: `harness check-data` shows them.")
        return section
    lines = record_lines(record)
    section.html(f'<p class="caption">{esc(lines[0])}</p><p class="caption">{esc(lines[1])}</p>')
    rows = [{**row, "share of whole": TaskAudit(**row).share} for row in record.get("audit") or []]
    section.html("<h3>Can the labels be predicted from context alone?</h3>"
                 "<p class='caption'>Out-of-fold macro F1 of a small classifier that sees only what lies outside "
                 "the object (person-grouped folds), its person-bootstrap 95% interval, chance (labels shuffled) "
                 "and the same classifier on the whole image; flagged where the context alone reads the label.</p>"
                 + table(rows, ["view", "task", "region", "f1", "low", "high", "chance", "chance_high", "whole_f1",
                                "share of whole", "flagged"]))
    return section


def settings_section(cfg: StudyConfig, study: optuna.Study, storage: str) -> Section:
    section = Section("settings", "Study settings")
    attrs = {k: v for k, v in study.user_attrs.items() if k not in ("data_summary", "shortcuts")}
    section.html(key_values(strip_secrets({"storage": redact(storage), **attrs})))
    resolved = yaml.safe_dump(strip_secrets(cfg.model_dump(mode="json")), sort_keys=False)
    section.html(f"<h3>Resolved study file</h3><pre>{esc(resolved)}</pre>")
    return section


# --------------------------------------------------------------------------------- page


CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       background: #f5f6f8; color: #1d2330; line-height: 1.45; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 6px; font-size: 24px; }
header .facts span { display: inline-block; margin: 4px 18px 0 0; }
nav { background: #fff; border-bottom: 1px solid #dde1e6; padding: 8px 32px; position: sticky; top: 0; z-index: 5; }
nav a { margin-right: 16px; color: #2457c5; text-decoration: none; }
main { max-width: 1320px; margin: 0 auto; padding: 8px 32px 48px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 12px 20px; margin: 18px 0; }
h2 { margin: 4px 0 10px; font-size: 20px; } h3 { font-size: 16px; margin: 16px 0 6px; }
.figure { margin: 8px 0 18px; } .caption { color: #566; font-size: 13px; margin: 2px 0 8px; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; }
th, td { border: 1px solid #dde1e6; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; position: sticky; top: 0; } table.kv th { background: #f6f7f9; font-weight: 600; }
.scroll { overflow: auto; max-height: 520px; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; } figure.audit { margin: 0; width: 150px; font-size: 12px; }
figure.audit img { width: 96px; height: 96px; object-fit: contain; display: block; background: #eee; }
table.trials td { white-space: nowrap; } table.trials td:last-child { white-space: normal; min-width: 320px; }
pre { background: #f6f7f9; padding: 10px; border-radius: 6px; overflow: auto; font-size: 12px; }
code { font-size: 12px; }
"""

# Before Plotly: records every error (script, resource, rejected promise) on <html>; after load,
# counts the plots Plotly actually drew. The browser test reads both back from the rendered DOM.
WATCHDOG_JS = """
(function () {
  var root = document.documentElement, errors = [];
  root.dataset.jsErrors = "0";
  function record(message) { errors.push(String(message)); root.dataset.jsErrors = String(errors.length);
                             root.dataset.jsErrorMessages = errors.join(" | "); }
  window.addEventListener("error", function (e) {
    record(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href))));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { record("unhandled rejection: " + e.reason); });
  window.addEventListener("load", function () {
    setTimeout(function () {
      var plots = document.querySelectorAll(".js-plotly-plot"), drawn = 0;
      plots.forEach(function (p) { if (p.querySelector(".main-svg")) { drawn += 1; } });
      root.dataset.figures = String(document.querySelectorAll("[data-figure]").length);
      root.dataset.plotsTotal = String(plots.length);
      root.dataset.plotsDrawn = String(drawn);
      root.dataset.checked = "1";
    }, 0);
  });
})();
"""


def header(cfg: StudyConfig, frame: pd.DataFrame, generated: str) -> str:
    counts = frame["state"].value_counts().to_dict() if not frame.empty else {}
    states = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none yet"
    best = best_complete(frame)
    best_text = f"{best['objective']:.4f} (trial {int(best['trial'])})" if best is not None else "–"
    facts = [f"trials: {len(frame)} ({states})", f"best {cfg.search.objective}: {best_text}", f"generated {generated}",
             f"harness {harness.__version__}"]
    spans = "".join(f"<span>{esc(f)}</span>" for f in facts)
    return f'<header><h1>Study {esc(cfg.name)}</h1><div class="facts">{spans}</div></header>'


def render_page(cfg: StudyConfig, frame: pd.DataFrame, sections: list[Section], generated: str) -> str:
    from plotly.offline import get_plotlyjs

    nav = "".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(s.render() for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>harness report: {esc(cfg.name)}</title>\n<style>{CSS}</style>\n"
            f"<script>{WATCHDOG_JS}</script>\n<script>{get_plotlyjs()}</script>\n</head>\n<body>\n"
            f"{header(cfg, frame, generated)}\n<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def write_report(cfg: StudyConfig, storage: str | None = None) -> Path:
    """Write runs/<study>/report.html (atomically) and return its path."""
    study = load_existing_study(cfg, storage)
    frame = scored_frame(cfg, study)
    summary, data_source, data_problems = summarize_data(cfg, study)
    ensemble = read_ensemble(EnsembleFolder.of(cfg))
    sections = [search_section(cfg, study, frame), truth_section(cfg, frame, read_remedies(cfg)),
                curves_section(cfg, frame),
                classes_section(cfg, frame, ensemble, summary), ensemble_section(ensemble),
                promotion_section(cfg), held_out_section(cfg, summary), trials_section(cfg, frame),
                shortcuts_section(study),
                data_section(summary, data_source, data_problems), settings_section(cfg, study, storage or default_storage(cfg))]
    from harness.budget import read_record

    if (record := read_record(cfg)) is not None:
        sections.insert(0, budget_section(record))
    page = render_page(cfg, frame, sections, time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path = StudyFolder.of(cfg).report
    atomic_write_text(path, page)
    return path
