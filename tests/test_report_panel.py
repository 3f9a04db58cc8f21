"""reports/ on a study written the way studies/ now writes one: every score under a sampling panel
(`<score>/<entry>`), controls in claims.json, panel.json, replicate trials, failures, and a broken twin whose
null control fails and whose baseline samples are noise.

One-at-a-time design around the baseline B (cross-attention, uniform, time embedding on), seeds 0-2:
  R       B again as replicate 1 (the null control's arm)
  none    conditioning none        (the positive control: oracle accuracy collapses)
  seq     sequential timesteps     (oracle: worse under DDPM, better under DDIM g3, no change under DDIM g1)
  pooled  pooled conditioning      (FID +0.2: "no worse" within a margin of 2, not within 0.1; held-out loss
                                    exactly +0.01 on every seed: a degenerate contrast)
  off     time embedding off       (FID 10 lower, but seed 2 diverged: a failing arm cannot win)
class_acc is 0 everywhere: a constant metric gets no test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats as sps

from diffablate.reports.build import build_report, default_tracking_uri
from diffablate.reports.load import load_study
from diffablate.reports.stats import holm

ENTRIES = ("ddim-g1", "ddim-g3", "ddpm-g1", "ddpm-g3")
SEEDS = (0, 1, 2)
BASE = {"axes.conditioning": "cross-attention", "axes.time_embedding": "on", "axes.timestep_sampler": "uniform"}
CELLS = {"B": {}, "R": {"replicate": 1}, "none": {"axes.conditioning": "none"},
         "seq": {"axes.timestep_sampler": "sequential"}, "pooled": {"axes.conditioning": "pooled"},
         "off": {"axes.time_embedding": "off"}}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SEQ_ORACLE = {"ddim-g1": -0.005, "ddim-g3": 0.2, "ddpm-g1": -0.3, "ddpm-g3": -0.3}


def _arm(cell: str) -> dict:
    return {**BASE, **CELLS[cell]}


CLAIMS = [
    {"name": "null", "statement": "The baseline against a replicate of itself.", "metric": "oracle_acc",
     "baseline": {**BASE, "replicate": 0}, "variant": {**BASE, "replicate": 1}, "better": "higher",
     "expect": "no_difference", "margin": None, "panel": None, "role": "null-control"},
    {"name": "text-matters", "statement": "Without text the images cannot match their captions.",
     "metric": "oracle_acc", "baseline": _arm("B"), "variant": _arm("none"), "better": "higher",
     "expect": "baseline_better", "margin": None, "panel": None, "role": "positive-control"},
    {"name": "seq-worse", "statement": "Sequential timesteps give worse alignment.", "metric": "oracle_acc",
     "baseline": _arm("B"), "variant": _arm("seq"), "better": "higher", "expect": "baseline_better",
     "margin": None, "panel": None, "role": "claim"},
    {"name": "pooled-no-worse", "statement": "Pooled text is at least as good on FID.", "metric": "fid",
     "baseline": _arm("B"), "variant": _arm("pooled"), "better": "lower", "expect": "variant_no_worse",
     "margin": 2.0, "panel": ["ddpm-g3"], "role": "claim"},
    {"name": "pooled-no-worse-tight", "statement": "Pooled text is no worse on FID by 0.1.", "metric": "fid",
     "baseline": _arm("B"), "variant": _arm("pooled"), "better": "lower", "expect": "variant_no_worse",
     "margin": 0.1, "panel": ["ddpm-g3"], "role": "claim"},
    {"name": "pooled-heldout", "statement": "Cross-attention lowers the held-out loss.", "metric": "final_heldout_loss",
     "baseline": _arm("B"), "variant": _arm("pooled"), "better": "lower", "expect": "baseline_better",
     "margin": None, "panel": None, "role": "claim"},
    {"name": "class-constant", "statement": "Uniform timesteps help the class probe.", "metric": "class_acc",
     "baseline": _arm("B"), "variant": _arm("seq"), "better": "higher", "expect": "baseline_better",
     "margin": None, "panel": None, "role": "claim"},
    {"name": "off-wins", "statement": "Dropping the time embedding lowers FID.", "metric": "fid",
     "baseline": _arm("B"), "variant": _arm("off"), "better": "lower", "expect": "variant_better",
     "margin": None, "panel": None, "role": "claim"},
]


def _label(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def _noise(*key: int, sd: float) -> float:
    return float(np.random.default_rng(list(key)).normal(0.0, sd))


def _scores(cell: str, e: int, seed: int, broken: bool) -> dict[str, float]:
    entry = ENTRIES[e]
    ci = list(CELLS).index(cell)
    base_oracle = {"ddim-g1": 0.75, "ddim-g3": 0.1 if broken else 0.8, "ddpm-g1": 0.7, "ddpm-g3": 0.85}[entry]
    oracle = base_oracle + _noise(ci, e, seed, 1, sd=0.01)
    if cell == "none":
        oracle = 0.05 + _noise(ci, e, seed, 2, sd=0.005)
    elif cell == "seq":
        oracle += SEQ_ORACLE[entry]
    elif cell == "R" and broken:
        oracle -= 0.1  # the "replicate" differs systematically: the instrument is broken
    fid = 30.0 + 2 * e + _noise(ci, e, seed, 3, sd=0.1) + {"pooled": 0.2}.get(cell, 0.0)
    if cell == "off":  # B's FID minus 10, to within 0.001: a clear win on the seeds that survived
        fid = 30.0 + 2 * e + _noise(0, e, seed, 3, sd=0.1) - 10.0 + _noise(ci, e, seed, 4, sd=0.001)
    clip = 25.0 - (5.0 if cell == "none" else 0.0) + _noise(ci, e, seed, 5, sd=0.1)
    return {"fid": fid, "fid_ci_low": fid - 1.5, "fid_ci_high": fid + 1.5, "fid_n_gen": 512, "fid_n_ref": 1000,
            "kid": fid / 1000, "kid_std": 0.001, "clip_score": clip, "clip_score_n": 512,
            "oracle_acc": oracle, "oracle_acc_ci_low": oracle - 0.02, "oracle_acc_ci_high": oracle + 0.02,
            "oracle_n": 512, "class_acc": 0.0, "class_acc_n": 512}


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 64), colour)
    img.paste((255, 255, 255), (16, 16, 48, 48))
    img.save(path)
    return path


def make_panel_store(workdir: Path, study: str, broken: bool = False) -> str:
    """Write the panel study into ``workdir``; returns the tracking URI."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(workdir)
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(study, artifact_location=(workdir / "mlartifacts").resolve().as_uri())
    parent = client.create_run(eid, run_name=study, tags={
        "diffablate.role": "study", "diffablate.study": study, "diffablate.spec_hash": "feedbeef",
        "diffablate.kind": "one-at-a-time", "diffablate.n_planned": str(len(CELLS) * len(SEEDS)),
        "mlflow.source.git.commit": COMMIT, "diffablate.command": f"diffablate study run {study}.toml",
        "diffablate.versions": json.dumps({"torch": "2.11.0", "diffusers": "0.42.1", "mlflow": "3.17.2"})}).info.run_id
    client.log_dict(parent, CLAIMS, "claims.json")
    # As studies/ writes it: flags keyed by sampler, not by entry.
    client.log_dict(parent, {"entries": list(ENTRIES), "primary": "ddim-g3", "steps": 25, "n_samples": 512,
                             "flags": {"ddim": {"clip_sample": False, "timestep_spacing": "trailing", "eta": 0.0},
                                       "ddpm": {"clip_sample": False, "timestep_spacing": "trailing"}}},
                    "panel.json")
    client.log_text(parent, f'name = "{study}"\nseeds = [0, 1, 2]\n', "study_spec.toml")
    client.log_artifact(parent, str(_png(workdir / "tmp" / "real.png", (250, 20, 20))), "samples")
    number = 0
    for cell, over in CELLS.items():
        for seed in SEEDS:
            failed = cell == "off" and seed == 2
            tags = {"mlflow.parentRunId": parent, "diffablate.role": "trial", "diffablate.trial_number": str(number),
                    "diffablate.cell": _label({**BASE, **over}), "diffablate.seed": str(seed),
                    "diffablate.status": "FAIL" if failed else "COMPLETE",
                    "diffablate.fail_reason": "diverged: loss nan at step 7" if failed else ""}
            rid = client.create_run(eid, run_name=f"t{number:03d} {cell} s{seed}", tags=tags).info.run_id
            params = {**{k: str(v) for k, v in BASE.items()}, **{k: str(v) for k, v in over.items()},
                      "seed": str(seed), "replicate": str(over.get("replicate", 0)), "eval.sampler": "ddim",
                      "eval.guidance_scale": "3.0", "eval.panel_samplers": '["ddim", "ddpm"]',
                      "eval.panel_guidance": "[1.0, 3.0]", "derived.device": "cuda:0"}
            heldout = 0.05 + 0.002 * seed + (0.01 if cell == "pooled" else 0.0) + (
                0.0 if cell in ("B", "pooled") else _noise(list(CELLS).index(cell), seed, 6, sd=0.001))
            metrics = [Metric("train_loss", 1 / (1 + s) + 0.01 * seed, 0, s) for s in (0, 10, 20)]
            metrics += [Metric("heldout_loss", 1.1 / (1 + s) + 0.01 * seed, 0, s) for s in (0, 10, 20)]
            if not failed:
                for e, entry in enumerate(ENTRIES):
                    for score, v in _scores(cell, e, seed, broken).items():
                        metrics.append(Metric(f"{score}/{entry}", float(v), 0, 20))
                    # An intermediate FID at step 10 (the data for an FID-vs-step figure).
                    metrics.append(Metric(f"fid/{entry}", _scores(cell, e, seed, broken)["fid"] + 8.0, 0, 10))
                metrics += [Metric("final_heldout_loss", heldout, 0, 20), Metric("oracle_ceiling", 0.97, 0, 20),
                            Metric("final_train_loss", 0.04, 0, 20)]
                if number == 0:
                    metrics.append(Metric("system/gpu_0_utilization_percentage", 80.0, 0, 0))
            client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                             tags=[RunTag("mlflow.source.git.commit", COMMIT)])
            if not failed:
                client.log_dict(rid, {"seed": seed, "eval": {"sampler": "ddim", "guidance_scale": 3.0}}, "config.json")
                # The primary entry's evaluation grid and its captions, as studies/evaluate.py logs them.
                shade = 40 * list(CELLS).index(cell)
                client.log_artifact(rid, str(_png(workdir / "tmp" / str(number) / "eval_ddim-g3.png",
                                                  (shade, 255 - shade, 60 * seed))), "samples")
                client.log_dict(rid, ["a red circle", "a blue square above a green triangle"],
                                "samples/eval_ddim-g3_prompts.json")
            client.set_terminated(rid, "FAILED" if failed else "FINISHED")
            number += 1
    client.set_terminated(parent, "FINISHED")
    shutil.rmtree(workdir / "tmp")
    return uri


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("panel") / "panel"
    uri = make_panel_store(workdir, "panel")
    return workdir, uri, build_report("panel", uri, workdir / "report")


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("broken") / "broken"
    uri = make_panel_store(workdir, "broken", broken=True)
    return workdir, uri, build_report("broken", uri, workdir / "report")


