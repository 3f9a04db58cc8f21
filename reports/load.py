"""Read one study out of MLflow into tidy pandas frames.

reports/ reads MLflow only (through ``MlflowClient``), never ``diffablate.models``: a report can be regenerated
from a copied work directory without the code that trained. The conventions read here (tags, params, metric
and artifact names) are the contract's "MLflow conventions" section.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from diffablate.metrics.names import DETAIL_TAG, entry_name, panel_metric, split_metric

TAG = "diffablate."
PARENT_TAG = "mlflow.parentRunId"
SERIES = ("train_loss", "heldout_loss")  # per-step curves the report plots
# Scores that depend on how a model is sampled: logged once per sampling-panel entry as "<score>/<entry>"
# (diffablate.metrics.names). A plain "fid" from an older store is read as a one-entry panel (`_old_entry`).
SAMPLING_SCORES = (
    "fid", "fid_ci_low", "fid_ci_high", "fid_n_gen", "fid_n_ref", "kid", "kid_std",
    "clip_score", "clip_score_ci_low", "clip_score_ci_high", "clip_score_n",
    "oracle_acc", "oracle_acc_ci_low", "oracle_acc_ci_high", "oracle_n",
    "class_acc", "class_acc_ci_low", "class_acc_ci_high", "class_acc_n",
)
HEADLINE_SCORES = ("fid", "kid", "clip_score", "oracle_acc", "class_acc")  # what a claim or a curve is about
# Non-sampling final metrics in the contract's order; any other plain metric follows, sorted by name.
PLAIN_METRICS = ("final_train_loss", "final_heldout_loss", "oracle_ceiling", "class_acc_ceiling", "train_wall_s",
                 "img_per_s_mean")
# Per-bucket UI copies of timestep_loss.json (`heldout_loss_t/050-099`; `heldout_loss_b02` in older stores), raw
# per-step series and MLflow system metrics are not "final".
_NOT_FINAL = re.compile(r"^heldout_loss_b\d+|^heldout_loss_t/|^(train_loss|heldout_loss|lr|img_per_s)$|^system/")
TIMESTEP_ARTIFACT = "timestep_loss.json"
SAMPLES_ARTIFACT = "samples/final.png"  # the trainer's last fixed-prompt grid (its prompts: samples/prompts.json)
PROMPTS_ARTIFACT = "samples/prompts.json"
REAL_ARTIFACT = "samples/real.png"  # a grid of real images for the same prompts, where studies/ logs one
CLAIMS_ARTIFACT = "claims.json"
PANEL_ARTIFACT = "panel.json"
SAMPLERS_ARTIFACT = "samplers.json"
SPEC_ARTIFACT = "study_spec.toml"
CONFIG_ARTIFACT = "config.json"
# Tags the report itself writes on the parent run: never read back, or a second report would differ.
REPORT_TAGS = re.compile(r"^diffablate\.(verdict|effect|agreement|trusted|instrument|picked_budget|baseline_bar)\b")
OLD_ENTRY = "as-logged"  # the entry name of plain scores whose runs do not agree on one sampler and guidance
_PAGE = 1000


class ReportError(RuntimeError):
    """The study cannot be reported; the message names the study, tracking URI or artifact at fault."""


@dataclass(frozen=True)
class Panel:
    """The sampling panel every trial was scored under: entry names in order, the primary one, and the
    scheduler flags of each entry (from the parent's ``panel.json``, else a trial's ``samplers.json``)."""

    entries: tuple[str, ...]
    primary: str | None
    flags: dict[str, dict[str, Any]]
    source: str  # where the entry list came from, said in the report


@dataclass
class StudyData:
    """Everything the report needs, read once from MLflow.

    ``trials``: one row per trial (run_id, trial, cell, seed, status, axis columns, final metrics, fail_reason);
    sampling scores are always ``<score>/<entry>`` columns (a plain score of an older store is renamed to its
    one entry). ``axes``: the design axes (the keys of the ``diffablate.cell`` tag), in cell order.
    ``steps``: long frame run_id, trial, cell, seed, metric, step, value (train/held-out loss series).
    ``histories``: long frame run_id, trial, cell, seed, score, entry, step, value: the logged history of
    sampling scores (every budget of a learning curve; FID wherever it was logged at several steps).
    ``timestep_loss``: long frame run_id, trial, cell, seed, step, bucket, t_lo, t_hi, t_mid, loss.
    ``params``: every run's full params (run_id -> {dotted key: string}); ``run_tags`` likewise for tags.
    """

    study: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    parent_tags: dict[str, str]
    claims: list[dict[str, Any]]
    trials: pd.DataFrame
    axes: list[str]
    steps: pd.DataFrame
    timestep_loss: pd.DataFrame
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    panel: Panel = field(default_factory=lambda: Panel((), None, {}, "none"))
    histories: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HISTORY_COLS))
    parent_params: dict[str, str] = field(default_factory=dict)
    run_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    run_names: dict[str, str] = field(default_factory=dict)
    system_metrics: dict[str, list[str]] = field(default_factory=dict)  # run_id -> system/* metric names
    spec_text: str | None = None

    def column(self, score: str, entry: str | None) -> str:
        """The trials column of ``score`` under panel ``entry`` (None: a plain metric)."""
        return score if entry is None else panel_metric(score, entry)

    def entries_of(self, score: str) -> list[str]:
        """Panel entries under which some trial logged ``score``, in panel order."""
        return [e for e in self.panel.entries if panel_metric(score, e) in self.trials]


HISTORY_COLS = ["run_id", "trial", "cell", "seed", "score", "entry", "step", "value"]


def parse_cell(cell: str) -> dict[str, str]:
    """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}`` (the contract's stable cell string)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in cell.split(","))):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def same_axis(a: str, b: str) -> bool:
    """``timestep_sampler`` and ``axes.timestep_sampler`` name the same axis (specs may use either form)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def axis_value(params: dict[str, str], cell: dict[str, str], axis: str) -> str | None:
    """An axis' value for one run: from the cell tag, else the param ``axis`` / ``axes.axis`` / ``*.axis``."""
    if axis in cell:
        return cell[axis]
    hits = [k for k in cell if same_axis(k, axis)]
    if len(hits) == 1:
        return cell[hits[0]]
    for key in (axis, f"axes.{axis}"):
        if key in params:
            return params[key]
    hits = sorted(k for k in params if k.endswith("." + axis))
    return params[hits[0]] if len(hits) == 1 else None


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    # search_runs pages at most max_results runs; follow the token so large studies are complete.
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=_PAGE, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# MLflow draws a tqdm bar per download; a report downloads one or two files per trial, so silence it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow's INFO lines mean nothing to a report's reader
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _download(client: MlflowClient, run_id: str, path: str, tmp: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(tmp)))
    except (MlflowException, OSError):
        return None  # the artifact is optional for a failed/pruned trial; callers note what is missing


