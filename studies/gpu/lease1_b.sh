#!/usr/bin/env bash
# Lease 1, call B (carry .fidw2): the learning curve (studies/learning-curve.toml), its report, bf16-vs-fp32
# sampling on its final checkpoints, and samples to look at. Stops the study with SIGINT (Ctrl-C semantics:
# trials re-queued from their last milestone checkpoint) if it runs long, so call C can finish it.
set -u -o pipefail
. studies/gpu/env.sh
WD=/tmp/wd/lc
{
  date -u; fid_weights
  time timeout -s INT ${LC_LIMIT:-470} python3 -m diffablate.studies.cli study run studies/learning-curve.toml \
    --workdir "$WD" --pack ${PACK:-3}
  echo "study exit $?"
  date -u
} 2>&1 | tee "$OUT/b_study.log"
bash studies/gpu/finish_lc.sh