def _rows(result, claim: str) -> pd.DataFrame:
    return result.verdicts[result.verdicts["claim"] == claim].set_index("entry")


def test_panel_is_read_from_panel_json(good) -> None:
    data = load_study("panel", good[1])
    assert data.panel.entries == ENTRIES and data.panel.primary == "ddim-g3"
    assert data.panel.flags["ddim"]["timestep_spacing"] == "trailing"
    assert {f"oracle_acc/{e}" for e in ENTRIES} <= set(data.trials.columns)
    assert "oracle_ceiling" in data.trials.columns and not any(c.startswith("system/") for c in data.trials.columns)
    assert set(data.histories["step"]) == {10, 20}  # FID was logged at two steps


def test_a_claim_is_judged_under_every_entry_and_the_split_is_reported(good) -> None:
    rows = _rows(good[2], "seq-worse")
    assert rows["verdict"].to_dict() == {"ddim-g1": "inconclusive", "ddim-g3": "contradicted",
                                         "ddpm-g1": "supported", "ddpm-g3": "supported"}
    claim = good[2].claims.set_index("claim").loc["seq-worse"]
    assert claim["verdict"] == "mixed"
    assert claim["agreement"] == ("inconclusive under ddim-g1; contradicted under ddim-g3; "
                                  "supported under ddpm-g1, ddpm-g3")
    assert claim["entry"] == "ddim-g3"  # the numbers shown are the primary entry's


