"""The reproducibility block of every report: how to regenerate it, how the study was run, the spec and
resolved config, package versions, commit, hardware and links to the MLflow runs, all read from MLflow.

Whatever the store does not record is said to be missing, never filled in from the machine that renders
the report (that would describe the reader's machine, not the one that trained).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd

from diffablate.metrics.names import parse_entry
from diffablate.reports.load import CONFIG_ARTIFACT, StudyData, read_json_artifact
from diffablate.reports.render import Block, Bullets, Code, Heading, Para, Table

GIT_TAGS = ("mlflow.source.git.commit", "mlflow.source.git.branch", "mlflow.source.git.repoURL")
COMMAND_TAGS = ("diffablate.command", "mlflow.source.name")
VERSION_TAG = "diffablate.versions"  # JSON {package: version}
VERSION_KEYS = re.compile(r"^(diffablate\.)?versions?\.(?P<pkg>.+)$")
HARDWARE_KEYS = re.compile(r"^(derived\.(device|gpu.*|host.*|cpu.*)|diffablate\.(hardware|gpu|host|device)|"
                           r"system\.(.+))$")
_SYSTEM_GPU = re.compile(r"^system/gpu_(\d+)_")


def run_link(study: StudyData, run_id: str, ui: str | None) -> str:
    """A Markdown link to the run in the MLflow UI (``<ui>/#/experiments/<id>/runs/<run_id>``, the route the UI
    serves), or the route as code when the UI's address is not known (a SQLite store has none of its own)."""
    route = f"#/experiments/{study.experiment_id}/runs/{run_id}"
    return f"[{run_id[:8]}]({ui.rstrip('/')}/{route})" if ui else f"`{route}`"


def ui_address(study: StudyData, ui: str | None) -> str | None:
    """The MLflow UI to link to: the one given, else the tracking server itself (it serves the UI)."""
    if ui:
        return ui
    return study.tracking_uri if study.tracking_uri.startswith(("http://", "https://")) else None


def _first(study: StudyData, keys: tuple[str, ...], runs: list[str]) -> dict[str, str]:
    """Each key's value from the parent's tags, else the first listed run's tags that has it."""
    out = {}
    for key in keys:
        if key in study.parent_tags:
            out[key] = study.parent_tags[key]
            continue
        for rid in runs:
            if key in study.run_tags.get(rid, {}):
                out[key] = study.run_tags[rid][key]
                break
    return out


def _versions(study: StudyData, rid: str | None) -> dict[str, str]:
    sources = [study.parent_tags, study.parent_params]
    if rid is not None:
        sources += [study.run_tags.get(rid, {}), study.params.get(rid, {})]
    for src in sources:
        if VERSION_TAG in src:
            try:
                got = json.loads(src[VERSION_TAG])
                if isinstance(got, dict):
                    return {str(k): str(v) for k, v in sorted(got.items())}
            except ValueError:
                pass
    out: dict[str, str] = {}
    for src in sources:
        for k, v in src.items():
            if (m := VERSION_KEYS.match(k)) and m["pkg"] not in out:
                out[m["pkg"]] = v
    return dict(sorted(out.items()))


def _hardware(study: StudyData, rid: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for src in [study.parent_tags, study.parent_params,
                *([study.run_tags.get(rid, {}), study.params.get(rid, {})] if rid else [])]:
        for k, v in sorted(src.items()):
            if HARDWARE_KEYS.match(k) and k not in out:
                out[k] = v
    gpus = sorted({int(m[1]) for names in study.system_metrics.values() for n in names if (m := _SYSTEM_GPU.match(n))})
    if gpus:
        out["MLflow system metrics"] = f"{len(gpus)} GPU(s) monitored (gpu {', '.join(map(str, gpus))})"
    elif any(study.system_metrics.values()):
        out["MLflow system metrics"] = "logged (no GPU metrics)"
    return out


def section(study: StudyData, reference_run: str | None, ui: str | None, command: str) -> list[Block]:
    """The block list; ``reference_run`` is the trial whose resolved config is shown (a baseline trial)."""
    ui = ui_address(study, ui)
    runs = [reference_run] if reference_run else []
    runs += list(study.trials["run_id"])
    out: list[Block] = [Heading(2, "Reproducibility")]
    items = [f"Regenerate this report from MLflow alone: `{command}`."]
    cmd = _first(study, COMMAND_TAGS, runs)
    if "diffablate.command" in cmd:
        items.append(f"The study was run with: `{cmd['diffablate.command']}`.")
    else:
        source = f"; MLflow's source name is `{cmd['mlflow.source.name']}`" if cmd else ""
        items.append("Run the study again: `diffablate study run SPEC.toml` with the spec below (the store records "
                     f"no command line{source}).")
    items.append(f"Spec hash `{study.parent_tags.get('diffablate.spec_hash', '–')}`; experiment "
                 f"`{study.study}` (id {study.experiment_id}); parent run {run_link(study, study.parent_run_id, ui)}.")
    git = _first(study, GIT_TAGS, runs)
    items.append("Commit: " + (", ".join(f"{k.rsplit('.', 1)[-1]} `{v}`" for k, v in git.items()) if git else
                               "not recorded (no `mlflow.source.git.commit` tag on the parent or a trial)."))
    versions = _versions(study, reference_run)
    items.append("Package versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) if versions else
                                         f"not recorded in the store (no `{VERSION_TAG}` tag)."))
    hardware = _hardware(study, reference_run)
    items.append("Hardware: " + ("; ".join(f"{k} = {v}" for k, v in hardware.items()) if hardware else
                                 "not recorded in the store."))
    if ui is None:
        items.append("MLflow links are UI routes: open `diffablate ui WORKDIR` and append the route to the address "
                     "it prints (the All trials table lists each run's).")
    out.append(Bullets(items))
    panel = study.panel
    if panel.entries:
        of = {e: _entry_flags(panel.flags, e) for e in panel.entries}
        flags = sorted({f for e in panel.entries for f in of[e]})
        rows = [{"entry": e + (" (primary)" if e == panel.primary else ""), **{f: _flag(of[e].get(f)) for f in flags}}
                for e in panel.entries]
        out += [Para(f"Sampling panel (from {panel.source})" +
                     ("; scheduler flags as logged:" if flags else "; no scheduler flags were logged.")),
                Table(pd.DataFrame(rows), wide=True)]
    if study.spec_text:
        out.append(Code("Study spec (study_spec.toml on the parent run)", study.spec_text, "toml"))
    if reference_run is not None:
        config = read_json_artifact(study, reference_run, CONFIG_ARTIFACT)
        if config is None:
            params = study.params.get(reference_run, {})
            config_text = json.dumps(dict(sorted(params.items())), indent=2) if params else None
            where = "its params; no config.json artifact"
        else:
            config_text, where = json.dumps(config, indent=2, sort_keys=True), "config.json"
        if config_text:
            out.append(Code(f"Resolved config of trial run {reference_run[:8]} ({where})", config_text, "json"))
    return out


def _entry_flags(flags: dict[str, dict[str, Any]], entry: str) -> dict[str, Any]:
    """An entry's scheduler flags: keyed by entry, or (as studies/ logs them) by the entry's sampler."""
    if entry in flags:
        return flags[entry]
    try:
        return flags.get(parse_entry(entry)[0], {})
    except ValueError:
        return {}


def _flag(value: Any) -> str:
    return "–" if value is None else json.dumps(value) if not isinstance(value, str) else value
