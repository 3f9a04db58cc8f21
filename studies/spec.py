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

Designs (studies/designs.py, one class each): `factorial` crosses all factors; `one-at-a-time` takes
`[design.baseline]` and changes one factor of `[design.variants]` at a time (a claim's arms are completed
with the baseline's values, so each names exactly one cell); `search` lets an Optuna sampler (`sampler`,
any class of `optuna.samplers`) propose `[design.space]` values for `n_trials` trials per cell of the
optional crossed categorical `[design.axes]`, pruned by `pruner` on the trainer's intermediate
`prune_metric`; `learning-curve` trains `[design.baseline]` per seed and scores it at each of `budgets`.

Claims on a sampling score (fid, kid, clip_score, oracle_acc, class_acc) are judged under each entry of
the sampling panel (`eval.panel_samplers` x `eval.panel_guidance`), or under the entries a claim lists in
`panel = [...]`. `expect = "variant_no_worse"` is a non-inferiority claim with a stated `margin`.
`[[controls]]` prove the instrument in the same study::

    [[controls]]                 # the baseline against a replicate of itself: must show no difference
    name = "null"
    kind = "null"                # adds a replicate cell (RunConfig.replicate = 1) of design.baseline
    metric = "oracle_acc"
    [[controls]]                 # a known answer: must come out supported
    name = "text-matters"
    kind = "positive"
    statement = "Captions reach the UNet: without conditioning the oracle fails."
    metric = "oracle_acc"
    baseline = { conditioning = "cross-attention" }
    variant = { conditioning = "none" }
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from diffablate.metrics.names import entry_name, panel_metric
from diffablate.models.config import ConfigError, RunConfig
from diffablate.studies.designs import (
    DESIGNS, Cell, Design, ParamSpec, SpecError, build_cells, cell_label, check, flatten, full_key, known, table,
)

__all__ = ["Cell", "Claim", "ParamSpec", "Runtime", "SpecError", "StudySpec", "cell_label", "load_spec",
           "parse_spec", "spec_from_dict"]

DIRECTIONS = ("minimize", "maximize")
# Scores computed once per sampling-panel entry (logged `<score>/<entry>`, metrics/names.py). A claim on one
# is judged under each entry it names (default: all); an objective on one uses the primary entry.
PANEL_SCORES = ("fid", "kid", "clip_score", "oracle_acc", "class_acc")
# Final per-trial metrics (the contract's names) a spec may optimise or make claims about.
FINAL_METRICS = PANEL_SCORES + ("final_train_loss", "final_heldout_loss", "train_wall_s", "img_per_s_mean")
# Metrics whose natural direction is "higher is better"; everything else in FINAL_METRICS is lower-better.
HIGHER_IS_BETTER = frozenset({"clip_score", "oracle_acc", "class_acc", "img_per_s_mean"})
EXPECTS = ("baseline_better", "variant_better", "variant_no_worse")
_TOP_KEYS = ("name", "description", "seeds", "base", "eval", "design", "claims", "controls", "runtime")
_CLAIM_KEYS = ("name", "statement", "metric", "baseline", "variant", "better", "expect", "margin", "panel")
_CONTROL_KEYS = ("name", "kind", "statement", "metric", "panel", "arm", "replicate", "baseline", "variant", "better",
                 "expect")
_RUNTIME_KEYS = ("heartbeat_interval", "grace_period", "max_retry")
ROLES = ("claim", "null-control", "positive-control")


@dataclass(frozen=True)
class Claim:
    """A claim (or a control) compares two arms on one metric; `role` says which it is.

    Controls prove the instrument in the same study (issue 14): a *null control* compares the baseline with
    a replicate of itself (other random streams, same seeds) and must show no difference; a *positive
    control* has a known answer and must come out supported. The report checks them before any verdict.
    """

    name: str
    statement: str
    metric: str
    baseline: dict[str, Any]
    variant: dict[str, Any]
    better: str
    expect: str  # baseline_better | variant_better | variant_no_worse | no_difference (null controls)
    margin: float | None = None  # non-inferiority margin (expect = variant_no_worse), in the metric's units
    panel: tuple[str, ...] | None = None  # entries it is judged on (None: every entry of the study's panel)
    role: str = "claim"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "statement": self.statement, "metric": self.metric, "baseline": self.baseline,
                "variant": self.variant, "better": self.better, "expect": self.expect, "margin": self.margin,
                "panel": list(self.panel) if self.panel is not None else None, "role": self.role}


