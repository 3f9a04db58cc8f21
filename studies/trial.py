"""One Optuna trial: resolve its cell and seed, open (or reopen) its MLflow child run, train, score, report.

The trial's outcome is written to both systems the same way:

| outcome                      | Optuna state | MLflow run status | diffablate.status | fail_reason |
|------------------------------|--------------|-------------------|-------------------|-------------|
| trained and scored           | COMPLETE     | FINISHED          | COMPLETE          |             |
| pruned at an eval step       | PRUNED       | KILLED            | PRUNED            | why         |
| diverged (TrainingDiverged)  | FAIL         | FAILED            | FAIL              | the reason  |
| any other error              | FAIL         | FAILED            | FAIL              | the error   |
| Ctrl-C / SIGTERM             | FAIL, queued | KILLED            | FAIL              | interrupted |
| worker died (heartbeat stale)| FAIL, retried| reopened by retry | (the retry's)     |             |

Optuna keeps the reason as the trial user attr `fail_reason` and the MLflow run id as `mlflow_run_id`. The
MLflow side of each row is `tracking.run_lifecycle` with `_ending` below.
"""

from __future__ import annotations

import importlib
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState

from diffablate.models.config import RunConfig
from diffablate.studies import tracking
from diffablate.studies.spec import Cell, StudySpec


@dataclass
class TrialRun:
    """What a trial function gets: the resolved config, where to write, how to log and to report progress."""

    spec: StudySpec
    cfg: RunConfig
    cell: Cell
    seed: int
    run_dir: Path
    tracker: Any  # models.tracker.Tracker (MlflowTracker on the child run)
    on_eval: Callable[[int, Mapping[str, float]], None]
    trial_number: int
    attempt: int  # 0 for the first try, n for the n-th retry after a lost worker


TrialFn = Callable[[TrialRun], Mapping[str, float]]


def train_and_evaluate(run: TrialRun) -> dict[str, float]:
    """The default trial function: `models.trainer.train` then `studies.evaluate.evaluate_run`."""
    from diffablate.models.trainer import train
    from diffablate.studies.evaluate import evaluate_run

    result = train(run.cfg, run.run_dir, tracker=run.tracker, resume=True, progress=False, on_eval=run.on_eval)
    metrics: dict[str, float] = {"final_train_loss": result.final_train_loss, "final_heldout_loss": result.heldout_loss,
                                 "train_wall_s": result.wall_s, "img_per_s_mean": result.img_per_s}
    if getattr(result, "diverged", False):  # a trainer that returns instead of raising
        raise _diverged_error()(result.steps_done, result.reason)
    metrics.update(evaluate_run(run.run_dir, cfg=run.cfg, tracker=run.tracker))
    return metrics


def _diverged_error() -> type[BaseException]:
    try:
        from diffablate.models.trainer import TrainingDiverged

        return TrainingDiverged
    except ImportError:  # no trainer in this tree: nothing can diverge
        return _NeverRaised


class _NeverRaised(Exception):
    pass


def load_trial_fn(ref: str | None) -> TrialFn:
    """None -> train_and_evaluate; "package.module:function" -> that function (tests inject fakes this way)."""
    if not ref:
        return train_and_evaluate
    mod, _, fn = ref.partition(":")
    return getattr(importlib.import_module(mod), fn)


