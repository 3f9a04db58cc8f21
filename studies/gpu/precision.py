"""Does bf16 sampling score like fp32 sampling? (issue 14 item 7)

Scores the same trained checkpoints under the whole sampling panel twice - bf16 autocast (the GPU default,
`perf.mixed_precision = "auto"`) and fp32 - from the same noise, and prints per-entry differences beside the
seed-to-seed spread of the same scores. Run on the GPU after a study:

    python3 -m diffablate.studies.gpu.precision WORKDIR/runs/STUDY/0000 WORKDIR/runs/STUDY/0001 ... --n 1000
"""

from __future__ import annotations

import argparse
import json
import statistics

from diffablate.models.trainer import load_trained
from diffablate.studies.evaluate import evaluate_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="trained run directories (one per seed)")
    ap.add_argument("--n", type=int, default=1000, help="samples per panel entry")
    ap.add_argument("--out", default=None, help="write the scores as JSON here")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        trained = load_trained(run, "cuda")
        base = trained.cfg.with_overrides({"eval.clip_score": False})  # no judge needed: FID, KID, oracle
        for precision in ("bf16", "no"):
            cfg = base.with_overrides({"perf.mixed_precision": precision})
            scores = evaluate_trained(trained, cfg, n=args.n, device="cuda")
            rows.append({"run": run, "precision": precision, **scores})
            print(json.dumps({"run": run, "precision": precision,
                              **{k: round(v, 4) for k, v in scores.items() if k.split("/")[0] in ("fid", "oracle_acc")}}))
    keys = sorted(k for k in rows[0] if k.split("/")[0] in ("fid", "kid", "oracle_acc"))
    print(f"{'score':28s} {'mean |bf16 - fp32|':>20s} {'seed sd (fp32)':>16s}")
    for k in keys:
        diffs = [abs(a[k] - b[k]) for a, b in zip(rows[0::2], rows[1::2])]
        fp32 = [b[k] for b in rows[1::2]]
        sd = statistics.stdev(fp32) if len(fp32) > 1 else float("nan")
        print(f"{k:28s} {statistics.mean(diffs):20.4f} {sd:16.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
