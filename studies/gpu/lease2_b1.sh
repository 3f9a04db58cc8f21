#!/usr/bin/env bash
# Lease 2, call 1 (carry .whl .fidw1 .commit): install, keep the first FID-weights slice, and run the GPU
# quality test (a short baseline must pass the oracle under every panel entry and not get worse).
set -u -o pipefail
. studies/gpu/env.sh
{
  date -u; fid_weights; ls -la /tmp/keep
  timeout 150 python3 -m pytest -x -q -s -p no:cacheprovider tests/test_cuda_quality.py
  date -u
} 2>&1 | tee "$OUT/b1.log"
