"""Study designs: which cells a study trains, how many trials each, and how Optuna walks them.

A design is a small class behind one interface, built by name from `DESIGNS` (STYLE.md 12: k-diffusion's
one-builder-per-concern, each ending in a loud error), so the spec parser, the runner, the trial and the CLI
never ask `kind == ...`:

    parse(table, base)       -> the cells (factor settings, each a validated RunConfig) and the factors
    n_per_cell(spec)         -> trials per cell
    make_sampler / pruner    -> Optuna's sampler and pruner for the study
    plan(spec)               -> every planned trial, created WAITING up front (studies/runner.py)
    suggest / resolve        -> a trial's cell, seed and searched params (asked / read back)
    prune_value(spec, m)     -> the intermediate value a trial reports at an eval step
    milestones(spec)         -> the training steps at which a trial is scored (learning curves)
    complete_arm(arm, spec)  -> a claim arm as the cells it means

`factorial` crosses all factors (GridSampler over the factors and the seed); `one-at-a-time` changes one
factor of a baseline at a time (GridSampler over cell index and seed); `search` lets any Optuna sampler
propose `[design.space]` values for `n_trials` trials per crossed cell, pruned on an intermediate metric;
`learning-curve` trains the baseline once per seed and scores it at each of `budgets` training steps.

This module also owns the spec vocabulary these need (cells, factors, searched parameters, `SpecError`),
so studies/spec.py builds on it without a cycle.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import optuna
from optuna.trial import TrialState

from diffablate.models.config import ConfigError, RunConfig, section_fields
from diffablate.models.registry import Registry

if TYPE_CHECKING:
    from diffablate.studies.spec import StudySpec


class SpecError(ValueError):
    """A study spec is invalid; the message starts with the field (`design.axes.conditioning[0]`) or file."""


PARAM_TYPES = ("float", "int", "categorical")
BASE_KEYS = ("kind", "objective", "direction")  # every design's [design] table


@dataclass(frozen=True)
class Cell:
    """One setting of the factors: `overrides` maps full dotted RunConfig keys to values."""

    index: int
    overrides: dict[str, Any]
    cfg: RunConfig = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        """Stable "axis=value,axis=value" string sorted by axis (the MLflow tag diffablate.cell)."""
        return cell_label(self.overrides)


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: `type` float|int with `low`/`high` (`log`, `step`) or categorical `choices`."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Parsed:
    """What a design's [design] table resolves to."""

    factors: dict[str, list[Any]]  # full dotted key -> values a claim may name
    cells: list[Cell]
    baseline: dict[str, Any] = field(default_factory=dict)  # the design's reference cell (one-at-a-time, learning curve)
    extra: dict[str, Any] = field(default_factory=dict)  # StudySpec fields only some designs set (search, budgets)


def cell_label(overrides: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in sorted(overrides.items())) or "base"


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)


# =================================================================================================
# The designs
# =================================================================================================


