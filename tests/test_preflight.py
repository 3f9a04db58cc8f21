"""Issue 16: every input a user can get wrong is refused by the one preflight, before anything is created or
computed - exit 2, an `error:` line naming the field or file, no traceback, and the directory tree (spec,
datasets, an existing study's databases) byte-for-byte what it was (hashed before and after).

The cases are beyond tests/test_malformed.py's: non-finite and huge numbers, devices and perf switches this
machine cannot honour, settings beyond the noise schedule, missing local CLIP / judge directories, absurd
sizes, degenerate claims, search spaces and prune metrics a trial cannot honour, Optuna arguments that only
fail when the sampler or pruner is built, names beyond file-system limits, storage and tracking URLs that do
not parse or cannot work, FIFOs, non-UTF-8 files, decompression bombs, escaping or truncated dataset files,
and an existing study a refused command must not touch. All in-process CLI calls: no subprocess, no training.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tomli_w
from typer.testing import CliRunner

from diffablate.studies.cli import app

CUDA = __import__("torch").cuda.is_available()

FAKE_TRIAL = '''
def ok(run):
    """Stands in for train+evaluate: refusals never reach a trial."""
    return {"final_heldout_loss": 1.0 + run.seed}
'''


# --- helpers -----------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every directory and file under `root` (hidden ones too): path -> "dir" or the sha256 of its bytes.
    FIFOs and other special files count by type only (reading one would block)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[str(Path(dirpath, d).relative_to(root))] = "dir"
        for f in filenames:
            p = Path(dirpath, f)
            rel = str(p.relative_to(root))
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "special"
    return out


def invoke(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(app, args)
    return r.exit_code, r.output


def refused(root: Path, args: list[str], *needles: str) -> str:
    """Run the CLI; assert exit 2, every needle in an `error:` line, no traceback, and `root` unchanged."""
    before = tree(root)
    code, out = invoke(args)
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors, out
    for needle in needles:
        assert any(needle in line for line in errors), (needle, out)
    assert "Traceback" not in out and "internal error" not in out, out
    assert tree(root) == before, "a refused command created or changed files"
    return out


def _base_spec(base: dict[str, Any]) -> dict[str, Any]:
    return {"name": "pf", "seeds": [0], "base": base,
            "design": {"kind": "factorial", "axes": {"timestep_sampler": ["uniform"]}},
            "runtime": {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 1}}


@pytest.fixture()
def base_spec(tiny_base: dict[str, Any]) -> dict[str, Any]:
    """A valid one-trial factorial study on conftest's tiny config; each case breaks one thing in it."""
    return _base_spec(tiny_base)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's whole world: the current directory (so default paths such as studies-out/ are inside)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        *parents, leaf = path.split("/")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return f


