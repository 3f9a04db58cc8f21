"""Packs on the CPU, in fp32: every member logs bit-for-bit the losses it logs trained alone - interleaved with
other members, after a kill and resume mid-pack, and beside a member that diverges and leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diffablate.models import pack
from diffablate.models import trainer as tr
from diffablate.models.checkpoint import list_checkpoints
from diffablate.models.config import ConfigError, RunConfig
from diffablate.models.tracker import MemoryTracker

CURVES = ("train_loss", "train_objective", "grad_norm", "heldout_loss")  # + every heldout_loss_t/<range>


def tiny(**overrides: Any) -> RunConfig:
    base = {
        "data.resolution": 16, "data.n_train": 64, "data.n_heldout": 16,
        "model.block_channels": [16, 32], "model.attention_levels": [False, True],
        "text.embed_dim": 32, "train.batch_size": 8, "train.steps": 12, "train.lr": 1e-3, "train.warmup_steps": 4,
        "train.log_every": 2, "train.eval_every": 4, "train.checkpoint_every": 3,
        "eval.timestep_buckets": 4, "eval.sampling_steps": 2,
    }
    return RunConfig().with_overrides({**base, **overrides})


# Three members that differ in everything a pack may mix: seed, timestep sampler (loss-aware: state fed back
# every step), time embedding, dropout (draws from the swapped global RNG), length, milestones.
MEMBERS = {
    "a": tiny(seed=0),
    "b": tiny(**{"seed": 1, "axes.timestep_sampler": "loss-aware", "axes.loss_aware_history": 1,
                 "diffusion.num_train_timesteps": 20}),
    "c": tiny(**{"seed": 2, "axes.time_embedding": "off", "model.dropout": 0.1, "train.steps": 10}),
}
MILESTONES = {"a": (5,), "b": (), "c": ()}


class Kill(BaseException):
    """Stands for the worker process being killed: not an Exception, so the pack does not absorb it."""


def curves(t: MemoryTracker) -> dict[str, list[tuple[int | None, float]]]:
    buckets = sorted(k for k in t.metrics if k.startswith("heldout_loss_t/"))  # per-bucket copies, named by t range
    return {k: t.series(k) for k in (*CURVES, *buckets)}


def member(name: str, run_dir: Path, tracker: MemoryTracker, calls: list[int] | None = None,
           **kwargs: Any) -> pack.PackMember:
    record = (lambda s, trained: calls.append(s)) if calls is not None else (lambda s, trained: None)
    return pack.PackMember(MEMBERS[name], run_dir / name, tracker=tracker, milestones=MILESTONES[name],
                           on_milestone=record if MILESTONES[name] else None, **kwargs)


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[MemoryTracker, tr.TrainResult]]:
    """Each member trained alone with `trainer.train`: the reference."""
    root = tmp_path_factory.mktemp("alone")
    out = {}
    for name, cfg in MEMBERS.items():
        t = MemoryTracker()
        result = tr.train(cfg, root / name, tracker=t, progress=False, milestones=MILESTONES[name],
                          on_milestone=(lambda s, trained: None) if MILESTONES[name] else None)
        out[name] = (t, result)
    return out


def test_pack_members_log_exactly_what_they_log_alone(alone: dict, tmp_path: Path) -> None:
    trackers = {n: MemoryTracker() for n in MEMBERS}
    calls: list[int] = []
    results = pack.train_pack([member(n, tmp_path, trackers[n], calls) for n in MEMBERS])
    assert calls == [5]
    for (name, (ref, ref_result)), result in zip(alone.items(), results):
        assert isinstance(result, tr.TrainResult) and result.steps_done == MEMBERS[name].train.steps
        assert curves(trackers[name]) == curves(ref), name  # bit for bit
        assert result.heldout_loss == ref_result.heldout_loss and result.final_train_loss == ref_result.final_train_loss
        assert trackers[name].params == ref.params
        assert [s for s, _ in list_checkpoints(tmp_path / name)] == \
            [s for s, _ in list_checkpoints(Path(ref_result.run_dir))]


def test_pack_killed_mid_run_resumes_exactly(alone: dict, tmp_path: Path) -> None:
    def kill_at_8(step: int, metrics: dict[str, float]) -> None:
        if step == 8:
            raise Kill  # after the step-6 checkpoints; the others have run step 8 but not logged it

    with pytest.raises(Kill):
        pack.train_pack([member("a", tmp_path, MemoryTracker(), on_eval=kill_at_8),
                         member("b", tmp_path, MemoryTracker()), member("c", tmp_path, MemoryTracker())])
    for name in MEMBERS:
        assert [s for s, _ in list_checkpoints(tmp_path / name)][-1] == 6, name
    again = {n: MemoryTracker() for n in MEMBERS}
    results = pack.train_pack([member(n, tmp_path, again[n]) for n in MEMBERS])
    assert all(isinstance(r, tr.TrainResult) for r in results)
    for name, (ref, _) in alone.items():
        for k, series in curves(ref).items():
            assert again[name].series(k) == [(s, v) for s, v in series if s > 6], (name, k)
        assert again[name].tags["diffablate.resumed_from_step"] == "6"


def test_a_diverging_or_failing_member_leaves_and_the_others_finish_as_alone(alone: dict, tmp_path: Path) -> None:
    trackers = {n: MemoryTracker() for n in ("a", "c", "diverges", "bad")}
    diverges = pack.PackMember(tiny(**{"seed": 3, "train.diverge_loss": 1e-6}), tmp_path / "diverges",
                               tracker=trackers["diverges"])
    bad = pack.PackMember(tiny(seed=4), tmp_path / "bad", tracker=trackers["bad"], milestones=(99,),
                          on_milestone=lambda s, t: None)
    results = pack.train_pack([member("a", tmp_path, trackers["a"]), diverges, bad, member("c", tmp_path, trackers["c"])])
    assert isinstance(results[1], tr.TrainingDiverged) and results[1].step == 2  # the first log interval
    assert trackers["diverges"].tags["diffablate.diverged_at_step"] == "2"
    assert isinstance(results[2], ConfigError) and "milestones" in str(results[2])
    for name, result in (("a", results[0]), ("c", results[3])):
        assert isinstance(result, tr.TrainResult)
        assert curves(trackers[name]) == curves(alone[name][0]), name


def test_pack_key_groups_configs_that_share_a_unet_program() -> None:
    base = tiny()
    same = [base.with_overrides(o) for o in (
        {"seed": 5}, {"replicate": 2}, {"axes.timestep_sampler": "cyclic"}, {"axes.time_embedding": "off"},
        {"axes.loss_weighting": "min-snr"}, {"train.lr": 3e-4, "train.steps": 99}, {"eval.sampling_steps": 7})]
    other = [base.with_overrides(o) for o in (
        {"axes.conditioning": "pooled"}, {"train.batch_size": 16}, {"model.block_channels": [16, 16]},
        {"data.resolution": 8}, {"perf.channels_last": "on"}, {"text.embed_dim": 16})]
    assert {pack.pack_key(c) for c in same} == {pack.pack_key(base)}
    assert len({pack.pack_key(c) for c in other} | {pack.pack_key(base)}) == len(other) + 1


def test_pack_refuses_members_sharing_a_run_dir(tmp_path: Path) -> None:
    m = pack.PackMember(tiny(), tmp_path / "x")
    with pytest.raises(ValueError, match="share a run directory"):
        pack.train_pack([m, pack.PackMember(tiny(seed=1), tmp_path / "x")])
    assert not (tmp_path / "x").exists()