@dataclass(frozen=True)
class Runtime:
    """Fault tolerance: a worker silent for `grace_period` s loses its trial, which is retried `max_retry` times."""

    heartbeat_interval: int = 30  # a heartbeat is one small DB write; 30 s is negligible load
    grace_period: int = 120  # > heartbeat_interval with margin for a busy SQLite file or a long eval step
    max_retry: int = 2  # a trial that kills its worker twice more is a bug, not bad luck


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec: the cells (factor settings), seeds and how Optuna walks them (`design`)."""

    name: str
    description: str
    seeds: tuple[int, ...]
    design: Design
    objective: str
    direction: str
    base: RunConfig
    factors: dict[str, list[Any]]  # full dotted key -> values (factorial, search's crossed axis, variants)
    cells: tuple[Cell, ...]
    claims: tuple[Claim, ...]  # claims and controls (Claim.role)
    runtime: Runtime
    raw: dict[str, Any] = field(repr=False)
    baseline: dict[str, Any] = field(default_factory=dict)  # one-at-a-time / learning-curve reference cell
    budgets: tuple[int, ...] = ()  # learning-curve: training steps at which every trial is scored
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
    def kind(self) -> str:
        return self.design.kind

    @property
    def spec_hash(self) -> str:
        """sha256 (16 hex) of the canonical parsed spec: comments and formatting do not change it."""
        canon = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def n_planned(self) -> int:
        return len(self.cells) * self.design.n_per_cell(self)

    def cell_config(self, cell: Cell, seed: int, params: Mapping[str, Any] | None = None) -> RunConfig:
        """The RunConfig of one trial: base + cell overrides + searched params + seed."""
        return cell.cfg.with_overrides({**(params or {}), "seed": seed})

    def objective_metric(self, cfg: RunConfig) -> str:
        """The logged metric the Optuna objective reads for a trial of `cfg` (a panel score: the primary entry)."""
        return objective_metric(self.objective, cfg)

    def arm_name(self, cell: Cell) -> str:
        """A short readable name of a cell for run names and progress lines: only what sets it apart from the
        design's baseline (one-at-a-time: `conditioning=none`; the baseline itself: `baseline`), axis fields
        without their `axes.` prefix (`timestep_sampler=sequential`). `cell.label` stays the full, stable key."""
        def shared(k: str, v: Any) -> bool:  # the baseline's value, or one every cell has (a learning curve's steps)
            return (k in self.baseline and same_value(self.baseline[k], v)) or all(
                k in c.overrides and same_value(c.overrides[k], v) for c in self.cells)

        diff = {k: v for k, v in cell.overrides.items() if k != "replicate" and not shared(k, v)}
        parts = [f"{k.removeprefix('axes.')}={cell_label({k: v}).partition('=')[2]}" for k, v in sorted(diff.items())]
        name = " ".join(parts) or ("baseline" if self.baseline else "base")
        replicate = cell.overrides.get("replicate", 0)
        return f"{name} replicate {replicate}" if replicate else name

    def claims_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.claims]

    def panel_json(self) -> dict[str, Any]:
        """The study's sampling panel (parent-run artifact panel.json): entries, primary entry, sampler flags."""
        from diffablate.models.diffusion import sampler_flags

        ev = self.base.eval
        return {"entries": [entry_name(s, g) for s, g in ev.panel()], "primary": entry_name(ev.sampler, ev.guidance_scale),
                "steps": ev.sampling_steps, "n_samples": ev.n_samples, "flags": sampler_flags(self.base)}


