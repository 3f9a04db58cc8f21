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
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Mapping

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
    milestones: tuple[int, ...] = ()  # steps at which the design scores the model (learning curves)


TrialFn = Callable[[TrialRun], Mapping[str, float]]


def train_and_evaluate(run: TrialRun) -> dict[str, float]:
    """The default trial function: `models.trainer.train`, then the sampling panel (`studies.evaluate`).

    With `run.milestones` (a learning curve) the panel scores the EMA model at every milestone, logged at
    step = milestone; the last milestone's scores are the trial's final metrics.
    """
    from diffablate.models.trainer import train

    scorer = _MilestoneScorer(run)
    result = train(run.cfg, run.run_dir, tracker=run.tracker, resume=True, progress=False, on_eval=run.on_eval,
                   **scorer.train_kwargs())
    return scorer.finals(result)


def train_and_evaluate_pack(runs: list[TrialRun]) -> list[Callable[[], dict[str, float]]]:
    """Several trials' training as one pack (`models.pack.train_pack`, issue 20) -> per run, in order, a
    function that scores it (its panel) and returns its final metrics - or raises what ended its training.
    Scoring is deferred so each trial's evaluation runs inside its own lifecycle (see `run_pack`)."""
    from diffablate.models.pack import PackMember, train_pack

    scorers = [_MilestoneScorer(run) for run in runs]
    members = [PackMember(run.cfg, run.run_dir, run.tracker, resume=True, on_eval=run.on_eval, **sc.train_kwargs())
               for run, sc in zip(runs, scorers)]
    results = train_pack(members, log=lambda msg: print(f"pack: {msg}", file=sys.stderr, flush=True))

    def finals(scorer: _MilestoneScorer, result: Any) -> Callable[[], dict[str, float]]:
        def score() -> dict[str, float]:
            if isinstance(result, BaseException):
                raise result
            return scorer.finals(result)
        return score

    return [finals(sc, r) for sc, r in zip(scorers, results)]


class _MilestoneScorer:
    """Scores a run under its panel at every milestone (logged at step = milestone) and assembles its finals."""

    def __init__(self, run: TrialRun) -> None:
        self.run = run
        self.latest: dict[str, float] = {}

    def train_kwargs(self) -> dict[str, Any]:
        return {"milestones": self.run.milestones, "on_milestone": self.on_milestone} if self.run.milestones else {}

    def on_milestone(self, step: int, trained: Any) -> None:
        from diffablate.studies.evaluate import evaluate_trained

        run = self.run
        device = next(trained.denoiser.parameters()).device
        t0 = time.perf_counter()
        scores = evaluate_trained(trained, run.cfg, device=device, tracker=run.tracker, step=step, grid_dir=run.run_dir)
        log_scores(run.tracker, scores, step)
        self.latest = dict(scores)
        oracle = {k.split("/")[1]: round(v, 3) for k, v in scores.items() if k.startswith("oracle_acc/")}
        print(f"trial {run.trial_number} ({run.cell.label}, seed {run.seed}): step {step} scored in "
              f"{time.perf_counter() - t0:.0f} s" + (f"; oracle {oracle}" if oracle else ""), file=sys.stderr, flush=True)

    def finals(self, result: Any) -> dict[str, float]:
        from diffablate.studies.evaluate import evaluate_run

        run = self.run
        metrics: dict[str, float] = {"final_train_loss": result.final_train_loss,
                                     "final_heldout_loss": result.heldout_loss, "train_wall_s": result.wall_s,
                                     "img_per_s_mean": result.img_per_s}
        if getattr(result, "diverged", False):  # a trainer that returns instead of raising
            raise _diverged_error()(result.steps_done, result.reason)
        # A retry resumed past its last milestone already logged those scores; score the final checkpoint again.
        metrics.update(self.latest or evaluate_run(run.run_dir, cfg=run.cfg, tracker=run.tracker))
        return metrics


def log_scores(tracker: Any, scores: Mapping[str, float], step: int | None) -> None:
    """Scores as metrics (charted, compared across runs); their details - interval bounds, sample counts,
    spread (metrics/names.py `is_detail`) - as `diffablate.score.<name>` tags, beside them but not charted."""
    from diffablate.metrics.names import DETAIL_TAG, is_detail

    tracker.log_metrics({k: v for k, v in scores.items() if not is_detail(k)}, step=step)
    details = {f"{DETAIL_TAG}{k}": repr(float(v)) for k, v in scores.items() if is_detail(k)}
    if details:
        tracker.set_tags(details)


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
    return spec.design.resolve(spec, system_attrs, params)


def suggest(spec: StudySpec, trial: optuna.Trial) -> tuple[Cell, int, dict[str, Any]]:
    """Ask Optuna for this trial's cell, seed and searched params (the design's whole search space)."""
    return spec.design.suggest(spec, trial)


def _unrecorded_run(ctx: TrialContext, planned: int) -> str | None:
    """The child run of this planned trial if one exists although Optuna has no id for it: its worker died
    between creating the run and recording it. Reusing it keeps one run per planned trial, none left RUNNING."""
    runs = ctx.client.search_runs(
        [ctx.experiment_id], max_results=1,
        filter_string=f"tags.`diffablate.role` = 'trial' and tags.`diffablate.planned` = '{planned}'")
    return runs[0].info.run_id if runs else None


def run_name(arm: str, seed: int, number: int) -> str:
    """A trial's MLflow run name: its arm, seed and trial number (`conditioning=none s1 · t004`)."""
    return f"{arm} s{seed} · t{number:03d}"


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


TrialFlow = Generator[TrialRun, Mapping[str, float], TrialState]


