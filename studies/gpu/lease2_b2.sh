#!/usr/bin/env bash
# Lease 2, call 2 (carry .fidw2 .commit): the learning curve (studies/learning-curve.toml) as one pack of its
# 3 seeds. Stopped with SIGINT (Ctrl-C semantics: trials re-queued from their last milestone checkpoint) if
# it runs long; call 3 resumes it. Then the report, bf16-vs-fp32 sampling and samples (finish_lc.sh).
set -u -o pipefail
. studies/gpu/env.sh
WD=/tmp/wd/lc
{
  date -u; fid_weights
  time timeout -s INT ${LC_LIMIT:-480} python3 -m diffablate.studies.cli study run studies/learning-curve.toml \
    --workdir "$WD" --pack 3
  echo "study exit $?"; date -u
} 2>&1 | tee "$OUT/b2_study.log"
if grep -q "3/3 complete" "$OUT/b2_study.log"; then bash studies/gpu/finish_lc.sh; fi