def objective_metric(score: str, cfg: RunConfig) -> str:
    """`fid` -> `fid/<primary entry>` for panel scores; other metric names unchanged."""
    if score in PANEL_SCORES:
        return panel_metric(score, entry_name(cfg.eval.sampler, cfg.eval.guidance_scale))
    return score


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
    table(raw, "spec")
    known(raw, _TOP_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0") or name.startswith("."):
        raise SpecError(f"name: must be a non-empty string without '/' (it names the study and its directory), got {name!r}")
    description = raw.get("description", "")
    check(isinstance(description, str), "description", "must be a string", description)
    seeds = raw.get("seeds")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SpecError(f"seeds: must be a non-empty list of integers >= 0, got {seeds!r}")
    check(len(set(seeds)) == len(seeds), "seeds", "must not repeat a seed", seeds)

    # Base config: [base] nested overrides, then [eval] on top.
    base_d = dict(table(raw.get("base", {}), "base"))
    eval_d = table(raw.get("eval", {}), "eval")
    if eval_d:
        check(isinstance(base_d.get("eval", {}), Mapping), "base.eval", "must be a table", base_d.get("eval"))
        base_d["eval"] = {**base_d.get("eval", {}), **eval_d}
    check("seed" not in base_d, "base.seed", "is set by `seeds`, not in [base]", base_d.get("seed"))
    try:
        base = RunConfig.from_dict(base_d)
    except ConfigError as e:
        msg = str(e)
        from_eval = msg.startswith("eval.") and msg[5:].split(":")[0].split("[")[0] in eval_d
        raise SpecError(msg if from_eval else f"base.{msg}") from None

    design_d = table(raw.get("design"), "design")
    kind = design_d.get("kind")
    check(kind in DESIGNS, "design.kind", f"must be one of {list(DESIGNS)}", kind)
    design = DESIGNS.get(kind)()
    known(design_d, design.keys, "design.")
    objective = design_d.get("objective", "final_heldout_loss")
    check(objective in FINAL_METRICS, "design.objective", f"must be one of {list(FINAL_METRICS)}", objective)
    direction = design_d.get("direction", "maximize" if objective in HIGHER_IS_BETTER else "minimize")
    check(direction in DIRECTIONS, "design.direction", f"must be one of {list(DIRECTIONS)}", direction)
    parsed = design.parse(design_d, base)
    factors, cells = dict(parsed.factors), list(parsed.cells)

    claims = [_claim(c, i, factors, objective, cells) for i, c in enumerate(_list_of_tables(raw.get("claims", []), "claims"))]
    check(not claims or design.makes_claims, "claims",
          f"a {kind} study makes no claims (its report picks the training budget)", [c.name for c in claims])
    controls = [_control(c, i, design, parsed.baseline, factors, cells, base, objective)
                for i, c in enumerate(_list_of_tables(raw.get("controls", []), "controls"))]
    claims = [replace(c, baseline=design.complete_arm(c.baseline, parsed.baseline),
                      variant=design.complete_arm(c.variant, parsed.baseline)) for c in claims]
    everything = claims + controls
    for i, c in enumerate(everything):
        where = f"claims[{i}]" if i < len(claims) else f"controls[{i - len(claims)}]"
        selected = {}
        for side in ("baseline", "variant"):
            arm = getattr(c, side)
            selected[side] = [cell.index for cell in cells if _arm_matches(arm, cell)]
            check(bool(selected[side]), f"{where}.{side}", "matches no cell of the design" + design.arm_hint, arm)
        check(selected["baseline"] != selected["variant"], f"{where}.variant",
              f"selects the same cells as the baseline arm ({[cells[j].label for j in selected['variant']]}), "
              "so the claim compares an arm with itself", c.variant)
        # A metric the eval config switches off would fail every trial at its very end: refuse it now.
        for cell in cells:
            if not _metric_enabled(c.metric, cell.cfg):
                raise SpecError(f"{where}.metric: {c.metric!r} is not computed with this eval config "
                                f"({_METRIC_NEEDS[c.metric][1]})")
    for cell in cells:
        if not _metric_enabled(objective, cell.cfg):
            raise SpecError(f"design.objective: {objective!r} is not computed with this eval config "
                            f"({_METRIC_NEEDS[objective][1]})")
    names = [c.name for c in everything]
    check(len(set(names)) == len(names), "claims", "names must be unique (claims and controls together)", names)
    runtime = _runtime(raw.get("runtime", {}))
    return StudySpec(name=name, description=description, seeds=tuple(seeds), design=design, objective=objective,
                     direction=direction, base=base, factors=factors, cells=tuple(cells), claims=tuple(everything),
                     runtime=runtime, raw=_jsonable(raw), baseline=parsed.baseline, **parsed.extra)


# --- pieces -----------------------------------------------------------------------------------------


def _list_of_tables(v: Any, path: str) -> list[Mapping[str, Any]]:
    check(isinstance(v, list), path, f"must be an array of tables ([[{path}]])", v)
    for i, item in enumerate(v):
        table(item, f"{path}[{i}]")
    return v


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps TOML's types apart where Python does not: `true` is not the integer 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _arm_matches(arm: Mapping[str, Any], cell: Cell) -> bool:
    """Does the cell's resolved config have every value the arm names? (Read from the config, not the cell's
    overrides, so an arm may name a value the cell inherits, such as `replicate = 0`.)"""
    flat = cell.cfg.flat()
    return all(same_value(json.loads(flat[k]) if isinstance(flat.get(k), str) and isinstance(v, list) else flat.get(k), v)
               for k, v in arm.items())


# metric -> (is it computed for this config?, what it needs): the trial's scoring follows cfg.eval.
_METRIC_NEEDS: dict[str, tuple[Any, str]] = {
    "fid": (lambda c: c.eval.fid, "needs eval.fid = true"),
    "kid": (lambda c: c.eval.kid, "needs eval.kid = true"),
    "clip_score": (lambda c: c.eval.clip_score, "needs eval.clip_score = true"),
    "oracle_acc": (lambda c: c.eval.oracle and c.data.name == "shapes", "needs eval.oracle = true and data.name = 'shapes'"),
    "class_acc": (lambda c: c.eval.oracle and c.data.name == "fashion-mnist",
                  "needs eval.oracle = true and data.name = 'fashion-mnist'"),
}


def _metric_enabled(metric: str, cfg: RunConfig) -> bool:
    return metric not in _METRIC_NEEDS or bool(_METRIC_NEEDS[metric][0](cfg))


def _arm(d: Any, path: str, factors: dict[str, list[Any]]) -> dict[str, Any]:
    d = flatten(table(d, path))
    check(bool(d), path, "must set at least one factor", d)
    norm = {}
    for key, v in d.items():
        fp = f"{path}.{key}"
        full = full_key(key, fp)
        check(full in factors, fp, f"is not a factor of this study's design ({sorted(factors)})", key)
        check(any(same_value(v, x) for x in factors[full]), fp, f"is not one of the design's values {factors[full]}", v)
        norm[full] = v
    return norm


def _metric_and_panel(c: Mapping[str, Any], p: str, default: str, cells: list[Cell]) -> tuple[str, tuple[str, ...] | None]:
    metric = c.get("metric", default)
    check(metric in FINAL_METRICS, f"{p}.metric", f"must be one of {list(FINAL_METRICS)}", metric)
    panel = c.get("panel")
    if panel is None:
        return metric, None
    check(metric in PANEL_SCORES, f"{p}.panel", f"only a sampling score ({list(PANEL_SCORES)}) has panel entries",
          panel)
    check(isinstance(panel, list) and bool(panel) and all(isinstance(e, str) for e in panel), f"{p}.panel",
          "must be a non-empty list of panel entry names such as 'ddim-g3'", panel)
    check(len(set(panel)) == len(panel), f"{p}.panel", "repeats an entry", panel)
    for cell in cells:
        entries = [entry_name(s, g) for s, g in cell.cfg.eval.panel()]
        for j, e in enumerate(panel):
            check(e in entries, f"{p}.panel[{j}]", f"is not an entry of the sampling panel {entries} "
                  "(eval.panel_samplers x eval.panel_guidance)", e)
    return metric, tuple(panel)


def _claim(c: Mapping[str, Any], i: int, factors: dict[str, list[Any]], objective: str, cells: list[Cell]) -> Claim:
    p = f"claims[{i}]"
    known(c, _CLAIM_KEYS, f"{p}.")
    for k in ("name", "statement"):
        check(isinstance(c.get(k), str) and c.get(k, "").strip() != "", f"{p}.{k}", "must be a non-empty string", c.get(k))
    metric, panel = _metric_and_panel(c, p, objective, cells)
    sides = {side: _arm(c.get(side), f"{p}.{side}", factors) for side in ("baseline", "variant")}
    check(sides["baseline"] != sides["variant"], f"{p}.variant", "must differ from the baseline", sides["variant"])
    better = c.get("better", "higher" if metric in HIGHER_IS_BETTER else "lower")
    check(better in ("lower", "higher"), f"{p}.better", "must be 'lower' or 'higher'", better)
    expect = c.get("expect")
    check(expect in EXPECTS, f"{p}.expect", "must be 'baseline_better' or 'variant_better' (or 'variant_no_worse' "
          "with a margin: at least as good)", expect)
    margin = c.get("margin")
    if expect == "variant_no_worse":
        check(isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin) and margin > 0,
              f"{p}.margin", "must be a finite number > 0 for expect = 'variant_no_worse' (the non-inferiority "
              "margin, in the metric's units)", margin)
        margin = float(margin)
    else:
        check(margin is None, f"{p}.margin", "is only used with expect = 'variant_no_worse'", margin)
    return Claim(c["name"], c["statement"], metric, sides["baseline"], sides["variant"], better, expect, margin, panel)