def test_non_inferiority_uses_the_margin_not_superiority(good) -> None:
    loose, tight = _rows(good[2], "pooled-no-worse"), _rows(good[2], "pooled-no-worse-tight")
    assert list(loose.index) == ["ddpm-g3"] == list(tight.index)  # judged on the entry the claim names
    r = loose.loc["ddpm-g3"]
    assert r["verdict"] == "supported" and "inside the margin 2" in r["reason"]
    assert r["ci_low"] < 0 < r["ci_high"]  # a superiority test would say inconclusive
    # One-sided p of H0 "worse by >= margin": t = (margin - effect) / se, df = n - 1.
    se = r["sd"] / math.sqrt(r["n_pairs"])
    assert r["p_value"] == pytest.approx(sps.t.sf((2.0 - r["effect"]) / se, r["n_pairs"] - 1), rel=1e-9)
    assert tight.loc["ddpm-g3", "verdict"] == "inconclusive"
    assert "straddles the margin 0.1" in tight.loc["ddpm-g3", "reason"]


def test_degenerate_constant_and_failed_arms(good) -> None:
    deg = _rows(good[2], "pooled-heldout").loc["–"]
    assert deg["verdict"] == "degenerate" and deg["ci_low"] == deg["ci_high"] == pytest.approx(0.01)
    const = _rows(good[2], "class-constant")
    assert set(const["verdict"]) == {"untested"} and "constant metric" in const["reason"].iloc[0]
    off = _rows(good[2], "off-wins")
    assert set(off["verdict"]) == {"inconclusive"}
    assert all("cannot win on its survivors" in r for r in off["reason"])
    assert good[2].claims.set_index("claim").loc["off-wins", "failed_variant"] == "1/3"


