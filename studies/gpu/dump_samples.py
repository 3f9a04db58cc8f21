"""Generated samples of trained runs under the whole sampling panel, saved as uint8 tensors, so the pictures
behind a score can be looked at and re-scored elsewhere (the captions are the run's eval captions, first n):

    python3 -m diffablate.studies.gpu.dump_samples RUN_DIR [RUN_DIR ...] --n 300 --out samples.pt
"""

from __future__ import annotations

import argparse

import torch

from diffablate.metrics.names import entry_name
from diffablate.models.trainer import load_trained
from diffablate.studies.evaluate import eval_captions, generate_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out: dict[str, object] = {}
    for run in args.runs:
        trained = load_trained(run, "cuda")
        captions, _, _ = eval_captions(trained.cfg, args.n)
        for sampler, guidance in trained.cfg.eval.panel():
            images = generate_samples(trained, trained.cfg, captions, torch.device("cuda"), sampler=sampler,
                                      guidance=guidance)
            out[f"{run}|{entry_name(sampler, guidance)}"] = images.cpu()
        out[f"{run}|captions"] = captions
        out[f"{run}|step"] = trained.step
    torch.save(out, args.out)


if __name__ == "__main__":
    main()