def _search(space: dict | None = None, **design: Any) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        d["design"] = {"kind": "search", "sampler": "RandomSampler", "n_trials": 1,
                       "space": space or {"train": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
                       **design}
    return f


def _oat_claim(d: dict) -> None:
    # After completion with the baseline (time_embedding "on"), the variant {time_embedding = "on"} IS the baseline.
    d["design"] = {"kind": "one-at-a-time", "baseline": {"timestep_sampler": "uniform", "time_embedding": "on"},
                   "variants": {"timestep_sampler": ["sequential"], "time_embedding": ["off"]}}
    d["claims"] = [{"name": "c", "statement": "s", "baseline": {"timestep_sampler": "uniform"},
                    "variant": {"time_embedding": "on"}, "expect": "variant_better"}]


def _bool_claim(d: dict) -> None:
    # TOML `true` == 1 in Python: the claim would silently compare the warmup_steps = 1 cell.
    d["design"] = {"kind": "factorial", "axes": {"train": {"warmup_steps": [0, 1]}}}
    d["claims"] = [{"name": "c", "statement": "s", "baseline": {"train.warmup_steps": 0},
                    "variant": {"train.warmup_steps": True}, "expect": "variant_better"}]


# (case id, mutation of the spec dict, the field the error must name)
SPEC_CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("inf-lr", _set("base/train/lr", float("inf")), "train.lr"),
    ("minus-inf-weight-decay", _set("base/train/weight_decay", float("-inf")), "train.weight_decay"),
    ("inf-guidance", _set("base/eval/guidance_scale", float("inf")), "eval.guidance_scale"),
    ("nan-axis-option", _set("base/axes/min_snr_gamma", float("nan")), "axes.min_snr_gamma"),
    ("inf-diverge-loss", _set("base/train/diverge_loss", float("inf")), "train.diverge_loss"),
    ("huge-int-for-float", _set("base/train/lr", 10**400), "train.lr"),
    ("huge-int-steps", _set("base/train/steps", 2**70), "train.steps"),
    ("huge-int-seed-factor", _set("design/axes", {"train": {"batch_size": [4, 2**64]}}), "train.batch_size"),
    ("negative-data-seed", _set("base/data/seed", -1), "data.seed"),
    ("zero-norm-groups", _set("base/model/norm_num_groups", 0), "model.norm_num_groups"),
    ("zero-head-dim", _set("base/model/attention_head_dim", 0), "model.attention_head_dim"),
    ("device-malformed", _set("base/device", "cuda:x"), "device"),
    ("device-typo", _set("base/device", "cudaa"), "device"),
    ("device-cuda-without-cuda", _set("base/device", "cuda"), "device"),
    ("device-cuda-index", _set("base/device", "cuda:7"), "device"),
    ("cuda-graphs-on-cpu", _set("base/perf/cuda_graphs", "on"), "perf.cuda_graphs"),
    ("sampling-steps-beyond-schedule", _set("base/eval/sampling_steps", 5000), "eval.sampling_steps"),
    ("buckets-beyond-short-schedule", lambda d: (_set("base/diffusion/num_train_timesteps", 10)(d),
                                                 _set("base/eval/timestep_buckets", 20)(d)), "eval.timestep_buckets"),
    ("buckets-beyond-schedule", _set("base/eval/timestep_buckets", 2000), "eval.timestep_buckets"),
    ("missing-judge", _set("base/eval/judge_path", "/no/such/judge"), "eval.judge_path"),
    ("missing-clip-encoder", _set("base/text", {"encoder": "clip", "clip_path": "/no/such/clip"}), "text.clip_path"),
    ("absurd-n-train", _set("base/data/n_train", 10**12), "data.n_train"),
    ("absurd-n-samples", _set("base/eval/n_samples", 10**13), "eval.n_samples"),
    ("absurd-batch", _set("base/train/batch_size", 10**12), "train.batch_size"),
    ("claim-arm-is-baseline", _oat_claim, "claims[0].variant"),
    ("claim-true-is-not-1", _bool_claim, "claims[0].variant"),
    ("float-search-on-int-field",
     _search({"train": {"warmup_steps": {"type": "float", "low": 0, "high": 10}}}), "design.space.train.warmup_steps"),
    ("prune-metric-typo", _search(prune_metric="heldout_los", pruner="MedianPruner"), "design.prune_metric"),
    ("sampler-seed-is-a-date", _search(sampler_args={"seed": datetime.date(1979, 5, 27)}),
     "design.sampler_args"),
    ("pruner-negative-warmup", _search(pruner="MedianPruner", pruner_args={"n_warmup_steps": -1}),
     "design.pruner_args"),
    ("pruner-missing-argument", _search(pruner="PatientPruner"), "design.pruner_args"),
    ("pruner-needs-a-bound", _search(pruner="ThresholdPruner"), "design.pruner_args"),
    ("name-too-long", _set("name", "s" * 300), "name"),
    ("name-control-character", _set("name", "two\nlines"), "name"),
    ("cell-only-bad-in-one-cell", _set("design/axes", {"perf": {"cuda_graphs": ["off", "on"]}}), "perf.cuda_graphs"),
]


NEEDS_NO_CUDA = {"device-cuda-without-cuda", "device-cuda-index", "cuda-graphs-on-cpu", "cell-only-bad-in-one-cell"}