def _download_json(client: MlflowClient, run_id: str, path: str, tmp: Path) -> Any | None:
    local = _download(client, run_id, path, tmp)
    if local is None:
        return None
    try:
        return json.loads(local.read_text())
    except ValueError:
        return None  # a truncated upload reads like a missing one; the report says what it lacks


def read_json_artifact(study: StudyData, run_id: str, path: str) -> Any | None:
    """One JSON artifact of a run, or None when it is absent or unreadable."""
    with tempfile.TemporaryDirectory(prefix="diffablate-report-") as tmp:
        return _download_json(MlflowClient(tracking_uri=study.tracking_uri), run_id, path, Path(tmp))


def _table_frame(obj: Any) -> pd.DataFrame:
    """Read mlflow ``log_table`` JSON (pandas orient="split": columns + data) into a frame."""
    if isinstance(obj, dict) and "columns" in obj and "data" in obj:
        return pd.DataFrame(obj["data"], columns=obj["columns"])
    if isinstance(obj, dict):  # a plain dict of columns is also accepted
        return pd.DataFrame(obj)
    return pd.DataFrame(obj)


def load_study(study: str, tracking_uri: str) -> StudyData:
    """Read study ``study`` from the MLflow store at ``tracking_uri``.

    Raises ReportError naming the study and URI when the experiment or its parent run is missing.
    """
    if tracking_uri.startswith("sqlite:///"):
        # MLflow would silently create an empty database at a mistyped path; a report must not write there.
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise ReportError(f"study {study!r}: no MLflow store at {path} (tracking URI {tracking_uri})")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        exp = client.get_experiment_by_name(study)
    except MlflowException as e:
        raise ReportError(f"cannot read MLflow store {tracking_uri}: {e}") from None
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"study {study!r}: no MLflow experiment of that name at {tracking_uri} "
                          f"(experiments there: {names or 'none'})")
    eid = exp.experiment_id
    parents = _search_all(client, eid, f"tags.`{TAG}role` = 'study'")
    if not parents:
        raise ReportError(f"study {study!r}: experiment exists at {tracking_uri} but has no parent run "
                          f"(tag {TAG}role=study)")
    notes: list[str] = []
    parent = parents[-1]  # latest start time: a re-launched study supersedes the earlier parent
    if len(parents) > 1:
        notes.append(f"{len(parents)} parent runs found; reporting the latest ({parent.info.run_id}).")
    children = [r for r in _search_all(client, eid, f"tags.`{TAG}role` = 'trial'")
                if r.data.tags.get(PARENT_TAG, parent.info.run_id) == parent.info.run_id]
    parent_tags = {k: v for k, v in parent.data.tags.items() if not REPORT_TAGS.match(k)}
    kind = parent_tags.get(f"{TAG}kind")

    with tempfile.TemporaryDirectory(prefix="diffablate-report-") as tmp_s:
        tmp = Path(tmp_s)
        claims = _download_json(client, parent.info.run_id, CLAIMS_ARTIFACT, tmp / "parent")
        if claims is None:
            notes.append(f"parent run has no {CLAIMS_ARTIFACT}; no claims are tested.")
            claims = []
        panel_json = _download_json(client, parent.info.run_id, PANEL_ARTIFACT, tmp / "parent")
        spec_file = _download(client, parent.info.run_id, SPEC_ARTIFACT, tmp / "parent")
        spec_text = spec_file.read_text(encoding="utf-8", errors="replace") if spec_file else None
        cells = [parse_cell(r.data.tags.get(f"{TAG}cell", "")) for r in children]
        axes = list(dict.fromkeys(k for c in cells for k in c))  # first-seen order; cells are axis-sorted
        old = _old_entries(children)
        rows, step_rows, hist_rows, ts_frames = [], [], [], []
        for run, cell in zip(children, cells):
            rows.append(_trial_row(run, cell, axes, old))
            key = {k: rows[-1][k] for k in ("run_id", "trial", "cell", "seed")}
            for metric in SERIES:
                for m in client.get_metric_history(run.info.run_id, metric):
                    step_rows.append({**key, "metric": metric, "step": int(m.step), "value": float(m.value)})
            for name in sorted(run.data.metrics):
                score, entry = _score_entry(name, old)
                # A learning curve logs every headline score at each budget; elsewhere only FID may have
                # several steps, and each history read is a store round trip, so read no more than is drawn.
                if entry is None or score not in (HEADLINE_SCORES if kind == "learning-curve" else ("fid",)):
                    continue
                for m in client.get_metric_history(run.info.run_id, name):
                    hist_rows.append({**key, "score": score, "entry": entry, "step": int(m.step),
                                      "value": float(m.value)})
            ts = _download_json(client, run.info.run_id, TIMESTEP_ARTIFACT, tmp / run.info.run_id)
            if ts is not None:
                frame = _table_frame(ts)
                ts_frames.append(frame.assign(**key))
        samplers = None
        if panel_json is None and children:
            samplers = _download_json(client, children[0].info.run_id, SAMPLERS_ARTIFACT, tmp / "samplers")
    trials = _trials_frame(rows, axes)
    panel = _panel(trials, children, panel_json, samplers, old)
    trials = _order_columns(trials, axes, panel)
    steps = pd.DataFrame(step_rows, columns=["run_id", "trial", "cell", "seed", "metric", "step", "value"])
    steps = steps.sort_values(["trial", "run_id", "metric", "step"], kind="stable").reset_index(drop=True)
    histories = pd.DataFrame(hist_rows, columns=HISTORY_COLS)
    histories = histories.sort_values(["trial", "run_id", "score", "entry", "step"], kind="stable")
    ts_cols = ["run_id", "trial", "cell", "seed", "step", "bucket", "t_lo", "t_hi", "t_mid", "loss"]
    timestep = pd.concat(ts_frames, ignore_index=True) if ts_frames else pd.DataFrame(columns=ts_cols)
    timestep = timestep.reindex(columns=ts_cols)
    timestep = timestep.sort_values(["trial", "run_id", "step", "bucket"], kind="stable").reset_index(drop=True)
    return StudyData(study=study, tracking_uri=tracking_uri, experiment_id=eid, parent_run_id=parent.info.run_id,
                     parent_tags=parent_tags, claims=list(claims), trials=trials, axes=axes, steps=steps,
                     timestep_loss=timestep, params={r.info.run_id: dict(r.data.params) for r in children},
                     notes=notes, panel=panel, histories=histories.reset_index(drop=True),
                     parent_params=dict(parent.data.params),
                     run_tags={r.info.run_id: dict(r.data.tags) for r in children},
                     run_names={r.info.run_id: r.info.run_name or "" for r in [parent, *children]},
                     system_metrics={r.info.run_id: sorted(k for k in r.data.metrics if k.startswith("system/"))
                                     for r in [parent, *children]},
                     spec_text=spec_text)


