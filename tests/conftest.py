"""Shared pytest fixtures. Each room prefixes its fixtures (fid_ for metrics/fid, pg_ for PostgreSQL); the
tiny_ fixtures are one tiny CPU configuration every test that trains (or pretends to) can start from."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# The suite runs many small torch processes side by side (study workers, CLI subprocesses) on CI's 2 cores:
# one intra-op thread each keeps them from oversubscribing the cores (measured here: a tiny training run took
# 107 s with two threads per process under that load, 6 s with one). Set before any test imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# A RunConfig small enough to train in ~1 s on one CPU core: 16 px shapes, a 2-level UNet, 4 steps of batch 4,
# nothing scored that needs FID weights or a judge CLIP.
TINY_BASE: dict[str, Any] = {
    "device": "cpu",
    "data": {"name": "shapes", "resolution": 16, "n_train": 16, "n_heldout": 8},
    "model": {"block_channels": [16, 32], "attention_levels": [False, True]},
    "text": {"embed_dim": 16},
    "train": {"steps": 4, "batch_size": 4, "log_every": 1, "eval_every": 2, "checkpoint_every": 0,
              "warmup_steps": 0, "lr": 1e-3},
    "perf": {"compile": "off"},
    "eval": {"n_samples": 2, "sampling_steps": 2, "fid": False, "kid": False, "clip_score": False, "oracle": False,
             "bootstrap": 0, "timestep_buckets": 2},
}


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for a module that trains in-process (`pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`): on this shared 2-core box two OpenMP threads ran the tiny
    VAE ~25x slower (965 s vs ~40 s wall for test_vae's module fixture), spinning against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base_factory() -> Callable[[], dict[str, Any]]:
    """For module- and session-scoped fixtures: returns a fresh copy of the tiny config dict at each call."""
    return lambda: copy.deepcopy(TINY_BASE)


@pytest.fixture()
def tiny_base(tiny_base_factory: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The tiny config as a nested dict (a spec's [base] table, a config file); a fresh copy per test."""
    return tiny_base_factory()


@pytest.fixture()
def tiny_cfg(tiny_base: dict[str, Any]) -> Any:
    """The tiny config as a validated RunConfig."""
    from diffablate.models.config import RunConfig

    return RunConfig.from_dict(tiny_base)


@pytest.fixture()
def tiny_sets(tiny_cfg: Any) -> list[str]:
    """The tiny config as `--set key=value` arguments (`diffablate train ... *tiny_sets`)."""
    import json

    out = []
    for k, v in tiny_cfg.flat().items():
        value = v if isinstance(v, str) and v.startswith("[") else json.dumps(v)  # lists are JSON text already
        out += ["--set", f"{k}={value}"]
    return out


@pytest.fixture(scope="session")
def fid_weights() -> Path:
    """Converted FID Inception weights in the real cache ($DIFFABLATE_CACHE or ~/.cache/diffablate).

    The real cache, not a tmp dir: conversion is verified by hash and worth keeping across sessions.
    """
    from diffablate.metrics.inception import fid_inception_weights

    return fid_inception_weights()


@pytest.fixture(scope="session")
def fid_extractor(fid_weights: Path):
    """One CPU FeatureExtractor per session; batch 12 so the 32-image test sets span uneven batches."""
    from diffablate.metrics.inception import FeatureExtractor

    return FeatureExtractor(device="cpu", batch_size=12, weights=None)


# --- a throwaway PostgreSQL server ---------------------------------------------------------------------------


def pg_binary(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """One throwaway PostgreSQL cluster per test session: `postgresql+psycopg2://postgres@127.0.0.1:PORT`.

    Debian's initdb/pg_ctl in a temp dir on a free port, trust auth, fsync off; run as the `postgres` user
    when we are root (PostgreSQL refuses root). Not under pytest's tmp_path: that is 0700 root. Skipped only
    when the server binaries (or psycopg2) are absent. Tests take a fresh database each from `pg_url`.
    """
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql")
    psycopg2 = pytest.importorskip("psycopg2")
    root = Path(tempfile.mkdtemp(prefix="diffablate-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)
        # max_connections: 8 workers x (Optuna pool + heartbeat thread) plus the test's own connections.
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "120", "-o",
                        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                        "start"], check=True, capture_output=True)
        for _ in range(50):  # -w waits for the socket; give TCP a moment too on a loaded box
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)
        # SQLAlchemy 2.1 maps a plain postgresql:// to psycopg 3; the +psycopg2 driver is the one installed here.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server (its SQLAlchemy URL), so tests never see
    each other's studies."""
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:12]}"
    host_port = pg_server.rsplit("@", 1)[1]
    host, port = host_port.rsplit(":", 1)
    con = psycopg2.connect(host=host, port=int(port), user="postgres", dbname="postgres")
    try:
        con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        con.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        con.close()
    return f"{pg_server}/{name}"


@pytest.fixture()
def trial_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """`trial_module(name, source)` writes a fake trial module (a `--trial-fn` / `trial_fn` target) and puts its
    folder on sys.path, which spawned study workers inherit; returns `name`."""
    folder = tmp_path / "trial_modules"

    def make(name: str, source: str) -> str:
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(folder))
        return name

    return make