@pytest.mark.parametrize("case,mutate,needle", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_study_run_refuses_before_anything(home: Path, base_spec: dict, case: str, mutate: Callable, needle: str) -> None:
    if case in NEEDS_NO_CUDA and CUDA:
        pytest.skip("checks what a machine without CUDA refuses")
    if case == "missing-judge":
        d_eval = base_spec["base"]["eval"]
        d_eval["clip_score"] = True
    d = copy.deepcopy(base_spec)
    mutate(d)
    spec = home / "spec.toml"
    spec.write_text(tomli_w.dumps(d))
    out = refused(home, ["study", "run", str(spec)], needle)
    if case == "cell-only-bad-in-one-cell":
        assert "(in cell perf.cuda_graphs=on)" in out, out


def test_study_run_reports_every_problem_at_once(home: Path, base_spec: dict) -> None:
    """Three independent problems - a missing judge directory, a sampler argument the sampler refuses, a storage
    path that is a directory - all in one run, one `error:` line each."""
    d = copy.deepcopy(base_spec)
    _search(pruner="MedianPruner", pruner_args={"n_warmup_steps": -1})(d)
    d["base"]["eval"].update(clip_score=True, judge_path=str(home / "no-judge"))
    (home / "a-dir").mkdir()
    spec = home / "spec.toml"
    spec.write_text(tomli_w.dumps(d))
    out = refused(home, ["study", "run", str(spec), "--storage", f"sqlite:///{home / 'a-dir'}"],
                  "eval.judge_path", "design.pruner_args", "--storage")
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 3, out


# --- the spec file itself -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)  # before the fix a FIFO blocked the reader forever
@pytest.mark.parametrize("kind", ["fifo", "directory", "not-utf8", "5000-digit-integer", "nul-bytes"])
def test_unreadable_spec_file(home: Path, base_spec: dict, kind: str) -> None:
    spec = home / "spec.toml"
    if kind == "fifo":
        os.mkfifo(spec)
    elif kind == "directory":
        spec.mkdir()
    elif kind == "not-utf8":
        spec.write_bytes(tomli_w.dumps(base_spec).encode() + b'\ndescription = "caf\xe9"\n')
    elif kind == "5000-digit-integer":  # Python refuses to convert it; tomllib raises a plain ValueError
        spec.write_text(tomli_w.dumps(base_spec) + "\n[runtime2]\nx = " + "9" * 5000 + "\n")
    else:
        spec.write_bytes(b"name = 'a\x00b'\n")
    refused(home, ["study", "run", str(spec)], str(spec))


# --- data files -------------------------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (a decompression bomb as far as PIL's guard is concerned)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _folder(root: Path, edit: Callable[[Path, list[dict]], None] | None = None) -> Path:
    from PIL import Image

    root.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (20, 20), (40 * i, 10, 200)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"image {i}"})
    if edit is not None:
        edit(root, rows)
    if not (root / "metadata.jsonl").exists():
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _add_row(name: str) -> Callable[[Path, list[dict]], None]:
    return lambda root, rows: rows.append({"file_name": name, "text": "x"})


def _bomb(root: Path, rows: list[dict]) -> None:
    _png_header_only(root / "bomb.png", 20000, 20000)  # 400 Mpx: over twice PIL's MAX_IMAGE_PIXELS
    rows.append({"file_name": "bomb.png", "text": "boom"})


def _fifo_image(root: Path, rows: list[dict]) -> None:
    os.mkfifo(root / "pipe.png")
    rows.append({"file_name": "pipe.png", "text": "blocks"})


def _fifo_metadata(root: Path, rows: list[dict]) -> None:
    os.mkfifo(root / "metadata.jsonl")


def _latin1_metadata(root: Path, rows: list[dict]) -> None:
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "text": "caf\xe9"}\n' * 4)


def _symlink_out(root: Path, rows: list[dict]) -> None:
    (root.parent / "outside.png").write_bytes((root / "0.png").read_bytes())
    (root / "link.png").symlink_to(root.parent / "outside.png")
    rows.append({"file_name": "link.png", "text": "escapes through a link"})


FOLDER_CASES = [
    ("file-name-escapes", _add_row("../secret.png"), "metadata.jsonl:5"),
    ("file-name-absolute", _add_row("/etc/hostname"), "metadata.jsonl:5"),
    ("file-name-symlink-out", _symlink_out, "metadata.jsonl:5"),
    ("file-name-not-a-string", _add_row(7), "metadata.jsonl:5"),  # type: ignore[arg-type]
    ("decompression-bomb", _bomb, "bomb.png"),
    ("fifo-image", _fifo_image, "pipe.png"),
    ("fifo-metadata", _fifo_metadata, "metadata.jsonl"),
    ("metadata-not-utf8", _latin1_metadata, "metadata.jsonl"),
]


