#!/usr/bin/env bash
# Lease 2, call 3: resume the learning curve if call 2 stopped it, then finish (report, precision, samples).
set -u -o pipefail
. studies/gpu/env.sh
WD=/tmp/wd/lc
{
  date -u; fid_weights
  time timeout -s INT ${LC_LIMIT:-300} python3 -m diffablate.studies.cli study run studies/learning-curve.toml \
    --workdir "$WD" --pack 3
  echo "study exit $?"; date -u
} 2>&1 | tee "$OUT/b3_study.log"
bash studies/gpu/finish_lc.sh