def test_without_the_failure_the_failing_arm_would_have_won(good) -> None:
    from diffablate.reports.verdicts import judge

    data = load_study("panel", good[1])
    data = dataclasses.replace(data, trials=data.trials[data.trials["status"] == "COMPLETE"].reset_index(drop=True))
    rows = judge(data).rows
    assert set(rows.loc[rows["claim"] == "off-wins", "verdict"]) == {"supported"}


def test_holm_covers_the_claims_not_the_controls(good) -> None:
    v = good[2].verdicts
    claims = v[v["role"] == "claim"]
    assert list(claims["p_holm"].fillna(-1)) == pytest.approx([p if not math.isnan(p) else -1 for p in
                                                               holm(list(claims["p_family"]))])
    ok = claims[claims["status"] == "ok"]
    assert (ok["p_holm"] >= ok["p_family"] - 1e-15).all() and (ok["p_holm"] > ok["p_family"]).any()
    null = v[v["claim"] == "null"]
    assert list(null["p_holm"]) == pytest.approx(holm(list(null["p_family"])))  # its own family


def test_controls_pass_and_minimum_detectable_effects(good) -> None:
    res = good[2]
    assert res.instrument == "passed" and set(res.claims["trust"]) == {"yes"}
    claims = res.claims.set_index("claim")
    assert claims.loc["null", "verdict"] == "control passed"
    assert claims.loc["text-matters", "verdict"] == "control passed"
    r = _rows(res, "seq-worse").loc["ddpm-g3"]
    n = r["n_pairs"]
    expected = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) * r["sd"] / math.sqrt(n)
    assert r["mde"] == pytest.approx(expected) and r["mde_null"] > 0
    assert res.tags["diffablate.trusted"] == "yes" and res.tags["diffablate.verdict.seq-worse"] == "mixed"


def test_first_screen_holds_every_verdict(good, broken) -> None:
    for workdir, _, res in (good, broken):
        md = (res.out_dir / "report.md").read_text().splitlines()
        first = "\n".join(md[:40])
        for _, c in res.claims.iterrows():
            row = next((line for line in md[:40] if line.startswith("| ") and c["claim"] in line), None)
            assert row is not None and c["verdict"] in row, (c["claim"], first)
        html = (res.out_dir / "report.html").read_text()
        box = html.index('<table class="box">')
        assert box < html.index("<figure") and box < html.index("<h2")  # nothing tall comes before the box
        box_html = html[box:html.index("</table>", box)]
        assert all(f">{c}<" in box_html or f": {c}<" in box_html for c in res.claims["claim"])
        assert all(c["verdict"] in box_html for c in res.claims.to_dict("records"))


def test_failed_control_marks_every_verdict_untrusted(broken) -> None:
    workdir, uri, res = broken
    assert res.instrument == "failed"
    claims = pd.read_csv(res.out_dir / "claims.csv", keep_default_na=False)  # a claim named "null" stays a name
    assert set(claims["trust"]) == {"no"}
    assert claims.set_index("claim").loc["null", "verdict"] == "control FAILED"
    md = (res.out_dir / "report.md").read_text()
    head = "\n".join(md.splitlines()[:12])
    assert "THE INSTRUMENT FAILED" in head and "untrusted" in head
    assert "BASELINE BELOW THE QUALITY BAR" in head and "0.97" in head and "ddim-g3" in head  # ceiling beside the bar
    html = (res.out_dir / "report.html").read_text()
    assert 'class="callout danger"' in html and "supported · untrusted" in html
    tags = MlflowClient(tracking_uri=uri).get_run(load_study("broken", uri).parent_run_id).data.tags
    assert tags["diffablate.trusted"] == "no" and tags["diffablate.instrument"] == "failed"
    assert tags["diffablate.baseline_bar"] == "below"