@pytest.mark.timeout(60)  # a FIFO used to block the reader forever
@pytest.mark.parametrize("case,edit,needle", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_folder_dataset(home: Path, base_spec: dict, case: str, edit: Callable, needle: str) -> None:
    root = _folder(home / "imgs", edit)
    d = copy.deepcopy(base_spec)
    d["base"]["data"] = {"name": "folder", "path": str(root), "resolution": 16, "n_train": 0, "n_heldout": 1}
    spec = home / "spec.toml"
    spec.write_text(tomli_w.dumps(d))
    refused(home, ["study", "run", str(spec)], needle)
    # `train` runs the same data checks
    refused(home, ["train", "--workdir", str(home / "wd"), "--set", "device=cpu", "--set", "data.name=folder",
                   "--set", f"data.path={json.dumps(str(root))}", "--set", "data.resolution=16"], needle)


def _fashion(root: Path, *, n: int = 20, truncate: int = 0, magic: int = 0x803, labels: int | None = None) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", n)):
        imgs = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8).tobytes()
        header = np.array([magic, count, 28, 28], dtype=">u4").tobytes()
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + imgs[: len(imgs) - truncate])
        lab = (np.arange(labels if labels is not None else count) % 10).astype(np.uint8)
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0x801, len(lab)], dtype=">u4").tobytes() + lab.tobytes())
    return root


