"""Links between the two UIs of a study: optuna-dashboard notes that point at the MLflow runs.

optuna-dashboard renders a trial's user attrs as plain text (0.21: no links), but its notes are Markdown, so
the study note links the MLflow parent run (where the report and the verdicts are) and each trial's note links
its child run. A link needs the MLflow UI's address, which only exists once something serves it: `diffablate
ui` writes the notes when it starts both servers, and a study tracked on an `http(s)://` MLflow server links
that server. The notes also say what the dashboard's numbers mean in an ablation: the "best trial" is only
the trial with the best objective, not a verdict, and the seed is a user attr, not a factor.
"""

from __future__ import annotations

from typing import Any

from diffablate.studies.spec import StudySpec


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of one run (the hash route MLflow 2 and 3 serve)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def served_ui(tracking_uri: str) -> str | None:
    """The MLflow UI address a tracking URI implies: an http(s) tracking server serves its own; else None."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None


def study_note(spec: StudySpec, experiment_id: str, parent_run_id: str, ui: str | None, report_cmd: str) -> str:
    """The study's note: what it is, what the dashboard's numbers mean here, and where the verdicts are."""
    parent = f"[`{parent_run_id}`]({run_url(ui, experiment_id, parent_run_id)})" if ui else f"`{parent_run_id}`"
    best = "lowest" if spec.direction == "minimize" else "highest"
    lines = [
        f"## {spec.name}",
        "",
        spec.description or "",
        "",
        f"**Design:** {spec.kind}, {len(spec.cells)} cells x {spec.design.n_per_cell(spec)} = {spec.n_planned} "
        f"trials; each trial is one arm and one seed (user attrs `cell`, `seed`).",
        f"**Objective:** `{spec.objective_metric(spec.base)}` ({spec.direction}).",
        "",
        f"**Reading this dashboard in an ablation.** The *best trial* is only the one with the {best} objective "
        "value; it is not a winner. Claims are judged in the report, from seed-paired differences with "
        "confidence intervals: `" + report_cmd + "`."
        + " The seed is a user attr, not a parameter: the importance and contour plots show only what the "
          "design varies.",
        "",
        f"**MLflow:** experiment `{spec.name}` (id {experiment_id}), parent run {parent}: the report, the "
        "verdicts (tags `diffablate.verdict.*`) and every trial's child run."
        + ("" if ui else " Open `diffablate ui` for links."),
    ]
    return "\n".join(lines) + "\n"


def trial_note(trial: Any, experiment_id: str, ui: str) -> str | None:
    """A trial's note linking its MLflow run, or None for a trial that has no run (yet)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return None
    what = f"{trial.user_attrs.get('cell', '')}, seed {trial.user_attrs.get('seed', '?')}"
    reason = trial.user_attrs.get("fail_reason")
    return (f"[MLflow run `{run_id}`]({run_url(ui, experiment_id, run_id)}) - {what}"
            + (f"\n\n{trial.state.name}: {reason}" if reason else "") + "\n")


def write_notes(study: Any, spec: StudySpec, experiment_id: str, parent_run_id: str, ui: str | None,
                report_cmd: str) -> int:
    """Save the study note and (with a UI address) each trial's note; -> notes written. A note whose text is
    already there is left alone (every save is a new version in the storage)."""
    from optuna_dashboard import get_note, save_note  # imported here: it pulls scikit-learn (seconds)

    written = 0
    body = study_note(spec, experiment_id, parent_run_id, ui, report_cmd)
    if get_note(study) != body:
        save_note(study, body)
        written += 1
    if ui is None:
        return written
    import optuna

    for frozen in study.get_trials(deepcopy=False):
        note = trial_note(frozen, experiment_id, ui)
        if note is None:
            continue
        trial = optuna.trial.Trial(study, frozen._trial_id)
        if get_note(trial) != note:
            save_note(trial, note)
            written += 1
    return written
