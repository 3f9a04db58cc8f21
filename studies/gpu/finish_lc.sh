#!/usr/bin/env bash
# After the learning curve: report, bf16-vs-fp32 sampling, samples; everything small goes to $OUT.
set -u -o pipefail
. studies/gpu/env.sh
WD=/tmp/wd/lc
{
  python3 -m diffablate.studies.cli study status "$WD"
  time python3 -m diffablate.studies.cli report learning-curve --workdir "$WD"
  runs=$(ls -d "$WD"/runs/learning-curve/* 2>/dev/null | head -3)
  [ -n "$runs" ] && timeout 150 python3 -m diffablate.studies.gpu.precision $runs --n 500 --out "$OUT/precision.json"
  [ -n "$runs" ] && timeout 60 python3 -m diffablate.studies.gpu.dump_samples $runs --n 256 --out "$OUT/lc_samples.pt"
  tar czf "$OUT/lc_report.tgz" -C "$WD" --exclude='*.svg' report 2>/dev/null
  tar czf "$OUT/lc_grids.tgz" -C "$WD" $(cd "$WD" && ls runs/learning-curve/*/eval_*step*.png 2>/dev/null | head -48)
  ls -la "$OUT"
} 2>&1 | tee "$OUT/b_finish.log"
