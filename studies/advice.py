"""Warnings for settings that are valid but cannot work well where they will run, said before any compute.

Not errors (the run is what was asked for, and may be meant as a test of the machinery), just what a person
would want to know before waiting: a learning-rate warm-up that outlasts the run, and CLIP-score on a CPU
with no judge CLIP cached yet (the first evaluation would train one: minutes).
"""

from __future__ import annotations

from typing import Iterable

from diffablate.models.config import RunConfig


def for_config(cfg: RunConfig) -> list[str]:
    """The warnings for one run's config, each a sentence naming the field and what to do."""
    from diffablate.models.device import resolve_device

    out = []
    t = cfg.train
    if t.warmup_steps >= t.steps:
        out.append(f"train.warmup_steps = {t.warmup_steps} >= train.steps = {t.steps}: the learning rate is still "
                   f"warming up when the run ends, so it never trains at train.lr; e.g. "
                   f"--set train.warmup_steps={max(1, t.steps // 10)}")
    if resolve_device(cfg.device).type == "cpu" and cfg.eval.clip_score and not cfg.eval.judge_path \
            and not _judge_cached(cfg):
        out.append(f"eval.clip_score is on and no judge CLIP is cached for this dataset: on the CPU the first "
                   f"evaluation trains one (minutes; cached after). --set eval.clip_score=false skips it, or "
                   f"`diffablate clip train --dataset {cfg.data.name} --role judge` prepares it")
    return out


def for_configs(cfgs: Iterable[RunConfig]) -> list[str]:
    """The distinct warnings of several configs (a study's cells), in first-seen order."""
    return list(dict.fromkeys(w for cfg in cfgs for w in for_config(cfg)))


def _judge_cached(cfg: RunConfig) -> bool:
    from diffablate.models import clip

    return (clip.cache_root() / "clip" / clip.cache_key(cfg.data, "judge", clip.ClipConfig()) / clip.META_FILE).is_file()