def trial_flow(ctx: TrialContext, study: optuna.Study, trial: optuna.Trial) -> TrialFlow:
    """One claimed (RUNNING) trial from start to end, as a generator: it yields its `TrialRun` once, and the
    driver sends back the trial's final metrics - or throws in what ended its training - at that point.

    Everything else (opening or reopening the MLflow run, the lifecycle that closes it, telling Optuna, the
    re-queue on an interrupt) happens here, so a trial trained alone (`run_trial`) and one trained in a pack
    (`run_pack`) end in MLflow and Optuna through exactly the same code.
    """
    spec = ctx.spec
    run_id: str | None = None
    try:
        planned = int(trial.user_attrs["planned"])
        system_attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        attempt = len(system_attrs.get("retry_history", []))
        cell, seed, params = suggest(spec, trial)
        cfg = spec.cell_config(cell, seed, params)
        arm = spec.arm_name(cell)
        tags = {"diffablate.role": "trial", "diffablate.study": spec.name, "diffablate.trial_number": str(trial.number),
                "diffablate.cell": cell.label, "diffablate.arm": arm, "diffablate.seed": str(seed),
                "diffablate.planned": str(planned), "diffablate.status": "RUNNING", "diffablate.fail_reason": ""}
        run_id = trial.user_attrs.get("mlflow_run_id") or _unrecorded_run(ctx, planned)
        retry = run_id is not None  # a retry after a lost worker: continue the same child run (and checkpoints)
        if not retry:
            # What tells runs apart comes first: MLflow's runs table cuts long names at its column width.
            run_id = tracking.start_run(ctx.tracking_uri, spec.name, run_name(arm, seed, trial.number),
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
                value = spec.design.prune_value(spec, metrics)
                if value is None:
                    return
                trial.report(float(value), step)  # intermediate curve for the dashboard and the pruner
                if spec.design.prunes and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {spec.prune_metric}={value:.4g}")

            run = TrialRun(spec, cfg, cell, seed, ctx.run_dir(planned), tracker, on_eval, trial.number, attempt,
                           spec.design.milestones(spec))
            run.run_dir.mkdir(parents=True, exist_ok=True)
            with tracking.system_metrics(run_id, ctx.tracking_uri):  # CPU/GPU use while it trains and scores
                metrics = dict((yield run))
            finals = {k: float(v) for k, v in metrics.items() if v is not None}
            if finals:
                log_scores(tracker, finals, None)
            objective = spec.objective_metric(cfg)
            if objective not in finals:
                raise RuntimeError(f"the trial produced no {objective!r} (design.objective); got {sorted(finals)}")
            value = finals[objective]
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


def run_trial(ctx: TrialContext, study: optuna.Study, trial: optuna.Trial) -> TrialState:
    """Run one claimed (RUNNING) trial to its end with `ctx.trial_fn` and tell Optuna and MLflow how it ended."""
    flow = trial_flow(ctx, study, trial)
    run = next(flow)
    try:
        metrics = ctx.trial_fn(run)
    except BaseException as e:  # noqa: BLE001 - the flow decides what each outcome means, then re-raises
        return _resume(flow, lambda: flow.throw(e))
    return _resume(flow, lambda: flow.send(metrics))


def run_pack(ctx: TrialContext, study: optuna.Study, trials: list[optuna.Trial]) -> list[TrialState | None]:
    """Run several claimed trials as one pack (`train_and_evaluate_pack`): each keeps its own MLflow run,
    lifecycle, Optuna outcome and evaluation. A trial that fails (to open, to train, to score) ends alone and
    the others go on; its error is printed (as the worker does for a lone trial). An interrupt (Ctrl-C,
    SIGTERM) ends every unfinished trial as interrupted - re-queued - and then propagates.
    -> per trial its final state (None where it failed before telling Optuna)."""
    flows: list[tuple[int, TrialFlow]] = []
    runs: list[TrialRun] = []
    states: list[TrialState | None] = [None] * len(trials)
    for i, trial in enumerate(trials):
        flow = trial_flow(ctx, study, trial)
        try:
            runs.append(next(flow))
            flows.append((i, flow))
        except Exception:  # noqa: BLE001 - failed while opening: already told FAIL by the flow
            traceback.print_exc(file=sys.stderr)
    try:
        scorers = train_and_evaluate_pack(runs) if runs else []
    except BaseException as e:  # an interrupt, or a bug of the pack itself: every trial of it ends the same way
        for _, flow in flows:
            _settle(flow, e)
        raise
    for k, ((i, flow), score) in enumerate(zip(flows, scorers)):
        try:
            metrics = score()
        except Exception as e:  # noqa: BLE001 - this trial's own end
            states[i] = _settle(flow, e)
            continue
        except BaseException as e:  # interrupted while scoring: this trial and every later one
            for _, rest in flows[k:]:
                _settle(rest, e)
            raise
        states[i] = _settle(flow, None, metrics)
    return states


def _resume(flow: TrialFlow, step: Callable[[], Any]) -> TrialState:
    """Drive a flow past its yield; its return value is the trial's state."""
    try:
        step()
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("trial_flow yielded twice")


def _settle(flow: TrialFlow, error: BaseException | None, metrics: Mapping[str, float] | None = None) -> TrialState | None:
    """End one flow of a pack: send its metrics or throw its error; an error the flow re-raises is printed
    (Exceptions) or swallowed (interrupts: the caller re-raises once for the whole pack)."""
    try:
        return _resume(flow, (lambda: flow.throw(error)) if error is not None else (lambda: flow.send(metrics)))
    except Exception:  # noqa: BLE001 - recorded as FAIL by the flow; the worker prints a lone trial's the same way
        traceback.print_exc(file=sys.stderr)
        return None
    except BaseException:  # noqa: BLE001 - an interrupt: recorded and re-queued by the flow
        return None


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
