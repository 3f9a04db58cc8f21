"""Study specs: one TOML file says what to train, which factors to vary, how often, and what is claimed.

A spec is validated completely before any compute - including building the `RunConfig` of every cell -
and every error names the field at fault::

    design.axes.timestep_sampler[1]: unknown timestep sampler 'unifrom'; choose one of [...]
    seeds: must be a non-empty list of integers, got []

Layout (see studies/smoke.toml, claims.toml, search.toml)::

    name = "smoke"
    seeds = [0, 1]
    [base]                      # nested RunConfig overrides shared by every trial
    train = { steps = 60 }
    [eval]                      # RunConfig.eval overrides applied to every trial
    n_samples = 32
    [design]
    kind = "factorial"          # | "one-at-a-time" | "search"
    objective = "final_heldout_loss"   # the Optuna trial value (a final metric name)
    direction = "minimize"
    [design.axes]               # factor -> values; a bare name is an `axes.` field, else any dotted RunConfig key
    timestep_sampler = ["uniform", "sequential"]
    "train.lr" = [1e-4, 3e-4]
    [[claims]]                  # -> claims.json on the study's parent run
    ...

Designs: `factorial` crosses all factors; `one-at-a-time` takes `[design.baseline]` and changes one
factor of `[design.variants]` at a time (a claim's arms are completed with the baseline's values, so each
names exactly one cell); `search` lets an Optuna sampler (`sampler`, any class of
`optuna.samplers`) propose `[design.space]` values for `n_trials` trials per cell of the optional
crossed categorical `[design.axes]`, pruned by `pruner` on the trainer's intermediate `prune_metric`.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from diffablate.models.config import ConfigError, RunConfig, section_fields


class SpecError(ValueError):
    """A study spec is invalid; the message starts with the field (`design.axes.conditioning[0]`) or file."""


DESIGN_KINDS = ("factorial", "one-at-a-time", "search")
DIRECTIONS = ("minimize", "maximize")
# Final per-trial metrics (the contract's names) a spec may optimise or make claims about.
FINAL_METRICS = (
    "fid", "kid", "clip_score", "oracle_acc", "final_train_loss", "final_heldout_loss", "train_wall_s",
    "img_per_s_mean",
)
# Metrics whose natural direction is "higher is better"; everything else in FINAL_METRICS is lower-better.
HIGHER_IS_BETTER = frozenset({"clip_score", "oracle_acc", "img_per_s_mean"})
PARAM_TYPES = ("float", "int", "categorical")
_TOP_KEYS = ("name", "description", "seeds", "base", "eval", "design", "claims", "runtime")
_DESIGN_KEYS = {
    "factorial": ("kind", "objective", "direction", "axes"),
    "one-at-a-time": ("kind", "objective", "direction", "baseline", "variants"),
    "search": ("kind", "objective", "direction", "axes", "sampler", "sampler_args", "n_trials", "space", "pruner",
               "pruner_args", "prune_metric"),
}
_CLAIM_KEYS = ("name", "statement", "metric", "baseline", "variant", "better", "expect")
_RUNTIME_KEYS = ("heartbeat_interval", "grace_period", "max_retry")


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
class Claim:
    name: str
    statement: str
    metric: str
    baseline: dict[str, Any]
    variant: dict[str, Any]
    better: str
    expect: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "statement": self.statement, "metric": self.metric, "baseline": self.baseline,
                "variant": self.variant, "better": self.better, "expect": self.expect}


@dataclass(frozen=True)
class Runtime:
    """Fault tolerance: a worker silent for `grace_period` s loses its trial, which is retried `max_retry` times."""

    heartbeat_interval: int = 30  # a heartbeat is one small DB write; 30 s is negligible load
    grace_period: int = 120  # > heartbeat_interval with margin for a busy SQLite file or a long eval step
    max_retry: int = 2  # a trial that kills its worker twice more is a bug, not bad luck


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec: the cells (factor settings), seeds and how Optuna walks them."""

    name: str
    description: str
    seeds: tuple[int, ...]
    kind: str
    objective: str
    direction: str
    base: RunConfig
    factors: dict[str, list[Any]]  # full dotted key -> values (factorial, search's crossed axis, variants)
    cells: tuple[Cell, ...]
    claims: tuple[Claim, ...]
    runtime: Runtime
    raw: dict[str, Any] = field(repr=False)
    # search only
    sampler: str = "GridSampler"
    sampler_args: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 0  # per cell
    space: tuple[ParamSpec, ...] = ()
    pruner: str = "NopPruner"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    prune_metric: str = "heldout_loss"
    source: str = ""  # the TOML text as given (logged as the parent run's study_spec.toml)

    @property
    def spec_hash(self) -> str:
        """sha256 (16 hex) of the canonical parsed spec: comments and formatting do not change it."""
        canon = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def n_planned(self) -> int:
        per_cell = self.n_trials if self.kind == "search" else len(self.seeds)
        return len(self.cells) * per_cell

    def cell_config(self, cell: Cell, seed: int, params: Mapping[str, Any] | None = None) -> RunConfig:
        """The RunConfig of one trial: base + cell overrides + searched params + seed."""
        return cell.cfg.with_overrides({**(params or {}), "seed": seed})

    def claims_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.claims]