def _old_entries(runs: list[Run]) -> str:
    """The entry name for plain (pre-panel) sampling scores: the runs' ``eval.sampler`` at
    ``eval.guidance_scale`` when they all agree, else `OLD_ENTRY` (e.g. when the sampler was a design axis,
    one name for all keeps the arms comparable)."""
    names = set()
    for run in runs:
        if not any(name in SAMPLING_SCORES for name in run.data.metrics):
            continue
        p = run.data.params
        try:
            names.add(entry_name(p["eval.sampler"], float(p["eval.guidance_scale"])))
        except (KeyError, ValueError):
            names.add(OLD_ENTRY)
    return names.pop() if len(names) == 1 else OLD_ENTRY


def _score_entry(name: str, old_entry: str) -> tuple[str, str | None]:
    score, entry = split_metric(name)
    if entry is None and score in SAMPLING_SCORES:
        return score, old_entry
    return score, entry


def _trial_row(run: Run, cell: dict[str, str], axes: list[str], old_entry: str) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    # A trial whose worker died never wrote diffablate.status; fall back on MLflow's own run status.
    mlflow_status = {"FINISHED": "COMPLETE", "FAILED": "FAIL"}.get(run.info.status, run.info.status)
    status = tags.get(f"{TAG}status") or mlflow_status
    seed = tags.get(f"{TAG}seed", params.get("seed"))
    trial = tags.get(f"{TAG}trial_number")
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "trial": int(trial) if trial not in (None, "") else -1,
        "cell": tags.get(f"{TAG}cell", ""),
        "seed": int(float(seed)) if seed not in (None, "") else -1,
        "status": status,
        "fail_reason": tags.get(f"{TAG}fail_reason", ""),
    }
    for axis in axes:
        row[axis] = axis_value(params, cell, axis)
    metrics = {name: v for name, v in run.data.metrics.items() if not _NOT_FINAL.match(name)}
    for key, text in tags.items():  # scores' details (CI bounds, counts) are tags since they stopped being charted
        if key.startswith(DETAIL_TAG):
            try:
                metrics.setdefault(key[len(DETAIL_TAG):], float(text))
            except ValueError:
                continue
    has_panel = {split_metric(n)[0] for n in metrics if split_metric(n)[1] is not None}
    for name, value in metrics.items():
        score, entry = _score_entry(name, old_entry)
        if split_metric(name)[1] is None and score in has_panel:
            continue  # a plain copy beside the per-entry scores would count the primary entry twice
        row[panel_metric(score, entry) if entry is not None else name] = float(value)
    return row