@dataclass
class TrialContext:
    """Per-worker state shared by its trials: the spec, the tracking client and where the parent run is."""

    spec: StudySpec
    workdir: Path
    client: Any
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trial_fn: TrialFn
    retry: optuna.storages.RetryHeartbeatStaleTrialCallback = field(repr=False, default=None)  # type: ignore[assignment]

    @classmethod
    def open(cls, spec: StudySpec, workdir: Path, trial_fn: str | None = None,
             uri: str | None = None) -> "TrialContext":
        """The worker's context; `uri` is the study's MLflow store (None: the one recorded for the work dir)."""
        from diffablate.studies.runner import ensure_parent_run, study_client, tracking_uri

        uri = uri or tracking_uri(workdir, spec.name)
        client = study_client(workdir, uri)
        exp_id, parent = ensure_parent_run(spec, workdir, create=False, uri=uri)
        return cls(spec, workdir, client, uri, exp_id, parent, load_trial_fn(trial_fn),
                   optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.runtime.max_retry))

    def run_dir(self, planned: int) -> Path:
        from diffablate.studies.workdir import run_dir

        return run_dir(self.workdir, self.spec.name, planned)

    def on_stale_trial(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        """A worker died mid-trial: close its MLflow run as lost, then re-queue the trial (up to max_retry)."""
        history = frozen.system_attrs.get("retry_history", [])
        will_retry = len(history) + 1 <= self.spec.runtime.max_retry
        run_id = frozen.user_attrs.get("mlflow_run_id")
        if run_id:
            reason = f"worker lost (no heartbeat for {self.spec.runtime.grace_period} s)"
            # Kept after a retry reopens the run (which clears fail_reason): the run's history of lost workers.
            self.client.set_tag(run_id, f"diffablate.lost.t{frozen.number}", reason)
            tracking.close_run(self.tracking_uri, run_id, tracking.RunEnding(
                "KILLED" if will_retry else "FAILED", "FAIL", reason + ("; retrying" if will_retry else "; retries exhausted")))
        self.retry(study, frozen)


def resolve_cell(spec: StudySpec, system_attrs: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[Cell, int]:
    """(cell, seed) of a trial from its grid id / fixed params / params, without suggesting anything."""
    from diffablate.studies.runner import make_sampler

    if "grid_id" in system_attrs:
        sampler = make_sampler(spec)
        values = dict(zip(sampler._param_names, sampler._all_grids[system_attrs["grid_id"]]))
    else:
        values = {**system_attrs.get("fixed_params", {}), **params}
    return _cell_from_values(spec, values), int(values["seed"])


def _cell_from_values(spec: StudySpec, values: Mapping[str, Any]) -> Cell:
    if "cell" in values:
        return spec.cells[int(values["cell"])]
    wanted = {k: values[k] for k in spec.factors}
    for cell in spec.cells:
        if all(_grid_eq(cell.overrides[k], v) for k, v in wanted.items()):
            return cell
    raise ValueError(f"no cell matches {wanted}")


def _grid_eq(value: Any, grid_value: Any) -> bool:
    return value == grid_value or (isinstance(value, (list, dict)) and json.dumps(value) == grid_value)


def suggest(spec: StudySpec, trial: optuna.Trial) -> tuple[Cell, int, dict[str, Any]]:
    """Ask Optuna for this trial's cell, seed and searched params (the design's whole search space)."""
    from diffablate.studies.runner import grid_space

    if spec.kind in ("factorial", "one-at-a-time"):
        values = {k: trial.suggest_categorical(k, v) for k, v in grid_space(spec).items()}
        return _cell_from_values(spec, values), int(values["seed"]), {}
    cell = spec.cells[trial.suggest_categorical("cell", list(range(len(spec.cells))))]
    seed = trial.suggest_categorical("seed", list(spec.seeds))
    params: dict[str, Any] = {}
    for p in spec.space:
        if p.type == "float":
            params[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            params[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            params[p.key] = trial.suggest_categorical(p.key, list(p.choices))
    return cell, int(seed), params


def _unrecorded_run(ctx: TrialContext, planned: int) -> str | None:
    """The child run of this planned trial if one exists although Optuna has no id for it: its worker died
    between creating the run and recording it. Reusing it keeps one run per planned trial, none left RUNNING."""
    runs = ctx.client.search_runs(
        [ctx.experiment_id], max_results=1,
        filter_string=f"tags.`diffablate.role` = 'trial' and tags.`diffablate.planned` = '{planned}'")
    return runs[0].info.run_id if runs else None


def _tracker(run_id: str, uri: str) -> Any:
    from diffablate.studies.tracking import MlflowTracker

    return MlflowTracker(run_id, uri)


def _ending(e: BaseException) -> tracking.RunEnding:
    """How an exception ends a trial's MLflow run (see the table in the module docstring)."""
    if isinstance(e, optuna.TrialPruned):
        return tracking.RunEnding("KILLED", "PRUNED", str(e) or "pruned")
    if isinstance(e, _diverged_error()):
        return tracking.RunEnding("FAILED", "FAIL", f"diverged: {getattr(e, 'reason', e)}")
    if not isinstance(e, Exception):  # KeyboardInterrupt (Ctrl-C, SIGTERM) / SystemExit: not the trial's fault
        return tracking.RunEnding("KILLED", "FAIL", f"{tracking.interrupt_reason(e)}; re-queued for the next "
                                                    f"`study run`")
    return tracking.RunEnding("FAILED", "FAIL", f"{type(e).__name__}: {e}")


def run_trial(ctx: TrialContext, study: optuna.Study, trial: optuna.Trial) -> TrialState:
    """Run one claimed (RUNNING) trial to its end and tell Optuna and MLflow how it ended."""
    spec = ctx.spec
    run_id: str | None = None
    try:
        planned = int(trial.user_attrs["planned"])
        system_attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        attempt = len(system_attrs.get("retry_history", []))
        cell, seed, params = suggest(spec, trial)
        cfg = spec.cell_config(cell, seed, params)
        tags = {"diffablate.role": "trial", "diffablate.study": spec.name, "diffablate.trial_number": str(trial.number),
                "diffablate.cell": cell.label, "diffablate.seed": str(seed), "diffablate.planned": str(planned),
                "diffablate.status": "RUNNING", "diffablate.fail_reason": ""}
        run_id = trial.user_attrs.get("mlflow_run_id") or _unrecorded_run(ctx, planned)
        retry = run_id is not None  # a retry after a lost worker: continue the same child run (and checkpoints)
        if not retry:
            run_id = tracking.start_run(ctx.tracking_uri, spec.name, f"t{trial.number:03d} {cell.label} s{seed}",
                                        ctx.parent_run_id, tags, workdir=ctx.workdir)
        # From here on the run's end - status and tags, whatever happens - belongs to the lifecycle.
        with tracking.run_lifecycle(ctx.tracking_uri, run_id, reopen=retry, ending_for=_ending):
            tracker = _tracker(run_id, ctx.tracking_uri)
            if retry:
                tracker.set_tags({**tags, "diffablate.attempt": str(attempt)})
            if trial.user_attrs.get("mlflow_run_id") != run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                trial.set_user_attr("cell", cell.label)
                trial.set_user_attr("seed", seed)
            tracker.log_params(cfg.flat())
            tracker.log_dict(cfg.to_dict(), "config.json")

            def on_eval(step: int, metrics: Mapping[str, float]) -> None:
                value = metrics.get(spec.prune_metric) if spec.kind == "search" else metrics.get("heldout_loss")
                if value is None:
                    return
                trial.report(float(value), step)  # intermediate curve for the dashboard and the pruner
                if spec.kind == "search" and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {spec.prune_metric}={value:.4g}")

            run = TrialRun(spec, cfg, cell, seed, ctx.run_dir(planned), tracker, on_eval, trial.number, attempt)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            metrics = dict(ctx.trial_fn(run))
            finals = {k: float(v) for k, v in metrics.items() if v is not None}
            if finals:
                tracker.log_metrics(finals, step=None)
            if spec.objective not in finals:
                raise RuntimeError(f"the trial produced no {spec.objective!r} (design.objective); got {sorted(finals)}")
            value = finals[spec.objective]
        study.tell(trial, value)
        return TrialState.COMPLETE
    except optuna.TrialPruned as e:
        trial.set_user_attr("fail_reason", _ending(e).reason)
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except _diverged_error() as e:
        _fail(study, trial, _ending(e).reason)
        return TrialState.FAIL
    except Exception as e:
        _fail(study, trial, _ending(e).reason)
        if run_id:
            ctx.client.log_text(run_id, traceback.format_exc(), "error.txt")
        raise
    except BaseException as e:  # KeyboardInterrupt / SystemExit: not the trial's fault - re-queue it, then stop
        _interrupted(study, trial, _ending(e).reason)
        raise


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason[:2000])
    study.tell(trial, state=TrialState.FAIL)


def _interrupted(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Ctrl-C / SIGTERM mid-trial: FAIL this attempt (its MLflow run was closed KILLED) and queue a WAITING copy
    with the same planned id, grid id and MLflow run, so the next `study run` finishes it from its checkpoint.
    Unlimited retries: an interrupt says nothing about the trial (max_retry is for workers that die)."""
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study._storage.get_trial(trial._trial_id))