@pytest.mark.parametrize("case", ["truncated", "foreign-header", "labels-mismatch", "empty-folder", "not-gzip"])
def test_bad_fashion_mnist_files(home: Path, base_spec: dict, case: str) -> None:
    root = home / "fm"
    if case == "truncated":
        _fashion(root, truncate=784 * 3 + 5)
    elif case == "foreign-header":
        _fashion(root, magic=0x0D03)
    elif case == "labels-mismatch":
        _fashion(root, labels=7)
    elif case == "empty-folder":
        root.mkdir()
    else:
        _fashion(root)
        (root / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes, not gzip")
    d = copy.deepcopy(base_spec)
    d["base"]["data"] = {"name": "fashion-mnist", "path": str(root), "resolution": 16, "n_train": 0,
                         "n_heldout": 8}
    spec = home / "spec.toml"
    spec.write_text(tomli_w.dumps(d))
    refused(home, ["study", "run", str(spec)], "data.path" if case == "empty-folder" else "idx")


# --- stores -------------------------------------------------------------------------------------------------------


STORAGE_CASES = [
    ("sqlite-is-a-directory", lambda h: f"sqlite:///{h / 'a-dir'}"),
    ("sqlite-is-not-sqlite", lambda h: f"sqlite:///{h / 'notes.txt'}"),
    ("sqlite-under-a-file", lambda h: f"sqlite:///{h / 'notes.txt'}/optuna.db"),
    ("sqlite-in-memory", lambda h: "sqlite://"),
    ("journal-under-a-file", lambda h: f"journal:{h / 'notes.txt'}/optuna.journal"),
    ("journal-is-a-directory", lambda h: f"journal:{h / 'a-dir'}"),
    ("port-not-a-number", lambda h: "postgresql://u@localhost:notaport/db"),
    ("control-character", lambda h: "sqlite:///x.db\nDROP"),
]


@pytest.mark.parametrize("case,url", STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_bad_storage(home: Path, base_spec: dict, case: str, url: Callable[[Path], str]) -> None:
    (home / "a-dir").mkdir()
    (home / "notes.txt").write_text("not a database")
    spec = home / "spec.toml"
    spec.write_text(tomli_w.dumps(base_spec))
    refused(home, ["study", "run", str(spec), "--storage", url(home)], "--storage")


TRACKING_CASES = [
    ("ipv6-unclosed", "http://[::1"),
    ("port-out-of-range", "http://localhost:99999"),
    ("db-port-not-a-number", "postgresql://u@localhost:notaport/db"),
    ("control-character", "http://localhost:5000/\nx"),
    ("sqlite-is-a-directory", "sqlite:///{home}/a-dir"),
    ("sqlite-is-not-sqlite", "sqlite:///{home}/notes.txt"),
]


@pytest.mark.parametrize("case,uri", TRACKING_CASES, ids=[c[0] for c in TRACKING_CASES])
def test_bad_tracking_uri(home: Path, base_spec: dict, tiny_sets: list[str], case: str, uri: str) -> None:
    (home / "a-dir").mkdir()
    (home / "notes.txt").write_text("not a database")
    uri = uri.format(home=home)
    spec = home / "spec.toml"
    spec.write_text(tomli_w.dumps(base_spec))
    refused(home, ["study", "run", str(spec), "--tracking-uri", uri], "--tracking-uri")
    refused(home, ["train", "--workdir", str(home / "wd"), "--tracking-uri", uri, *tiny_sets], "--tracking-uri")


# --- an existing study is left exactly as it was ------------------------------------------------------------------


@pytest.fixture(scope="module")
def _finished_template(tmp_path_factory: pytest.TempPathFactory, tiny_base_factory: Callable[[], dict]) -> Path:
    """One finished one-trial study (stand-in trial function), run once per module in its own process as a user
    would (so no pooled database connection of it lingers in this process to touch the files later)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "modules").mkdir()
    (root / "modules" / "fake_trials_pf.py").write_text(FAKE_TRIAL)
    (root / "spec.toml").write_text(tomli_w.dumps(_base_spec(tiny_base_factory())))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "modules"), *sys.path])}
    r = subprocess.run([sys.executable, "-c", "from diffablate.studies.cli import main; main()", "study", "run",
                        str(root / "spec.toml"), "--workdir", str(root / "wd"), "--trial-fn", "fake_trials_pf:ok"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


@pytest.fixture()
def finished_study(home: Path, _finished_template: Path, trial_module: Callable[[str, str], str]) -> tuple[Path, Path]:
    """A copy of the finished study in home/wd: (spec file, work dir)."""
    trial_module("fake_trials_pf", FAKE_TRIAL)
    shutil.copy(_finished_template / "spec.toml", home / "spec.toml")
    shutil.copytree(_finished_template / "wd", home / "wd", symlinks=True)
    return home / "spec.toml", home / "wd"


def test_refusals_leave_an_existing_study_untouched(home: Path, finished_study: tuple[Path, Path]) -> None:
    """Against a finished study: a --new-name too long for the file system (it used to add a second study
    with orphaned WAITING trials to optuna.db), another --tracking-uri (it used to create that empty store
    first), a spec whose sampler cannot be built - each refused, and nothing in the tree changes."""
    spec, wd = finished_study
    run = ["study", "run", str(spec), "--workdir", str(wd), "--trial-fn", "fake_trials_pf:ok"]
    refused(home, [*run, "--new-name", "n" * 300], "--new-name")
    refused(home, [*run, "--tracking-uri", f"sqlite:///{home / 'other.db'}"], "--tracking-uri", "refusing to split")
    assert not (home / "other.db").exists()
    refused(home, [*run, "--new-name", "fresh", "--storage", "sqlite://"], "--storage")


def test_study_json_missing_keys_names_file_and_key(home: Path, finished_study: tuple[Path, Path]) -> None:
    _spec, wd = finished_study
    info = json.loads((wd / "study.json").read_text())
    del info["studies"]["pf"]["spec_hash"]
    (wd / "study.json").write_text(json.dumps(info))
    refused(home, ["study", "status", str(wd)], "study.json", "studies.pf.spec_hash")
    refused(home, ["report", "pf", "--workdir", str(wd)], "study.json", "studies.pf.spec_hash")
    (wd / "study.json").write_text(json.dumps({"default": "pf"}))
    refused(home, ["ui", str(wd)], "study.json", "'studies'")


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("case", ["port-zero", "port-too-big", "port-in-use", "host-unknown"])
def test_ui_refuses_before_touching_the_study(home: Path, finished_study: tuple[Path, Path], case: str) -> None:
    """It used to rewrite the MLflow store's paths and write logs/ first, then report "exited with code 0"."""
    _spec, wd = finished_study
    busy = _busy_port()
    try:
        args = {"port-zero": ["--mlflow-port", "0"], "port-too-big": ["--optuna-port", "70000"],
                "port-in-use": ["--mlflow-port", str(busy.getsockname()[1])],
                "host-unknown": ["--host", "no-such-host.invalid"]}[case]
        refused(home, ["ui", str(wd), *args], "--host" if case == "host-unknown" else "-port")
    finally:
        busy.close()
    assert not (wd / "logs").exists()


# --- the other entry points -----------------------------------------------------------------------------------


def test_train_reports_every_bad_set_at_once(home: Path) -> None:
    out = refused(home, ["train", "--set", "train.lr=inf", "--set", "data.seed=-3", "--set", "device=tpu"],
                  "train.lr", "data.seed", "device")
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 3, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["set-with-newline", "run-name-too-long", "config-is-a-fifo", "config-not-utf8",
                                  "empty-experiment", "workdir-is-a-file", "huge-integer-set"])
def test_train_refuses(home: Path, tiny_sets: list[str], case: str) -> None:
    wd = home / "wd"
    (home / "a-file").write_text("x")
    args, needle = {
        "set-with-newline": (["--set", "train.lr=1e-3\nsteps = 9"], "--set"),
        "run-name-too-long": (["--run-name", "r" * 300], "--run-name"),
        "config-is-a-fifo": (["--config", str(home / "cfg.toml")], "cfg.toml"),
        "config-not-utf8": (["--config", str(home / "latin1.toml")], "latin1.toml"),
        "empty-experiment": (["--experiment", " "], "--experiment"),
        "workdir-is-a-file": (["--workdir", str(home / "a-file")], "--workdir"),
        "huge-integer-set": (["--set", "train.steps=" + "9" * 5000], "train.steps"),
    }[case]
    if case == "config-is-a-fifo":
        os.mkfifo(home / "cfg.toml")
    (home / "latin1.toml").write_bytes(b'[data]\nname = "caf\xe9"\n')
    refused(home, ["train", "--workdir", str(wd), *tiny_sets, *args] if "--workdir" not in args
            else ["train", *tiny_sets, *args], needle)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["unknown-device", "fifo-named-png", "missing-folder", "bomb"])
