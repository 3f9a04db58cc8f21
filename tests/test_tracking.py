"""MLflow tracking and the `train` / `sample` / `config show` commands.

One tiny `diffablate train` run on a temporary SQLite store (creating an MLflow database costs ~10 s
here) is shared by the end-to-end checks; the error paths exit 2 before any compute.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from diffablate.models.config import RunConfig
from diffablate.studies import tracking
from diffablate.studies.cli import app

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

runner = CliRunner()

TINY = ["data.resolution=16", "data.n_train=48", "data.n_heldout=16", "model.block_channels=[16, 32]",
        "model.attention_levels=[false, true]", "text.embed_dim=32", "train.batch_size=16", "train.steps=30",
        "train.log_every=10", "train.eval_every=15", "train.checkpoint_every=15", "train.warmup_steps=5",
        "train.lr=1e-3", "eval.timestep_buckets=4", "eval.sampling_steps=2", "device=cpu"]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`diffablate train` on a fresh work dir: 30 steps, 16 px, batch 16."""
    workdir = tmp_path_factory.mktemp("work")
    t0 = time.perf_counter()
    result = runner.invoke(app, ["train", "--workdir", str(workdir), "--run-name", "tiny", "--experiment", "exp-a",
                                 "--no-progress", *sets(TINY)])
    assert result.exit_code == 0, result.output
    uri = tracking.default_tracking_uri(workdir)
    client = MlflowClient(uri)
    run_id = json.loads((workdir / "runs" / "tiny" / "mlflow_run.json").read_text())["run_id"]
    return {"workdir": workdir, "uri": uri, "client": client, "run": client.get_run(run_id),
            "wall": time.perf_counter() - t0, "output": result.output}


def test_train_logs_params_metrics_and_artifacts(trained: dict[str, Any]) -> None:
    client: Any = trained["client"]
    run = trained["run"]
    cfg = RunConfig().with_overrides(TINY)
    assert run.info.status == "FINISHED" and run.data.tags["diffablate.status"] == "COMPLETE"
    assert run.info.run_name == "tiny"
    params = run.data.params
    for k, v in cfg.flat().items():  # the whole resolved config, > 70 params: batched under MLflow's 100 limit
        assert params[k] == tracking._param_str(v), k
    assert params["perf_resolved.mixed_precision"] == "no" and params["perf_resolved.compile"] == "False"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [10, 20, 30]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "heldout_loss_t/750-999")] == [15, 30]
    for name in ("heldout_loss", "lr", "img_per_s", "final_train_loss", "final_heldout_loss", "train_wall_s",
                 "img_per_s_mean"):
        assert name in run.data.metrics, name
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "samples", "timestep_loss.json", "checkpoint"} <= files
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/final.png", "samples/prompts.json"}
    ckpts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert ckpts == ["checkpoint/step_0000030"]
    local = Path(client.download_artifacts(run.info.run_id, "config.json"))
    assert RunConfig.from_dict(json.loads(local.read_text())) == cfg
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "timestep_loss.json")).read_text())
    assert table["columns"] == ["step", "bucket", "t_lo", "t_hi", "t_mid", "loss"] and len(table["data"]) == 8
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "timestep_loss.json", "type": "table"}]
    # Artifacts live under the work dir, in the experiment's explicit location.
    assert run.info.artifact_uri.startswith(str(trained["workdir"] / "mlartifacts"))