def cell_label(overrides: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in sorted(overrides.items())) or "base"


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)


# --- parsing ----------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file; SpecError names the file or the field."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a directory; a FIFO would block the read forever
        raise SpecError(f"{path}: cannot read study spec (not a regular file)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read study spec ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return parse_spec(text, where=str(path))


def parse_spec(text: str, *, where: str = "spec") -> StudySpec:
    """Parse TOML text into a validated StudySpec. Never raises anything but SpecError for bad input."""
    try:
        raw = tomllib.loads(text)
    except ValueError as e:  # TOMLDecodeError, or an integer beyond Python's 4300-digit conversion limit
        raise SpecError(f"{where}: not valid TOML: {e}") from None
    spec = spec_from_dict(raw)
    object.__setattr__(spec, "source", text)
    return spec


def spec_from_dict(raw: Mapping[str, Any]) -> StudySpec:
    """Validate a parsed spec dict (see the module docstring for the layout)."""
    try:
        return _spec_from_dict(raw)
    except ConfigError as e:  # a RunConfig error not localised below: still name it as a spec error
        raise SpecError(str(e)) from None


def _spec_from_dict(raw: Mapping[str, Any]) -> StudySpec:
    _table(raw, "spec")
    _known(raw, _TOP_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0") or name.startswith("."):
        raise SpecError(f"name: must be a non-empty string without '/' (it names the study and its directory), got {name!r}")
    description = raw.get("description", "")
    _check(isinstance(description, str), "description", "must be a string", description)
    seeds = raw.get("seeds")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SpecError(f"seeds: must be a non-empty list of integers >= 0, got {seeds!r}")
    _check(len(set(seeds)) == len(seeds), "seeds", "must not repeat a seed", seeds)

    # Base config: [base] nested overrides, then [eval] on top.
    base_d = dict(_table(raw.get("base", {}), "base"))
    eval_d = _table(raw.get("eval", {}), "eval")
    if eval_d:
        _check(isinstance(base_d.get("eval", {}), Mapping), "base.eval", "must be a table", base_d.get("eval"))
        base_d["eval"] = {**base_d.get("eval", {}), **eval_d}
    _check("seed" not in base_d, "base.seed", "is set by `seeds`, not in [base]", base_d.get("seed"))
    try:
        base = RunConfig.from_dict(base_d)
    except ConfigError as e:
        msg = str(e)
        from_eval = msg.startswith("eval.") and msg[5:].split(":")[0].split("[")[0] in eval_d
        raise SpecError(msg if from_eval else f"base.{msg}") from None

    design = _table(raw.get("design"), "design")
    kind = design.get("kind")
    _check(kind in DESIGN_KINDS, "design.kind", f"must be one of {list(DESIGN_KINDS)}", kind)
    _known(design, _DESIGN_KEYS[kind], "design.")
    objective = design.get("objective", "final_heldout_loss")
    _check(objective in FINAL_METRICS, "design.objective", f"must be one of {list(FINAL_METRICS)}", objective)
    direction = design.get("direction", "maximize" if objective in HIGHER_IS_BETTER else "minimize")
    _check(direction in DIRECTIONS, "design.direction", f"must be one of {list(DIRECTIONS)}", direction)

    extra: dict[str, Any] = {}
    if kind == "factorial":
        factors = _factors(design.get("axes"), "design.axes", base, required=True)
        cells = _cells(base, [dict(zip(factors, combo)) for combo in itertools.product(*factors.values())], "design.axes")
    elif kind == "one-at-a-time":
        baseline = _baseline(design.get("baseline", {}), base)
        base_cell_cfg = _override(base, baseline, "design.baseline")
        factors = _factors(design.get("variants"), "design.variants", base_cell_cfg, required=True)
        settings = [dict(baseline)]
        for key, values in factors.items():
            for v in values:
                if key in baseline and baseline[key] == v:
                    continue  # the baseline itself is already cell 0
                settings.append({**baseline, key: v})
        cells = _cells(base, settings, "design.variants")
        # The factors a claim may name: each varied key with its baseline value first.
        factors = {k: ([baseline[k]] if k in baseline else []) + [v for v in vals if k not in baseline or v != baseline[k]]
                   for k, vals in factors.items()}
    else:
        factors = _factors(design.get("axes", {}), "design.axes", base, required=False)
        cells = _cells(base, [dict(zip(factors, combo)) for combo in itertools.product(*factors.values())], "design.axes")
        extra = _search(design, base, cells, factors)

    claims = tuple(_claim(c, i, factors, objective) for i, c in enumerate(_list_of_tables(raw.get("claims", []), "claims")))
    if kind == "one-at-a-time":
        # A one-at-a-time claim compares two cells: an arm names the factor it is about and every other
        # factor stays at the design's baseline, so `baseline = { timestep_sampler = "uniform" }` is the
        # baseline cell, not every cell that happens to sample uniformly (the time-embedding-off cell too).
        claims = tuple(replace(c, baseline={**baseline, **c.baseline}, variant={**baseline, **c.variant}) for c in claims)
    for i, c in enumerate(claims):
        for side in ("baseline", "variant"):
            arm = getattr(c, side)
            n = sum(all(cell.overrides.get(k) == v for k, v in arm.items()) for cell in cells)
            _check(n >= 1, f"claims[{i}].{side}", "matches no cell of the design (a one-at-a-time design changes one "
                   "factor at a time from design.baseline)" if kind == "one-at-a-time" else "matches no cell of the design", arm)
    # A metric the eval config switches off would fail every trial at its very end: refuse it now.
    for path, metric in [("design.objective", objective)] + [(f"claims[{i}].metric", c.metric) for i, c in enumerate(claims)]:
        for cell in cells:
            if not _metric_enabled(metric, cell.cfg):
                raise SpecError(f"{path}: {metric!r} is not computed with this eval config ({_METRIC_NEEDS[metric][1]})")
    _check(len({c.name for c in claims}) == len(claims), "claims", "names must be unique", [c.name for c in claims])
    runtime = _runtime(raw.get("runtime", {}))
    return StudySpec(name=name, description=description, seeds=tuple(seeds), kind=kind, objective=objective,
                     direction=direction, base=base, factors=factors, cells=tuple(cells), claims=claims,
                     runtime=runtime, raw=_jsonable(raw), **extra)


# --- pieces -----------------------------------------------------------------------------------------


def _check(cond: bool, path: str, msg: str, value: Any) -> None:
    if not cond:
        raise SpecError(f"{path}: {msg}, got {value!r}")


def _table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise SpecError(f"{path}: must be a table, got {v!r}" if v is not None else f"{path}: missing table [{path}]")
    return v


def _list_of_tables(v: Any, path: str) -> list[Mapping[str, Any]]:
    _check(isinstance(v, list), path, "must be an array of tables ([[claims]])", v)
    for i, item in enumerate(v):
        _table(item, f"{path}[{i}]")
    return v


def _known(d: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise SpecError(f"{prefix}{unknown[0]}: unknown key; known keys: {list(known)}")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML dotted keys (`train.lr = [...]`) arrive as nested tables; flatten them back to `train.lr`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and not _is_param_table(v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_param_table(v: Mapping[str, Any]) -> bool:
    return "type" in v  # a [design.space] parameter definition, not a section of dotted keys


_AXIS_FIELDS = set(section_fields()["axes"])


def _full_key(key: str, path: str) -> str:
    """`timestep_sampler` -> `axes.timestep_sampler`; dotted keys must exist in RunConfig."""
    full = f"axes.{key}" if key in _AXIS_FIELDS else key
    sections = section_fields()
    section, _, leaf = full.partition(".")
    ok = (section in sections and leaf in sections[section]) or (not leaf and section in sections and not sections[section])
    if not ok:
        raise SpecError(f"{path}: unknown factor {key!r}; use an axes field {sorted(_AXIS_FIELDS)} "
                        f"or a dotted RunConfig key such as 'train.lr'")
    _check(full != "seed", path, "the seed is varied by `seeds`, not as a factor", key)
    return full


def _registry_for(full_key: str) -> Any | None:
    """The registry that names the values of an axis, so typos get the registry's 'choose one of' message."""
    from diffablate.models import axes, data, text

    return {
        "axes.timestep_sampler": axes.TIMESTEP_SAMPLERS, "axes.time_embedding": axes.TIME_EMBEDDINGS,
        "axes.conditioning": axes.CONDITIONINGS, "axes.loss_weighting": axes.LOSS_WEIGHTINGS,
        "data.name": data.DATASETS, "text.encoder": text.TEXT_ENCODERS,
    }.get(full_key)


def _check_value(full: str, value: Any, path: str, base: RunConfig) -> None:
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


def _factors(d: Any, path: str, base: RunConfig, *, required: bool) -> dict[str, list[Any]]:
    flat = _flatten(_table(d if d is not None else ({} if not required else None), path))
    if required and not flat:
        raise SpecError(f"{path}: must name at least one factor with a list of values")
    out: dict[str, list[Any]] = {}
    for key, values in flat.items():
        p = f"{path}.{key}"
        full = _full_key(key, p)
        _check(full not in out, p, "factor given twice", key)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{p}: must be a non-empty list of values, got {values!r}")
        for i, v in enumerate(values):
            _check(not isinstance(v, Mapping), f"{p}[{i}]", "must be a value, not a table", v)
            _check(values.index(v) == i, f"{p}[{i}]", "repeats an earlier value", v)
            _check_value(full, v, f"{p}[{i}]", base)
        out[full] = list(values)
    return out


def _baseline(d: Any, base: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in _flatten(_table(d, "design.baseline")).items():
        p = f"design.baseline.{key}"
        full = _full_key(key, p)
        _check_value(full, v, p, base)
        out[full] = v
    return out


def _override(base: RunConfig, overrides: Mapping[str, Any], path: str) -> RunConfig:
    try:
        return base.with_overrides(overrides)
    except ConfigError as e:
        raise SpecError(f"{path}: {cell_label(overrides)}: {e}") from None


def _cells(base: RunConfig, settings: list[dict[str, Any]], path: str) -> list[Cell]:
    # Every cell is built now, so an invalid combination (e.g. cross-attention with no attention levels)
    # fails before the first trial trains, not hours into the study.
    return [Cell(i, s, _override(base, s, f"{path} cell {i}")) for i, s in enumerate(settings)]


def _class_from(module: Any, name: Any, path: str, base_cls: type) -> type:
    choices = sorted(n for n in getattr(module, "__all__", []) if inspect.isclass(getattr(module, n, None))
                     and issubclass(getattr(module, n), base_cls) and not n.startswith("Base"))
    _check(isinstance(name, str) and name in choices, path, f"must be one of {choices}", name)
    return getattr(module, name)


def _bind(cls: type, args: Any, path: str) -> dict[str, Any]:
    args = dict(_table(args, path))
    params = inspect.signature(cls.__init__).parameters
    for k in args:
        _check(k in params and k != "self", f"{path}.{k}", f"not an argument of {cls.__name__}",
               sorted(n for n in params if n != "self"))
    return args


def _search(design: Mapping[str, Any], base: RunConfig, cells: list[Cell], factors: dict[str, list[Any]]) -> dict[str, Any]:
    import optuna

    sampler = design.get("sampler", "TPESampler")
    sampler_cls = _class_from(optuna.samplers, sampler, "design.sampler", optuna.samplers.BaseSampler)
    _check(sampler != "GridSampler", "design.sampler", "GridSampler is the factorial design; use kind = \"factorial\"", sampler)
    sampler_args = _bind(sampler_cls, design.get("sampler_args", {}), "design.sampler_args")
    pruner = design.get("pruner", "NopPruner")
    pruner_cls = _class_from(optuna.pruners, pruner, "design.pruner", optuna.pruners.BasePruner)
    pruner_args = _bind(pruner_cls, design.get("pruner_args", {}), "design.pruner_args")
    prune_metric = design.get("prune_metric", "heldout_loss")
    _check(isinstance(prune_metric, str) and prune_metric.isidentifier(), "design.prune_metric",
           "must be a metric name the trainer reports at eval steps (e.g. heldout_loss)", prune_metric)
    n_trials = design.get("n_trials")
    _check(isinstance(n_trials, int) and not isinstance(n_trials, bool) and n_trials > 0, "design.n_trials",
           "must be an integer > 0 (trials per cell)", n_trials)
    space_d = _flatten(_table(design.get("space"), "design.space"))
    _check(bool(space_d), "design.space", "must define at least one parameter", space_d)
    space: list[ParamSpec] = []
    for key, pd in space_d.items():
        p = f"design.space.{key}"
        full = _full_key(key, p)
        _check(full not in factors, p, "is already a crossed factor in design.axes", key)
        space.append(_param(full, pd, p, base))
    return {"sampler": sampler, "sampler_args": sampler_args, "pruner": pruner, "pruner_args": pruner_args,
            "prune_metric": prune_metric, "n_trials": n_trials, "space": tuple(space)}


def _param(full: str, pd: Any, p: str, base: RunConfig) -> ParamSpec:
    pd = _table(pd, p)
    tp = pd.get("type")
    _check(tp in PARAM_TYPES, f"{p}.type", f"must be one of {list(PARAM_TYPES)}", tp)
    if tp == "categorical":
        _known(pd, ("type", "choices"), f"{p}.")
        choices = pd.get("choices")
        _check(isinstance(choices, list) and len(choices) >= 1, f"{p}.choices", "must be a non-empty list", choices)
        for i, v in enumerate(choices):
            _check(v is None or isinstance(v, (str, int, float, bool)), f"{p}.choices[{i}]",
                   "must be a string, number or boolean (Optuna stores categoricals as JSON)", v)
            _check_value(full, v, f"{p}.choices[{i}]", base)
        return ParamSpec(full, tp, choices=tuple(choices))
    _known(pd, ("type", "low", "high", "log", "step"), f"{p}.")
    num = (int,) if tp == "int" else (int, float)
    low, high, log, step = pd.get("low"), pd.get("high"), pd.get("log", False), pd.get("step")
    for k, v in (("low", low), ("high", high)):
        _check(isinstance(v, num) and not isinstance(v, bool) and math.isfinite(v), f"{p}.{k}",
               f"must be {'an integer' if tp == 'int' else 'a finite number'}", v)
    _check(low <= high, f"{p}.high", f"must be >= low ({low})", high)
    _check(isinstance(log, bool), f"{p}.log", "must be true or false", log)
    _check(not log or low > 0, f"{p}.low", "must be > 0 when log = true", low)
    if step is not None:
        _check(isinstance(step, num) and not isinstance(step, bool) and step > 0, f"{p}.step", "must be > 0", step)
        _check(not log, f"{p}.step", "cannot be combined with log = true", step)
    for k, v in (("low", low), ("high", high)):
        _check_value(full, v, f"{p}.{k}", base)
    return ParamSpec(full, tp, low=low, high=high, log=log, step=step)


# metric -> (is it computed for this config?, what it needs): the trial's scoring follows cfg.eval.
_METRIC_NEEDS: dict[str, tuple[Any, str]] = {
    "fid": (lambda c: c.eval.fid, "needs eval.fid = true"),
    "kid": (lambda c: c.eval.kid, "needs eval.kid = true"),
    "clip_score": (lambda c: c.eval.clip_score, "needs eval.clip_score = true"),
    "oracle_acc": (lambda c: c.eval.oracle and c.data.name == "shapes", "needs eval.oracle = true and data.name = 'shapes'"),
}


def _metric_enabled(metric: str, cfg: RunConfig) -> bool:
    return metric not in _METRIC_NEEDS or bool(_METRIC_NEEDS[metric][0](cfg))


def _claim(c: Mapping[str, Any], i: int, factors: dict[str, list[Any]], objective: str) -> Claim:
    p = f"claims[{i}]"
    _known(c, _CLAIM_KEYS, f"{p}.")
    for k in ("name", "statement"):
        _check(isinstance(c.get(k), str) and c.get(k, "").strip() != "", f"{p}.{k}", "must be a non-empty string", c.get(k))
    metric = c.get("metric", objective)
    _check(metric in FINAL_METRICS, f"{p}.metric", f"must be one of {list(FINAL_METRICS)}", metric)
    sides = {}
    for side in ("baseline", "variant"):
        d = _flatten(_table(c.get(side), f"{p}.{side}"))
        _check(bool(d), f"{p}.{side}", "must set at least one factor", d)
        norm = {}
        for key, v in d.items():
            fp = f"{p}.{side}.{key}"
            full = _full_key(key, fp)
            _check(full in factors, fp, f"is not a factor of this study's design ({sorted(factors)})", key)
            _check(v in factors[full], fp, f"is not one of the design's values {factors[full]}", v)
            norm[full] = v
        sides[side] = norm
    _check(sides["baseline"] != sides["variant"], f"{p}.variant", "must differ from the baseline", sides["variant"])
    better = c.get("better", "higher" if metric in HIGHER_IS_BETTER else "lower")
    _check(better in ("lower", "higher"), f"{p}.better", "must be 'lower' or 'higher'", better)
    expect = c.get("expect")
    _check(expect in ("baseline_better", "variant_better"), f"{p}.expect", "must be 'baseline_better' or 'variant_better'", expect)
    return Claim(c["name"], c["statement"], metric, sides["baseline"], sides["variant"], better, expect)


def _runtime(d: Any) -> Runtime:
    d = _table(d, "runtime")
    _known(d, _RUNTIME_KEYS, "runtime.")
    for k in _RUNTIME_KEYS:
        if k in d:
            v = d[k]
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= (0 if k == "max_retry" else 1),
                   f"runtime.{k}", "must be an integer >= " + ("0" if k == "max_retry" else "1"), v)
    rt = Runtime(**d)
    _check(rt.grace_period > rt.heartbeat_interval, "runtime.grace_period",
           f"must exceed runtime.heartbeat_interval ({rt.heartbeat_interval})", rt.grace_period)
    return rt


def _jsonable(v: Any) -> Any:
    """TOML dates/times -> strings, so the canonical hash and the MLflow artifact are plain JSON."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