class Design(ABC):
    """How a study's trials are chosen (see the module docstring for the interface)."""

    kind: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = BASE_KEYS
    supports_null_control: ClassVar[bool] = False  # a replicate cell of the baseline fits the design's plan
    makes_claims: ClassVar[bool] = True  # a learning curve picks a budget instead
    packable: ClassVar[bool] = True  # its trials' configs are known before they start (studies/runner.py claim_pack)
    arm_hint: ClassVar[str] = ""  # appended to "matches no cell of the design"

    @abstractmethod
    def parse(self, design: Mapping[str, Any], base: RunConfig) -> Parsed:
        """Validate the [design] table (SpecError naming the field) and build every cell's config."""

    def n_per_cell(self, spec: "StudySpec") -> int:
        return len(spec.seeds)

    # --- Optuna ------------------------------------------------------------------------------------

    def grid_space(self, spec: "StudySpec") -> dict[str, list[Any]]:
        """GridSampler's grid: cell index x seed (factorial overrides this).

        The seed is in the grid, so every (cell, seed) pair is its own grid id, planned apart and kept by a
        retried copy (Optuna's retry callback copies the system attrs, grid id included). It is never
        *suggested*: `suggest` reads it from the trial's grid id, so it is not an Optuna parameter and
        optuna-dashboard's importance and contour plots see only the design's factors (the trial sets it as
        a user attr, studies/trial.py)."""
        return {"cell": list(range(len(spec.cells))), "seed": list(spec.seeds)}

    def make_sampler(self, spec: "StudySpec", worker: int = 0) -> optuna.samplers.BaseSampler:
        # The same seed everywhere: every worker must agree on the grid ids.
        return PlannedGridSampler(self.grid_space(spec), seed=0)

    def make_pruner(self, spec: "StudySpec") -> optuna.pruners.BasePruner:
        return optuna.pruners.NopPruner()

    def plan(self, spec: "StudySpec") -> list[optuna.trial.FrozenTrial]:
        """Every planned trial, WAITING, each carrying its grid id (studies/runner.py `_plan_trials`)."""
        sampler = self.make_sampler(spec)
        assert isinstance(sampler, PlannedGridSampler)
        space = sampler._search_space  # the sorted space GridSampler compares retried trials against
        return [optuna.create_trial(state=TrialState.WAITING, user_attrs={"planned": grid_id},
                                    system_attrs={"grid_id": grid_id, "search_space": space})
                for grid_id in range(sampler.n_grids)]

    def suggest(self, spec: "StudySpec", trial: optuna.Trial) -> tuple[Cell, int, dict[str, Any]]:
        """This trial's cell, seed and searched params: the factors asked of Optuna, the seed read from the
        trial's grid id (see `grid_space`: it is no parameter)."""
        values = {k: trial.suggest_categorical(k, v) for k, v in self.grid_space(spec).items() if k != "seed"}
        grid_id = trial.storage.get_trial_system_attrs(trial._trial_id)["grid_id"]
        return self._cell(spec, values), int(self._grid_point(spec, grid_id)["seed"]), {}

    def resolve(self, spec: "StudySpec", system_attrs: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[Cell, int]:
        """(cell, seed) of a trial from its grid id, without suggesting anything (status of WAITING trials)."""
        values = self._grid_point(spec, system_attrs["grid_id"])
        return self._cell(spec, values), int(values["seed"])

    def _grid_point(self, spec: "StudySpec", grid_id: int) -> dict[str, Any]:
        """The grid values (factors or cell, and seed) of one grid id, as GridSampler hands them out."""
        sampler = self.make_sampler(spec)
        return dict(zip(sampler._param_names, sampler._all_grids[grid_id]))

    def _cell(self, spec: "StudySpec", values: Mapping[str, Any]) -> Cell:
        return spec.cells[int(values["cell"])]

    # --- training ----------------------------------------------------------------------------------

    def prune_value(self, spec: "StudySpec", metrics: Mapping[str, float]) -> float | None:
        """The value a trial reports to Optuna at an eval step (the dashboard's intermediate curve)."""
        return metrics.get("heldout_loss")

    @property
    def prunes(self) -> bool:
        """Whether the pruner may stop trials (only the search design has one)."""
        return False

    def milestones(self, spec: "StudySpec") -> tuple[int, ...]:
        """Training steps at which a trial is scored under the panel and logged (empty: only at the end)."""
        return ()

    def complete_arm(self, arm: dict[str, Any], spec_baseline: dict[str, Any]) -> dict[str, Any]:
        """A claim arm as it selects cells (one-at-a-time completes it with the baseline)."""
        return arm


DESIGNS: Registry[type[Design]] = Registry("study design")


@DESIGNS.register("factorial")
class Factorial(Design):
    """The full grid of `[design.axes]` x seeds; GridSampler over the factors themselves, so Optuna's
    dashboard shows each factor as a parameter."""

    kind = "factorial"
    keys = BASE_KEYS + ("axes",)

    def parse(self, design: Mapping[str, Any], base: RunConfig) -> Parsed:
        factors = factor_table(design.get("axes"), "design.axes", base, required=True)
        return Parsed(factors, cross(base, factors, "design.axes"))

    def grid_space(self, spec: "StudySpec") -> dict[str, list[Any]]:
        # Optuna persists grid values as JSON scalars; list-valued factors (block_channels) go in as JSON text.
        space = {k: [_grid_value(v) for v in vals] for k, vals in spec.factors.items()}
        return {**space, "seed": list(spec.seeds)}

    def _cell(self, spec: "StudySpec", values: Mapping[str, Any]) -> Cell:
        wanted = {k: values[k] for k in spec.factors}
        for cell in spec.cells:
            if all(_grid_eq(cell.overrides[k], v) for k, v in wanted.items()):
                return cell
        raise ValueError(f"no cell matches {wanted}")


@DESIGNS.register("one-at-a-time")
class OneAtATime(Design):
    """`[design.baseline]` plus each value of `[design.variants]` changed alone; a claim's arms are completed
    with the baseline's values, so each names exactly one cell."""

    kind = "one-at-a-time"
    keys = BASE_KEYS + ("baseline", "variants")
    supports_null_control = True
    arm_hint = " (a one-at-a-time design changes one factor at a time from design.baseline)"

    def parse(self, design: Mapping[str, Any], base: RunConfig) -> Parsed:
        baseline = baseline_table(design.get("baseline", {}), "design.baseline", base)
        base_cell_cfg = override(base, baseline, "design.baseline")
        factors = factor_table(design.get("variants"), "design.variants", base_cell_cfg, required=True)
        # Breadth-first over the factors (each factor's first variant, then each one's second, ...): trials are
        # planned cell by cell, so a study cut short has touched every factor rather than exhausted one.
        per_factor = [[{**baseline, key: v} for v in values if not (key in baseline and baseline[key] == v)]
                      for key, values in factors.items()]  # the baseline itself is already cell 0
        settings = [dict(baseline)] + [s for rank in itertools.zip_longest(*per_factor) for s in rank if s is not None]
        cells = build_cells(base, settings, "design.variants")
        # The factors a claim may name: each varied key with its baseline value first.
        factors = {k: ([baseline[k]] if k in baseline else []) + [v for v in vals if k not in baseline or v != baseline[k]]
                   for k, vals in factors.items()}
        return Parsed(factors, cells, baseline)

    def complete_arm(self, arm: dict[str, Any], spec_baseline: dict[str, Any]) -> dict[str, Any]:
        # An arm names the factor it is about and every other factor stays at the design's baseline, so
        # `baseline = { timestep_sampler = "uniform" }` is the baseline cell, not every cell that happens to
        # sample uniformly (the time-embedding-off cell too).
        return {**spec_baseline, **arm}


@DESIGNS.register("learning-curve")
class LearningCurve(OneAtATime):
    """The baseline cell only, trained once per seed for max(`budgets`) steps and scored under the panel at
    every budget (metrics logged with step = budget). Its report picks the smallest budget at which the
    baseline's samples are good and no score gets worse with more training (reports/).

    Why one run per seed stands for every budget: after `train.warmup_steps` the learning rate is constant,
    and the EMA's decay warm-up depends on the step alone, so the first b steps of a long run ARE a run of
    b steps. Timestep samplers whose schedule follows the run's length (`sequential`, `curriculum`) break
    that equivalence and are refused.
    """

    kind = "learning-curve"
    keys = BASE_KEYS + ("baseline", "budgets")
    supports_null_control = False
    makes_claims = False
    arm_hint = ""

    def parse(self, design: Mapping[str, Any], base: RunConfig) -> Parsed:
        from diffablate.models.axes import TIMESTEP_SAMPLERS

        budgets = design.get("budgets")
        ok = (isinstance(budgets, list) and len(budgets) >= 2
              and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in budgets))
        check(ok, "design.budgets", "must be a list of at least 2 positive integers (training steps)", budgets)
        check(budgets == sorted(set(budgets)), "design.budgets", "must be strictly increasing", budgets)
        baseline = baseline_table(design.get("baseline", {}), "design.baseline", base)
        cfg = override(base, baseline, "design.baseline")
        check(cfg.train.warmup_steps < budgets[0], "design.budgets",
              f"the first budget must exceed train.warmup_steps ({cfg.train.warmup_steps}), else it is still warming up",
              budgets)
        sampler = cfg.axes.timestep_sampler
        check(not TIMESTEP_SAMPLERS.get(sampler).follows_run_length, "design.baseline",
              f"timestep sampler {sampler!r} follows the run's length (train.steps), so the first b steps of a long "
              f"run are not a run of b steps; a learning curve needs one that does not", sampler)
        settings = {**baseline, "train.steps": budgets[-1]}
        return Parsed({}, build_cells(base, [settings], "design.baseline"), baseline, {"budgets": tuple(budgets)})

    def milestones(self, spec: "StudySpec") -> tuple[int, ...]:
        return spec.budgets