def _trials_frame(rows: list[dict[str, Any]], axes: list[str]) -> pd.DataFrame:
    base = ["run_id", "trial", "cell", "seed", "status", *axes]
    present = sorted({k for r in rows for k in r} - set(base) - {"fail_reason"})
    frame = pd.DataFrame(rows, columns=[*base, *present, "fail_reason"])
    for m in present:
        frame[m] = frame[m].astype(float)
    frame["fail_reason"] = frame["fail_reason"].fillna("")
    return frame.sort_values(["trial", "cell", "seed", "run_id"], kind="stable").reset_index(drop=True)


def _order_columns(frame: pd.DataFrame, axes: list[str], panel: Panel) -> pd.DataFrame:
    """Identity and axes, then sampling scores (score-major, panel order), then plain metrics, then the reason."""
    base = ["run_id", "trial", "cell", "seed", "status", *axes]
    metrics = [c for c in frame.columns if c not in base and c != "fail_reason"]
    order = {e: i for i, e in enumerate(panel.entries)}

    def key(name: str) -> tuple:
        score, entry = split_metric(name)
        if entry is not None:
            rank = SAMPLING_SCORES.index(score) if score in SAMPLING_SCORES else len(SAMPLING_SCORES)
            return (0, rank, score, order.get(entry, len(order)), entry)
        rank = PLAIN_METRICS.index(name) if name in PLAIN_METRICS else len(PLAIN_METRICS)
        return (1, rank, name, 0, "")

    return frame[[*base, *sorted(metrics, key=key), "fail_reason"]]


