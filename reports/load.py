"""Read one study out of MLflow into tidy pandas frames.

reports/ reads MLflow only (through ``MlflowClient``), never ``diffablate.models``: a report can be regenerated
from a copied work directory without the code that trained. The conventions read here (tags, params, metric
and artifact names) are the contract's "MLflow conventions" section.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TAG = "diffablate."
PARENT_TAG = "mlflow.parentRunId"
SERIES = ("train_loss", "heldout_loss")  # per-step curves the report plots
# Final metrics in the contract's order; any other non-series metric follows, sorted by name.
FINAL_METRICS = (
    "fid", "fid_ci_low", "fid_ci_high", "fid_n_gen", "fid_n_ref", "kid", "kid_std",
    "clip_score", "clip_score_ci_low", "clip_score_ci_high", "clip_score_n",
    "oracle_acc", "oracle_acc_ci_low", "oracle_acc_ci_high", "oracle_n",
    "final_train_loss", "final_heldout_loss", "train_wall_s", "img_per_s_mean",
)
# Per-bucket UI copies of timestep_loss.json and raw per-step series are not "final" metrics.
_NOT_FINAL = re.compile(r"^heldout_loss_b\d+$|^(train_loss|heldout_loss|lr|img_per_s)$")
TIMESTEP_ARTIFACT = "timestep_loss.json"
SAMPLES_ARTIFACT = "samples/final.png"
CLAIMS_ARTIFACT = "claims.json"
_PAGE = 1000


class ReportError(RuntimeError):
    """The study cannot be reported; the message names the study, tracking URI or artifact at fault."""


@dataclass
class StudyData:
    """Everything the report needs, read once from MLflow.

    ``trials``: one row per trial (run_id, trial, cell, seed, status, axis columns, final metrics, fail_reason).
    ``axes``: the design axes (the keys of the ``diffablate.cell`` tag), in cell order.
    ``steps``: long frame run_id, trial, cell, seed, metric, step, value.
    ``timestep_loss``: long frame run_id, trial, cell, seed, step, bucket, t_lo, t_hi, t_mid, loss.
    ``params``: every run's full params (run_id -> {dotted key: string}), for lookups not in ``trials``.
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


def _download_json(client: MlflowClient, run_id: str, path: str, tmp: Path) -> Any | None:
    try:
        local = client.download_artifacts(run_id, path, str(tmp))
    except (MlflowException, OSError):
        return None  # the artifact is optional for a failed/pruned trial; callers note what is missing
    return json.loads(Path(local).read_text())


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

    with tempfile.TemporaryDirectory(prefix="diffablate-report-") as tmp_s:
        tmp = Path(tmp_s)
        claims = _download_json(client, parent.info.run_id, CLAIMS_ARTIFACT, tmp / "parent")
        if claims is None:
            notes.append(f"parent run has no {CLAIMS_ARTIFACT}; no claims are tested.")
            claims = []
        rows, step_rows, ts_frames, params = [], [], [], {}
        cells = [parse_cell(r.data.tags.get(f"{TAG}cell", "")) for r in children]
        axes = list(dict.fromkeys(k for c in cells for k in c))  # first-seen order; cells are axis-sorted
        for run, cell in zip(children, cells):
            rows.append(_trial_row(run, cell, axes))
            params[run.info.run_id] = dict(run.data.params)
            key = {k: rows[-1][k] for k in ("run_id", "trial", "cell", "seed")}
            for metric in SERIES:
                for m in client.get_metric_history(run.info.run_id, metric):
                    step_rows.append({**key, "metric": metric, "step": int(m.step), "value": float(m.value)})
            ts = _download_json(client, run.info.run_id, TIMESTEP_ARTIFACT, tmp / run.info.run_id)
            if ts is not None:
                frame = _table_frame(ts)
                ts_frames.append(frame.assign(**key))
    trials = _trials_frame(rows, axes)
    steps = pd.DataFrame(step_rows, columns=["run_id", "trial", "cell", "seed", "metric", "step", "value"])
    steps = steps.sort_values(["trial", "run_id", "metric", "step"], kind="stable").reset_index(drop=True)
    ts_cols = ["run_id", "trial", "cell", "seed", "step", "bucket", "t_lo", "t_hi", "t_mid", "loss"]
    timestep = pd.concat(ts_frames, ignore_index=True) if ts_frames else pd.DataFrame(columns=ts_cols)
    timestep = timestep.reindex(columns=ts_cols)
    timestep = timestep.sort_values(["trial", "run_id", "step", "bucket"], kind="stable").reset_index(drop=True)
    return StudyData(study=study, tracking_uri=tracking_uri, experiment_id=eid, parent_run_id=parent.info.run_id,
                     parent_tags=dict(parent.data.tags), claims=list(claims), trials=trials, axes=axes,
                     steps=steps, timestep_loss=timestep, params=params, notes=notes)


def _trial_row(run: Run, cell: dict[str, str], axes: list[str]) -> dict[str, Any]:
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
    for name, value in run.data.metrics.items():
        if not _NOT_FINAL.match(name):
            row[name] = float(value)
    return row


def _trials_frame(rows: list[dict[str, Any]], axes: list[str]) -> pd.DataFrame:
    base = ["run_id", "trial", "cell", "seed", "status", *axes]
    present = {k for r in rows for k in r} - set(base) - {"fail_reason"}
    metrics = [m for m in FINAL_METRICS if m in present] + sorted(present - set(FINAL_METRICS))
    frame = pd.DataFrame(rows, columns=[*base, *metrics, "fail_reason"])
    for m in metrics:
        frame[m] = frame[m].astype(float)
    frame["fail_reason"] = frame["fail_reason"].fillna("")
    return frame.sort_values(["trial", "cell", "seed", "run_id"], kind="stable").reset_index(drop=True)


def download_samples(study: StudyData, run_ids: list[str], dest: Path) -> dict[str, Path]:
    """Download ``samples/final.png`` of each run into ``dest/<run_id>/``; runs without one are left out."""
    client = MlflowClient(tracking_uri=study.tracking_uri)
    out: dict[str, Path] = {}
    for rid in run_ids:
        try:
            out[rid] = Path(client.download_artifacts(rid, SAMPLES_ARTIFACT, str(dest / rid)))
        except (MlflowException, OSError):
            continue
    return out


def log_report(study: StudyData, report_dir: Path) -> None:
    """Log the report directory to the study's parent run under artifact path ``report/``."""
    MlflowClient(tracking_uri=study.tracking_uri).log_artifacts(study.parent_run_id, str(report_dir), "report")