@DESIGNS.register("search")
class Search(Design):
    """Any Optuna sampler proposes `[design.space]` values for `n_trials` trials per cell of the optional
    crossed `[design.axes]`; cell and seed are fixed params, pruned by `pruner` on `prune_metric`."""

    kind = "search"
    keys = BASE_KEYS + ("axes", "sampler", "sampler_args", "n_trials", "space", "pruner", "pruner_args", "prune_metric")
    # The sampler proposes each trial's params when it starts, from everything finished by then: trials are
    # neither known ahead (batch size, widths may be searched) nor meant to start together.
    packable = False

    def parse(self, design: Mapping[str, Any], base: RunConfig) -> Parsed:
        sampler = design.get("sampler", "TPESampler")
        sampler_cls = _class_from(optuna.samplers, sampler, "design.sampler", optuna.samplers.BaseSampler)
        check(sampler != "GridSampler", "design.sampler", "GridSampler is the factorial design; use kind = \"factorial\"", sampler)
        sampler_args = _bind(sampler_cls, design.get("sampler_args", {}), "design.sampler_args")
        pruner = design.get("pruner", "NopPruner")
        pruner_cls = _class_from(optuna.pruners, pruner, "design.pruner", optuna.pruners.BasePruner)
        pruner_args = _bind(pruner_cls, design.get("pruner_args", {}), "design.pruner_args")
        prune_metric = design.get("prune_metric", "heldout_loss")
        check(isinstance(prune_metric, str) and prune_metric.isidentifier(), "design.prune_metric",
              "must be a metric name the trainer reports at eval steps (e.g. heldout_loss)", prune_metric)
        n_trials = design.get("n_trials")
        check(isinstance(n_trials, int) and not isinstance(n_trials, bool) and n_trials > 0, "design.n_trials",
              "must be an integer > 0 (trials per cell)", n_trials)
        factors = factor_table(design.get("axes", {}), "design.axes", base, required=False)
        space_d = flatten(table(design.get("space"), "design.space"))
        check(bool(space_d), "design.space", "must define at least one parameter", space_d)
        space: list[ParamSpec] = []
        for key, pd in space_d.items():
            p = f"design.space.{key}"
            full = full_key(key, p)
            check(full not in factors, p, "is already a crossed factor in design.axes", key)
            space.append(_param(full, pd, p, base))
        extra = {"sampler": sampler, "sampler_args": sampler_args, "pruner": pruner, "pruner_args": pruner_args,
                 "prune_metric": prune_metric, "n_trials": n_trials, "space": tuple(space)}
        return Parsed(factors, cross(base, factors, "design.axes"), extra=extra)

    def n_per_cell(self, spec: "StudySpec") -> int:
        return spec.n_trials

    def make_sampler(self, spec: "StudySpec", worker: int = 0) -> optuna.samplers.BaseSampler:
        cls = getattr(optuna.samplers, spec.sampler)
        args = dict(spec.sampler_args)
        if "seed" in inspect.signature(cls.__init__).parameters:
            # Each worker gets its own stream, else parallel workers propose identical points.
            args["seed"] = args.get("seed", spec.seeds[0]) + 1000 * worker
        return cls(**args)

    def make_pruner(self, spec: "StudySpec") -> optuna.pruners.BasePruner:
        return getattr(optuna.pruners, spec.pruner)(**spec.pruner_args)

    def plan(self, spec: "StudySpec") -> list[optuna.trial.FrozenTrial]:
        trials, i = [], 0
        for cell in spec.cells:
            for j in range(spec.n_trials):
                fixed = {"cell": cell.index, "seed": spec.seeds[j % len(spec.seeds)]}
                trials.append(optuna.create_trial(state=TrialState.WAITING, user_attrs={"planned": i},
                                                  system_attrs={"fixed_params": fixed}))
                i += 1
        return trials

    def suggest(self, spec: "StudySpec", trial: optuna.Trial) -> tuple[Cell, int, dict[str, Any]]:
        cell = spec.cells[trial.suggest_categorical("cell", list(range(len(spec.cells))))]
        # The seed is a user attr (set by the trial), not a parameter: the sampler must not model it as a
        # factor, nor the dashboard plot its "importance". Planned trials carry it as a fixed value.
        fixed = trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})
        seed = fixed["seed"] if "seed" in fixed else trial.suggest_categorical("seed", list(spec.seeds))
        params: dict[str, Any] = {}
        for p in spec.space:
            if p.type == "float":
                params[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                params[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            else:
                params[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        return cell, int(seed), params

    def resolve(self, spec: "StudySpec", system_attrs: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[Cell, int]:
        values = {**system_attrs.get("fixed_params", {}), **params}
        return self._cell(spec, values), int(values["seed"])

    def prune_value(self, spec: "StudySpec", metrics: Mapping[str, float]) -> float | None:
        return metrics.get(spec.prune_metric)

    @property
    def prunes(self) -> bool:
        return True


class PlannedGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose trials are all created up front (studies/runner.py's module docstring).

    `after_trial` is a no-op: GridSampler would call `study.stop()` once the grid is exhausted, which
    raises outside `study.optimize`; here the end of the study is simply "no WAITING trial left".
    """

    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState, values: Any) -> None:
        pass

    @property
    def n_grids(self) -> int:
        return len(self._all_grids)


def _grid_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _grid_eq(value: Any, grid_value: Any) -> bool:
    return value == grid_value or (isinstance(value, (list, dict)) and json.dumps(value) == grid_value)


# =================================================================================================
# Parsing helpers: factors, cells, searched parameters (also used by studies/spec.py)
# =================================================================================================


def check(cond: bool, path: str, msg: str, value: Any) -> None:
    if not cond:
        raise SpecError(f"{path}: {msg}, got {value!r}")


def table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise SpecError(f"{path}: must be a table, got {v!r}" if v is not None else f"{path}: missing table [{path}]")
    return v


def known(d: Mapping[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise SpecError(f"{prefix}{unknown[0]}: unknown key; known keys: {list(keys)}")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML dotted keys (`train.lr = [...]`) arrive as nested tables; flatten them back to `train.lr`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and "type" not in v:  # "type": a [design.space] parameter, not a section
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_AXIS_FIELDS = set(section_fields()["axes"])


def full_key(key: str, path: str) -> str:
    """`timestep_sampler` -> `axes.timestep_sampler`; dotted keys must exist in RunConfig."""
    full = f"axes.{key}" if key in _AXIS_FIELDS else key
    sections = section_fields()
    section, _, leaf = full.partition(".")
    ok = (section in sections and leaf in sections[section]) or (not leaf and section in sections and not sections[section])
    if not ok:
        raise SpecError(f"{path}: unknown factor {key!r}; use an axes field {sorted(_AXIS_FIELDS)} "
                        f"or a dotted RunConfig key such as 'train.lr'")
    check(full != "seed", path, "the seed is varied by `seeds`, not as a factor", key)
    return full


def _registry_for(full: str) -> Any | None:
    """The registry that names the values of an axis, so typos get the registry's 'choose one of' message
    (models/choices.py: the same map config validation reads)."""
    from diffablate.models.choices import registry_for

    return registry_for(full)


def check_value(full: str, value: Any, path: str, base: RunConfig) -> None:
    reg = _registry_for(full)
    if reg is not None and isinstance(value, str):
        try:
            reg.get(value)
        except KeyError as e:
            raise SpecError(f"{path}: {e.args[0]}") from None
    try:
        base.with_overrides({full: value})
    except ConfigError as e:
        raise SpecError(f"{path}: {e}") from None


def factor_table(d: Any, path: str, base: RunConfig, *, required: bool) -> dict[str, list[Any]]:
    flat = flatten(table(d if d is not None else ({} if not required else None), path))
    if required and not flat:
        raise SpecError(f"{path}: must name at least one factor with a list of values")
    out: dict[str, list[Any]] = {}
    for key, values in flat.items():
        p = f"{path}.{key}"
        full = full_key(key, p)
        check(full not in out, p, "factor given twice", key)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{p}: must be a non-empty list of values, got {values!r}")
        for i, v in enumerate(values):
            check(not isinstance(v, Mapping), f"{p}[{i}]", "must be a value, not a table", v)
            check(values.index(v) == i, f"{p}[{i}]", "repeats an earlier value", v)
            check_value(full, v, f"{p}[{i}]", base)
        out[full] = list(values)
    return out


def baseline_table(d: Any, path: str, base: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flatten(table(d, path)).items():
        p = f"{path}.{key}"
        full = full_key(key, p)
        check_value(full, v, p, base)
        out[full] = v
    return out


def override(base: RunConfig, overrides: Mapping[str, Any], path: str) -> RunConfig:
    try:
        return base.with_overrides(overrides)
    except ConfigError as e:
        raise SpecError(f"{path}: {cell_label(overrides)}: {e}") from None


def build_cells(base: RunConfig, settings: list[dict[str, Any]], path: str) -> list[Cell]:
    # Every cell is built now, so an invalid combination (e.g. cross-attention with no attention levels)
    # fails before the first trial trains, not hours into the study.
    return [Cell(i, s, override(base, s, f"{path} cell {i}")) for i, s in enumerate(settings)]


def cross(base: RunConfig, factors: dict[str, list[Any]], path: str) -> list[Cell]:
    return build_cells(base, [dict(zip(factors, combo)) for combo in itertools.product(*factors.values())], path)


def _class_from(module: Any, name: Any, path: str, base_cls: type) -> type:
    choices = sorted(n for n in getattr(module, "__all__", []) if inspect.isclass(getattr(module, n, None))
                     and issubclass(getattr(module, n), base_cls) and not n.startswith("Base"))
    check(isinstance(name, str) and name in choices, path, f"must be one of {choices}", name)
    return getattr(module, name)


def _bind(cls: type, args: Any, path: str) -> dict[str, Any]:
    args = dict(table(args, path))
    params = inspect.signature(cls.__init__).parameters
    for k in args:
        check(k in params and k != "self", f"{path}.{k}", f"not an argument of {cls.__name__}",
              sorted(n for n in params if n != "self"))
    return args


def _param(full: str, pd: Any, p: str, base: RunConfig) -> ParamSpec:
    pd = table(pd, p)
    tp = pd.get("type")
    check(tp in PARAM_TYPES, f"{p}.type", f"must be one of {list(PARAM_TYPES)}", tp)
    if tp == "categorical":
        known(pd, ("type", "choices"), f"{p}.")
        choices = pd.get("choices")
        check(isinstance(choices, list) and len(choices) >= 1, f"{p}.choices", "must be a non-empty list", choices)
        for i, v in enumerate(choices):
            check(v is None or isinstance(v, (str, int, float, bool)), f"{p}.choices[{i}]",
                  "must be a string, number or boolean (Optuna stores categoricals as JSON)", v)
            check_value(full, v, f"{p}.choices[{i}]", base)
        return ParamSpec(full, tp, choices=tuple(choices))
    known(pd, ("type", "low", "high", "log", "step"), f"{p}.")
    num = (int,) if tp == "int" else (int, float)
    low, high, log, step = pd.get("low"), pd.get("high"), pd.get("log", False), pd.get("step")
    for k, v in (("low", low), ("high", high)):
        check(isinstance(v, num) and not isinstance(v, bool) and math.isfinite(v), f"{p}.{k}",
              f"must be {'an integer' if tp == 'int' else 'a finite number'}", v)
    check(low <= high, f"{p}.high", f"must be >= low ({low})", high)
    check(isinstance(log, bool), f"{p}.log", "must be true or false", log)
    check(not log or low > 0, f"{p}.low", "must be > 0 when log = true", low)
    if step is not None:
        check(isinstance(step, num) and not isinstance(step, bool) and step > 0, f"{p}.step", "must be > 0", step)
        check(not log, f"{p}.step", "cannot be combined with log = true", step)
    for k, v in (("low", low), ("high", high)):
        check_value(full, v, f"{p}.{k}", base)
    return ParamSpec(full, tp, low=low, high=high, log=log, step=step)
