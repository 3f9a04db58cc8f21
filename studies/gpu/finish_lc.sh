#!/usr/bin/env bash
# After the learning curve: report, samples, bf16-vs-fp32 sampling; everything small goes to $OUT.
set -u -o pipefail
. studies/gpu/env.sh
WD=/tmp/wd/lc
{
  python3 -m diffablate.studies.cli study status "$WD"
  time python3 -m diffablate.studies.cli report learning-curve --workdir "$WD"
  tar czf "$OUT/lc_report.tgz" -C "$WD" --exclude='*.svg' report 2>/dev/null
  tar czf "$OUT/lc_grids.tgz" -C "$WD" $(cd "$WD" && ls runs/learning-curve/*/eval_*step*.png 2>/dev/null | head -48)
  runs=$(ls -d "$WD"/runs/learning-curve/* 2>/dev/null | head -3)
  [ -n "$runs" ] && timeout 40 python3 -m diffablate.studies.gpu.dump_samples $runs --n 128 --out "$OUT/lc_samples.pt"
  [ -n "$runs" ] && timeout ${PREC_LIMIT:-100} python3 -m diffablate.studies.gpu.precision $runs --n 300 --out "$OUT/precision.json"
  ls -la "$OUT"
} 2>&1 | tee "$OUT/b_finish.log"