def _panel(trials: pd.DataFrame, runs: list[Run], panel_json: Any, samplers: Any, old_entry: str) -> Panel:
    found = sorted({split_metric(c)[1] for c in trials.columns} - {None})
    params = runs[0].data.params if runs else {}
    if isinstance(panel_json, dict) and isinstance(panel_json.get("entries"), list):
        entries = [str(e) for e in panel_json["entries"]]
        primary = panel_json.get("primary")
        flags = panel_json.get("flags") if isinstance(panel_json.get("flags"), dict) else {}
        source = f"the parent run's {PANEL_ARTIFACT}"
    else:
        entries, primary, flags = _panel_from_params(params)
        flags = samplers if isinstance(samplers, dict) else flags
        source = "the trials' eval.panel_* params" if entries else "the scores the trials logged"
        if found == [old_entry] and old_entry not in entries:
            source = "the runs' eval.sampler and eval.guidance_scale (a store from before sampling panels)"
    entries += [e for e in found if e not in entries]  # an entry logged but not declared still shows
    entries = [e for e in entries if e in found] or entries  # a declared entry nothing logged is dropped
    if primary not in entries:
        primary = entries[0] if entries else None
    return Panel(tuple(entries), primary, {str(k): dict(v) for k, v in flags.items() if isinstance(v, dict)}, source)


def _panel_from_params(params: dict[str, str]) -> tuple[list[str], str | None, dict[str, dict[str, Any]]]:
    try:
        samplers = json.loads(params["eval.panel_samplers"])
        scales = json.loads(params["eval.panel_guidance"])
        entries = [entry_name(str(s), float(g)) for s in samplers for g in scales]
    except (KeyError, ValueError, TypeError):
        entries = []
    try:
        primary = entry_name(params["eval.sampler"], float(params["eval.guidance_scale"]))
    except (KeyError, ValueError):
        primary = None
    return entries, primary, {}


def sample_artifacts(study: StudyData) -> list[str]:
    """Where a trial's sample grid may be, best first: the evaluation grid of the primary panel entry (what
    was scored; a learning curve's at its last budget), then the trainer's final grid."""
    primary = study.panel.primary
    out = []
    if primary:
        out.append(f"samples/eval_{primary}.png")
        steps = sorted(int(s) for s in study.histories["step"].unique()) if len(study.histories) else []
        out += [f"samples/eval_{primary}_step{s:06d}.png" for s in reversed(steps) if s > 0][:1]
    return out + [SAMPLES_ARTIFACT]


def prompts_artifact(image: str) -> str:
    """The prompts beside a grid: ``samples/eval_<entry>_prompts.json`` (a list) for an evaluation grid,
    ``samples/prompts.json`` (``{"prompts": [...]}``) for the trainer's."""
    return PROMPTS_ARTIFACT if image == SAMPLES_ARTIFACT else image.removesuffix(".png") + "_prompts.json"


def download_samples(study: StudyData, run_ids: list[str], dest: Path,
                     artifacts: list[str] | None = None) -> dict[str, tuple[Path, str]]:
    """Download the first of ``artifacts`` (default `sample_artifacts`) each run has into ``dest/<run_id>/``:
    run_id -> (local path, artifact path); runs with none are left out."""
    client = MlflowClient(tracking_uri=study.tracking_uri)
    out: dict[str, tuple[Path, str]] = {}
    for rid in run_ids:
        for artifact in artifacts or sample_artifacts(study):
            local = _download(client, rid, artifact, dest / rid)
            if local is not None:
                out[rid] = (local, artifact)
                break
    return out


def log_report(study: StudyData, report_dir: Path, tags: dict[str, str] | None = None,
               metrics: dict[str, float] | None = None) -> None:
    """Log the report directory to the study's parent run under artifact path ``report/``, and ``tags`` (the
    verdicts) and ``metrics`` (the effects) on the parent run, so studies can be filtered and compared by them."""
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri=study.tracking_uri)
    client.log_artifacts(study.parent_run_id, str(report_dir), "report")
    items = [RunTag(k, v[:5000]) for k, v in sorted((tags or {}).items())]
    for i in range(0, len(items), 100):  # MLflow's log_batch limit for tags
        client.log_batch(study.parent_run_id, tags=items[i:i + 100])
    ts = int(time.time() * 1000)
    values = [Metric(k, v, ts, 0) for k, v in sorted((metrics or {}).items())]
    for i in range(0, len(values), 1000):  # ... and for metrics
        client.log_batch(study.parent_run_id, metrics=values[i:i + 1000])