def _control(c: Mapping[str, Any], i: int, design: Design, baseline: dict[str, Any], factors: dict[str, list[Any]],
             cells: list[Cell], base: RunConfig, objective: str) -> Claim:
    """A `[[controls]]` table -> a Claim with its role; a null control also adds its replicate cell."""
    p = f"controls[{i}]"
    known(c, _CONTROL_KEYS, f"{p}.")
    kind = c.get("kind")
    check(kind in ("null", "positive"), f"{p}.kind", "must be 'null' or 'positive'", kind)
    name = c.get("name")
    check(isinstance(name, str) and name.strip() != "", f"{p}.name", "must be a non-empty string", name)
    metric, panel = _metric_and_panel(c, p, objective, cells)
    better = c.get("better", "higher" if metric in HIGHER_IS_BETTER else "lower")
    check(better in ("lower", "higher"), f"{p}.better", "must be 'lower' or 'higher'", better)
    if kind == "positive":
        for k in ("arm", "replicate"):
            check(k not in c, f"{p}.{k}", "is for null controls; a positive control names baseline and variant", c.get(k))
        statement = c.get("statement")
        check(isinstance(statement, str) and statement.strip() != "", f"{p}.statement", "must be a non-empty string",
              statement)
        sides = {side: design.complete_arm(_arm(c.get(side), f"{p}.{side}", factors), baseline)
                 for side in ("baseline", "variant")}
        expect = c.get("expect", "baseline_better")
        check(expect in ("baseline_better", "variant_better"), f"{p}.expect",
              "must be 'baseline_better' or 'variant_better' (a positive control has a known winner)", expect)
        return Claim(name, statement, metric, sides["baseline"], sides["variant"], better, expect, None, panel,
                     "positive-control")
    for k in ("baseline", "variant", "expect"):
        check(k not in c, f"{p}.{k}", "is for positive controls; a null control compares its arm with a replicate "
              "of itself", c.get(k))
    check(design.supports_null_control, f"{p}.kind",
          f"a null control adds a replicate of the baseline cell, which a {design.kind!r} design's plan cannot hold; "
          "use a one-at-a-time design", kind)
    arm = c.get("arm")
    arm = dict(baseline) if arm is None else design.complete_arm(_arm(arm, f"{p}.arm", factors), baseline)
    replicate = c.get("replicate", 1)
    check(isinstance(replicate, int) and not isinstance(replicate, bool) and replicate >= 1, f"{p}.replicate",
          "must be an integer >= 1 (0 is the cell itself)", replicate)
    check(not any(cell.cfg.replicate == replicate and _arm_matches(arm, cell) for cell in cells), f"{p}.replicate",
          "another null control already adds this replicate of the same arm", replicate)
    # The replicate cell: the arm's settings with independent random streams (RunConfig.replicate). It goes
    # right after the cells already there for its arm, so trials (planned cell by cell) reach the controls
    # first: a study cut short still has its instrument check.
    cell = build_cells(base, [{**arm, "replicate": replicate}], f"{p} replicate cell")[0]
    at = 1 + max(i for i, c in enumerate(cells) if _arm_matches(arm, c))
    cells.insert(at, cell)
    cells[:] = [replace(c, index=i) for i, c in enumerate(cells)]
    factors.setdefault("replicate", [0])
    if replicate not in factors["replicate"]:
        factors["replicate"].append(replicate)
    statement = c.get("statement") or (f"The instrument shows no difference between {cell_label(arm)} and a replicate "
                                       f"of itself (replicate {replicate}: other random streams, same seeds).")
    return Claim(name, statement, metric, {**arm, "replicate": 0}, {**arm, "replicate": replicate}, better,
                 "no_difference", None, panel, "null-control")


def _runtime(d: Any) -> Runtime:
    d = table(d, "runtime")
    known(d, _RUNTIME_KEYS, "runtime.")
    for k in _RUNTIME_KEYS:
        if k in d:
            v = d[k]
            check(isinstance(v, int) and not isinstance(v, bool) and v >= (0 if k == "max_retry" else 1),
                  f"runtime.{k}", "must be an integer >= " + ("0" if k == "max_retry" else "1"), v)
    rt = Runtime(**d)
    check(rt.grace_period > rt.heartbeat_interval, "runtime.grace_period",
          f"must exceed runtime.heartbeat_interval ({rt.heartbeat_interval})", rt.grace_period)
    return rt


def _jsonable(v: Any) -> Any:
    """TOML dates/times -> strings, so the canonical hash and the MLflow artifact are plain JSON."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