def test_fid_refuses(home: Path, case: str) -> None:
    from PIL import Image

    a, b = home / "a", home / "b"
    for d in (a, b):
        d.mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(d / f"{i}.png")
    args, needle = ["fid", str(a), str(b)], str(b)
    if case == "unknown-device":
        args, needle = [*args, "--device", "tpu"], "--device"
    elif case == "fifo-named-png":
        os.mkfifo(b / "z.png")
        needle = "z.png"
    elif case == "missing-folder":
        args = ["fid", str(a), str(home / "nope")]
        needle = "nope"
    else:
        _png_header_only(b / "z.png", 20000, 20000)
        needle = "z.png"
    refused(home, args, needle)


@pytest.mark.parametrize("case", ["clip-device", "clip-out-is-a-file", "eval-missing-run", "eval-bad-device",
                                  "sample-bad-device", "sample-empty-prompt", "bench-bad-device", "report-no-store"])
def test_other_commands_refuse(home: Path, case: str) -> None:
    (home / "a-file").write_text("x")
    (home / "run").mkdir()
    args, needle = {
        "clip-device": (["clip", "train", "--device", "tpu", "--out", str(home / "c")], "--device"),
        "clip-out-is-a-file": (["clip", "train", "--device", "cpu", "--out", str(home / "a-file")], "--out"),
        "eval-missing-run": (["eval", str(home / "no-run")], "no-run"),
        "eval-bad-device": (["eval", str(home / "run"), "--device", "cuda:x"], "--device"),
        "sample-bad-device": (["sample", str(home / "run"), "--device", "gpu", "--out", str(home / "s")], "--device"),
        "sample-empty-prompt": (["sample", str(home / "run"), "--prompts", " ", "--out", str(home / "s")],
                                "--prompts"),
        "bench-bad-device": (["bench", "--device", "tpu", "--no-save"], "device: must be"),
        "report-no-store": (["report", "ghost", "--workdir", str(home / "run")], "no MLflow store"),
    }[case]
    refused(home, args, needle)


def test_user_error_classes_all_exist() -> None:
    """The CLI recognises user errors through preflight.USER_ERRORS (module -> class): each entry must name a
    real exception class, or a renamed one would turn refusals into "internal error"s."""
    import importlib

    from diffablate.studies.preflight import USER_ERRORS

    for module, name in USER_ERRORS.items():
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), (module, name)


def test_unexpected_errors_are_one_line_without_debug(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (not a user's mistake) prints one `error: internal error` line and exits 1; `--debug` re-raises it."""
    from diffablate.studies import cmd_train

    def boom(*a: Any, **k: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cmd_train, "resolve_config", boom)
    code, out = invoke(["train", "--dry-run"])
    assert code == 1 and "error: internal error (ZeroDivisionError: a bug)" in out and "Traceback" not in out
    r = CliRunner().invoke(app, ["--debug", "train", "--dry-run"])
    assert isinstance(r.exception, ZeroDivisionError)


def test_prune_metric_list_matches_the_trainer(tiny_cfg: Any, tmp_path: Path) -> None:
    """preflight.eval_step_metrics (what a search may prune on) is exactly what the trainer reports at an eval."""
    from diffablate.models.trainer import train
    from diffablate.studies.preflight import eval_step_metrics

    seen: list[set[str]] = []
    train(tiny_cfg, tmp_path / "run", progress=False, on_eval=lambda step, m: seen.append(set(m)))
    assert seen and all(s == set(eval_step_metrics(tiny_cfg)) for s in seen)