def test_rerun_is_byte_identical_after_tagging_the_parent(good) -> None:
    workdir, uri, res = good
    first = {p.relative_to(res.out_dir): p.read_bytes() for p in res.out_dir.rglob("*") if p.is_file()}
    build_report("panel", uri, res.out_dir)  # reads the store the first run tagged and logged into
    second = {p.relative_to(res.out_dir): p.read_bytes() for p in res.out_dir.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    assert sorted(str(k) for k in first if first[k] != second[k]) == []


def test_reproducibility_block_and_figures(good) -> None:
    res = good[2]
    md = (res.out_dir / "report.md").read_text()
    repro = md[md.index("## Reproducibility"):]
    for want in ("diffablate report panel --workdir WORKDIR", "diffablate study run panel.toml", COMMIT,
                 "torch 2.11.0", "derived.device = cuda:0", "1 GPU(s) monitored", "#/experiments/", 'name = "panel"',
                 '"guidance_scale": 3.0', "trailing"):
        assert want in repro, want
    figs = {p.stem for p in (res.out_dir / "figures").glob("*.png")}
    assert {"effects_forest", "claims", "samples", "fid_steps", "fid_bootstrap", "steps"} <= figs
    assert "a blue square above a green triangle" in md and "real images for the same prompts" in md
    assert "`samples/eval_ddim-g3.png`" in md  # the scored grid, not the trainer's
    # A constant metric gets no panel in the forest plot.
    forest_metrics = set(res.verdicts.loc[res.verdicts["status"] != "constant", "metric"])
    assert "class_acc" not in forest_metrics


def test_links_use_the_mlflow_ui_route(good) -> None:
    from diffablate.reports.render import Para, to_html
    from diffablate.reports.repro import run_link, ui_address

    data = load_study("panel", good[1])
    rid = data.trials["run_id"].iloc[0]
    link = run_link(data, rid, ui_address(data, "http://127.0.0.1:5000"))
    html = to_html([Para(link)], "t", Path("."))
    assert f'<a href="http://127.0.0.1:5000/#/experiments/{data.experiment_id}/runs/{rid}">{rid[:8]}</a>' in html
    # A SQLite store has no UI of its own: the route is written out as code, not as a dead link.
    assert run_link(data, rid, ui_address(data, None)) == f"`#/experiments/{data.experiment_id}/runs/{rid}`"
    served = dataclasses.replace(data, tracking_uri="http://mlflow.example:5000")
    assert run_link(served, rid, ui_address(served, None)).endswith(f"(http://mlflow.example:5000/#/experiments/"
                                                                     f"{data.experiment_id}/runs/{rid})")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_PROBE = """<script>addEventListener('load', () => {
  const cells = [...document.querySelectorAll('table.box td:nth-child(2)')];
  const out = cells.map(c => c.textContent + '@' + Math.round(c.getBoundingClientRect().bottom) + '/' +
                        Math.round(c.getBoundingClientRect().right));
  document.body.setAttribute('data-probe', innerWidth + 'x' + innerHeight + ';' + out.join('|'));
});</script></body>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / f'profile-{time.monotonic_ns()}'}",
           "--hide-scrollbars", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium not installed (apt-get install chromium)")
@pytest.mark.parametrize("size", ["1280,800", "760,900"])
def test_html_first_screen_shows_every_verdict_in_chromium(broken, tmp_path: Path, size: str) -> None:
    """Rendered by headless Chromium at a laptop and at a narrow window: every verdict cell of the box lies
    inside the first screen of a laptop (above the fold) and is never cut off at the right."""
    res = broken[2]
    page = tmp_path / "probe.html"
    page.write_text((res.out_dir / "report.html").read_text().replace("</body>", _PROBE, 1))
    dom = _chromium(tmp_path, f"--window-size={size}", "--dump-dom", page.as_uri()).stdout
    probe = re.search(r'data-probe="([^"]*)"', dom)
    assert probe is not None, dom[:500]
    screen, cells = probe.group(1).split(";", 1)
    width, height = map(int, screen.split("x"))
    found = cells.split("|")
    assert len(found) == len(res.claims)
    for item in found:
        text, where = item.rsplit("@", 1)
        bottom, right = map(int, where.split("/"))
        assert right <= width and (bottom <= height or width < 1000), (item, screen)
    shot = res.out_dir.parent / f"first_screen_{size.replace(',', 'x')}.png"
    _chromium(tmp_path, f"--window-size={size}", f"--screenshot={shot}", (res.out_dir / "report.html").as_uri())
    assert shot.stat().st_size > 10_000
