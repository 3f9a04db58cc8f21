#!/usr/bin/env bash
# Lease 1 (one call, carry .whl .commit): install, imports, the GPU tests, a miniature learning-curve study
# through the real runner with a pack of 3 (panel, milestones, report), and a fast-path bench at the claims
# UNet's width. De-risks the big lease; about 6 minutes.
set -u -o pipefail
. studies/gpu/env.sh
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, mlflow, optuna, torchmetrics, torch_fidelity, sqlalchemy, tomli_w, diffablate.studies.cli as c; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__, 'torchmetrics', torchmetrics.__version__, torch.cuda.get_device_name())"
  echo "== tests/test_cuda.py"; date -u
  timeout 240 python3 -m pytest -x -q -p no:cacheprovider --durations=8 tests/test_cuda.py
  echo "== tests/test_cuda_quality.py"; date -u
  timeout 200 python3 -m pytest -x -q -s -p no:cacheprovider tests/test_cuda_quality.py
  date -u
} 2>&1 | tee "$OUT/a_tests.log"
{
  echo "== mini learning curve (pack 3)"; date -u
  sed -e 's/^budgets = .*/budgets = [200, 400]/' -e 's/^n_samples = .*/n_samples = 256/' -e 's/^fid = true.*/fid = false/' \
      -e 's/^kid = true.*/kid = false/' -e 's/^name = "learning-curve"/name = "lc-mini"/' studies/learning-curve.toml > /tmp/lc-mini.toml
  time timeout -s INT 200 python3 -m diffablate.studies.cli study run /tmp/lc-mini.toml --workdir /tmp/wd/mini --pack 3
  time timeout 100 python3 -m diffablate.studies.cli report lc-mini --workdir /tmp/wd/mini
  timeout 60 python3 -m diffablate.studies.gpu.dump_samples /tmp/wd/mini/runs/lc-mini/0000 --n 64 --out "$OUT/mini_samples.pt"
  tar czf "$OUT/mini_report.tgz" -C /tmp/wd/mini --exclude='*.svg' report
  date -u
} 2>&1 | tee "$OUT/a_mini.log"
{
  echo "== bench: fast path at the claims UNet's width, batch 256"; date -u
  timeout 150 python3 -m diffablate.studies.cli bench --device cuda --batch-size 256 --model-width 32 --steps 40 \
    --warmup 10 --reference bf16 --variant no-compile:perf.compile=off --out "$OUT/bench.jsonl"
  date -u
} 2>&1 | tee "$OUT/a_bench.log"
