"""The command line as a newcomer meets it: a fast `--version`, `study status` without a name, `study list`,
"did you mean" for a misspelt registry name, and warnings for settings that cannot work well on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diffablate.models.config import ConfigError, RunConfig
from diffablate.models.registry import Registry
from diffablate.studies import advice, runner
from diffablate.studies.cli import app
from diffablate.studies.spec import SpecError, parse_spec

SPEC = """
name = "{name}"
seeds = [0]
[base]
data = {{ resolution = 16 }}
[design]
kind = "factorial"
objective = "final_heldout_loss"
[design.axes]
timestep_sampler = ["uniform", "sequential"]
"""
FAKE = "def ok(run):\n    return {'final_heldout_loss': 0.5}\n"


def test_version_imports_no_heavy_library():
    code = ("import sys\nfrom diffablate.studies.cli import app\ntry:\n    app(['--version'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('torch', 'optuna', 'mlflow', 'diffusers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["diffablate 0.1.0", "[]"]


def test_misspelt_names_get_the_near_miss():
    reg: Registry[object] = Registry("timestep sampler")
    for name in ("uniform", "sequential"):
        reg.register(name)(object)
    with pytest.raises(KeyError, match=r"unknown timestep sampler 'unifrom' \(did you mean 'uniform'\?\)"):
        reg.get("unifrom")
    with pytest.raises(KeyError) as far:
        reg.get("zzz")
    assert "did you mean" not in str(far.value)
    with pytest.raises(ConfigError, match=r"got 'cross_attention' \(did you mean 'cross-attention'\?\)$"):
        RunConfig().with_overrides({"axes.conditioning": "cross_attention"})
    bad = SPEC.format(name="x").replace('"sequential"', '"sequentail"')
    with pytest.raises(SpecError, match=r"design\.axes\.timestep_sampler\[1\]: .*did you mean 'sequential'"):
        parse_spec(bad)


def _run(tmp_path, name, fake):
    runner.run_study(parse_spec(SPEC.format(name=name)), workdir=tmp_path / "studies-out" / name,
                     trial_fn=f"{fake}:ok", log=lambda m: None)


def test_status_without_a_name_and_study_list(tmp_path, monkeypatch, trial_module):
    fake = trial_module("fake_cli_ux_mod", FAKE)
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    none = cli.invoke(app, ["study", "status"])
    assert none.exit_code == 2 and "no study here" in none.output
    _run(tmp_path, "first", fake)
    one = cli.invoke(app, ["study", "status"])  # the only study under studies-out/
    assert one.exit_code == 0 and "first: 2/2 complete" in one.output, one.output
    _run(tmp_path, "second", fake)
    two = cli.invoke(app, ["study", "status"])
    assert two.exit_code == 2 and "several studies" in two.output and "first, second" in two.output
    monkeypatch.chdir(tmp_path / "studies-out" / "second")  # inside a work dir: that one
    here = cli.invoke(app, ["study", "status"])
    assert here.exit_code == 0 and "second: 2/2 complete" in here.output
    monkeypatch.chdir(tmp_path)
    listed = cli.invoke(app, ["study", "list"])
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if "│ first" in line or "│ second" in line]
    assert len(rows) == 2 and all("2/2" in r for r in rows)


def test_advice_warns_about_a_warmup_longer_than_the_run_and_an_untrained_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFABLATE_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig().with_overrides({"device": "cpu", "train.steps": 50, "train.warmup_steps": 100})
    warmup, judge = advice.for_config(cfg)
    assert warmup.startswith("train.warmup_steps = 100 >= train.steps = 50") and "--set train.warmup_steps=5" in warmup
    assert judge.startswith("eval.clip_score is on and no judge CLIP is cached")
    from diffablate.models import clip

    cached = clip.cache_root() / "clip" / clip.cache_key(cfg.data, "judge", clip.ClipConfig()) / clip.META_FILE
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    assert advice.for_config(cfg) == [warmup]  # a cached judge costs nothing
    assert advice.for_config(cfg.with_overrides({"train.steps": 1000})) == []
    assert advice.for_configs([cfg, cfg]) == [warmup]