def test_rerun_resumes_into_the_same_mlflow_run(trained: dict[str, Any]) -> None:
    workdir = trained["workdir"]
    result = runner.invoke(app, ["train", "--workdir", str(workdir), "--run-name", "tiny", "--experiment", "exp-a",
                                 "--no-progress", *sets(TINY), "--set", "train.steps=40"])
    assert result.exit_code == 0, result.output
    client: Any = trained["client"]
    run_id = trained["run"].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [10, 20, 30, 40]
    assert client.get_run(run_id).data.tags["diffablate.resumed_from_step"] == "30"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sample_command_writes_pngs(trained: dict[str, Any], tmp_path: Path) -> None:
    run_dir = trained["workdir"] / "runs" / "tiny"
    out = tmp_path / "s"
    args = ["sample", str(run_dir), "--prompts", "a red circle", "--prompts", "a blue square above a green circle",
            "--n", "2", "--steps", "3", "--out", str(out), "--seed", "5", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["000_a-red-circle_0.png", "000_a-red-circle_1.png",
                    "001_a-blue-square-above-a-green-circle_0.png", "001_a-blue-square-above-a-green-circle_1.png"]
    assert (out / "grid.png").is_file()
    again = tmp_path / "s2"
    runner.invoke(app, [*args[:-5], str(again), "--seed", "5", "--device", "cpu"])
    assert (again / pngs[0]).read_bytes() == (out / pngs[0]).read_bytes()  # same seed, same image
    bad = runner.invoke(app, ["sample", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "error:" in bad.output and "missing" in bad.output


def test_copied_workdir_still_finds_its_artifacts(trained: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "moved" / "work"
    shutil.copytree(trained["workdir"], copy)
    uri = tracking.open_tracking(None, copy)
    assert uri == f"sqlite:///{copy.resolve()}/mlflow.db"
    client = MlflowClient(uri)
    run = client.get_run(trained["run"].info.run_id)
    assert run.info.artifact_uri.startswith(str(copy.resolve() / "mlartifacts"))
    exp = client.get_experiment_by_name("exp-a")
    assert exp.artifact_location.startswith(str(copy.resolve() / "mlartifacts"))
    local = Path(client.download_artifacts(run.info.run_id, "config.json"))
    assert local.is_file()
    assert tracking.relocate_store(copy / "mlflow.db") == 0  # idempotent: nothing left to rewrite


def test_tracker_table_replaces_and_params_batch(trained: dict[str, Any]) -> None:
    uri = trained["uri"]
    run_id = tracking.start_run(uri, "exp-b", "tracker-unit", tags={"diffablate.role": "trial"})
    t = tracking.MlflowTracker(run_id, uri)
    t.log_params({f"p{i:03d}": i for i in range(250)})  # three batches
    t.log_params({"p000": 0})  # identical re-log: a no-op, not an MLflow error
    with pytest.warns(UserWarning, match="p001"):
        t.log_params({"p001": 99})
    t.log_table({"step": [1], "loss": [0.5]}, "sub/tab.json")
    t.log_table({"step": [1, 2], "loss": [0.5, float("nan")]}, "sub/tab.json")
    t.log_metrics({"a": 1.0, "b": 2.0}, step=3)
    t.set_tags({"diffablate.status": "COMPLETE"})
    t.log_dict({"x": [1, 2]}, "d.json")
    tracking.end_run(uri, run_id, "FINISHED")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert len(run.data.params) == 250 and run.data.params["p001"] == "1"
    table = json.loads(Path(client.download_artifacts(run_id, "sub/tab.json")).read_text())
    assert table == {"columns": ["step", "loss"], "data": [[1, 0.5], [2, None]]}  # replaced, not appended
    assert run.data.metrics == {"a": 1.0, "b": 2.0} and run.data.tags["diffablate.status"] == "COMPLETE"
    child = tracking.start_run(uri, "exp-b", "child", parent_run_id=run_id)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == run_id
    with pytest.raises(ValueError, match="status"):
        tracking.end_run(uri, child, "DONE")


@pytest.mark.parametrize(("uri", "match"), [
    ("mlflow.db", "no scheme"),
    ("foo://bar", "unknown scheme"),
    ("sqlite:/x.db", "sqlite:///"),
    ("http://", "no host"),
    ("http://localhost:port", "invalid port"),
    ("postgresql:///db", "no host"),
])
def test_malformed_tracking_uri(uri: str, match: str) -> None:
    with pytest.raises(tracking.TrackingError, match=match):
        tracking.validate_uri(uri)


def test_unreachable_tracking_uri_fails_fast_before_training(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    result = runner.invoke(app, ["train", "--workdir", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9",
                                 *sets(TINY)])
    assert result.exit_code == 2 and "not reachable" in result.output and "127.0.0.1:9" in result.output
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "runs").exists()  # nothing was created, nothing trained


@pytest.mark.parametrize(("args", "field"), [
    (["--set", "train.batch_size=-4"], "train.batch_size"),
    (["--set", "axes.timestep_sampler=unifrom"], "axes.timestep_sampler"),
    (["--set", "train.nope=1"], "train.nope"),
    (["--set", "perf.cuda_graphs=on"], "perf.cuda_graphs"),
    (["--config", "/nonexistent/cfg.toml"], "cfg.toml"),
    (["--run-name", "a/b"], "--run-name"),
])
def test_config_errors_exit_2_naming_the_field(tmp_path: Path, args: list[str], field: str) -> None:
    result = runner.invoke(app, ["train", "--workdir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and field in result.output
    assert not (tmp_path / "mlflow.db").exists() or field == "--run-name"


def test_dry_run_prints_toml_that_round_trips(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--dry-run", "--workdir", str(tmp_path), *sets(TINY)])
    assert result.exit_code == 0, result.output
    cfg = RunConfig.from_dict(tomllib.loads(result.output))
    assert cfg == RunConfig().with_overrides(TINY)
    assert not (tmp_path / "mlflow.db").exists()  # a dry run touches nothing
    f = tmp_path / "cfg.toml"
    f.write_text(result.output)
    shown = runner.invoke(app, ["config", "show", "--config", str(f), "--set", "seed=3"])
    assert shown.exit_code == 0 and RunConfig.from_dict(tomllib.loads(shown.output)) == cfg.with_overrides(["seed=3"])
