"""How scores are named in MLflow: one vocabulary for the writer (studies/) and the readers (reports/).

Dependency-free on purpose: reports/ reads MLflow alone, and must be able to split a logged metric name
back into (score, sampling-panel entry) without importing the code that trained.

A **panel entry** is one way of sampling a trained model: a sampler of the sampler registry
(models/diffusion.py `SAMPLERS`) at one classifier-free guidance scale, e.g. ``ddim-g3`` or ``ddpm-g1``.
Every score that depends on sampling is logged once per entry as ``<score>/<entry>``
(``oracle_acc/ddpm-g3``, ``fid_ci_low/ddim-g1``); MLflow's UI groups metrics by the ``/`` prefix, and
pandas pivots them with `split_metric`. Scores that do not sample (``final_heldout_loss``) keep plain names.

A score's *details* - its interval bounds, sample counts and spread (``fid_ci_low/ddim-g3``, ``fid_n_gen/...``,
``oracle_n/...``, ``kid_std/...``; `is_detail`) - are numbers about a score, not curves: studies/ writes them as
run tags ``diffablate.score.<name>`` (`DETAIL_TAG`) so MLflow does not chart them, and reports/ reads them back
under the same names (older stores have them as metrics; both read the same).
"""

from __future__ import annotations

import re

PANEL_SEP = "/"
_ENTRY = re.compile(r"^(?P<sampler>[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*?)-g(?P<guidance>[0-9]+(?:\.[0-9]+)?)$")


DETAIL_TAG = "diffablate.score."
_DETAIL = re.compile(r"_(ci_low|ci_high|n|n_gen|n_ref|std)$")


def is_detail(name: str) -> bool:
    """``fid_ci_low/ddim-g3``, ``oracle_n/ddpm-g1``, ``kid_std/...`` -> True; ``fid/ddim-g3`` -> False."""
    return bool(_DETAIL.search(split_metric(name)[0]))


def entry_name(sampler: str, guidance: float) -> str:
    """``("ddim", 3.0)`` -> ``"ddim-g3"``; ``("ddpm", 1.5)`` -> ``"ddpm-g1.5"`` (``%g`` of the scale)."""
    return f"{sampler}-g{float(guidance):g}"


def parse_entry(entry: str) -> tuple[str, float]:
    """``"ddim-g3"`` -> ``("ddim", 3.0)``; ValueError for anything `entry_name` cannot have written."""
    m = _ENTRY.match(entry)
    if m is None:
        raise ValueError(f"{entry!r} is not a panel entry name (<sampler>-g<guidance>, e.g. 'ddim-g3')")
    return m["sampler"], float(m["guidance"])


def panel_metric(score: str, entry: str) -> str:
    """``("fid", "ddim-g3")`` -> ``"fid/ddim-g3"``."""
    return f"{score}{PANEL_SEP}{entry}"


def split_metric(name: str) -> tuple[str, str | None]:
    """``"fid/ddim-g3"`` -> ``("fid", "ddim-g3")``; ``"final_heldout_loss"`` -> ``("final_heldout_loss", None)``."""
    score, sep, entry = name.partition(PANEL_SEP)
    return (score, entry) if sep else (name, None)
