"""A small CLIP trained in-project, in Hugging Face format, in two roles.

No CLIP weights exist offline (see NOTES.md), so the project trains its own on the study's captions:
a word-level tokenizer built from the training captions, a `transformers.CLIPModel` with a vision tower
sized for 16-64 px images (patch 4, a few layers) and CLIP's symmetric contrastive loss with a learned
temperature (`CLIPModel(..., return_loss=True)`). The result is an ordinary HF directory:
`CLIPModel.from_pretrained(d)`, `CLIPProcessor.from_pretrained(d)`, `AutoTokenizer.from_pretrained(d)`
and `CLIPImageProcessor.from_pretrained(d)` all load it offline.

Two roles, two models (`ROLES`):
- **encoder**: its frozen text tower conditions the diffusion UNet (`ClipTextEncoder`).
- **judge**: used only for CLIP-score. A different seed and *disjoint* training data (the other half of
  the train split), so a generator is never scored by the network whose embeddings it was trained to match.

Either role can instead point at any local HF CLIP directory (`text.clip_path`, `eval.judge_path`).
Trained CLIPs are cached by (dataset config, CLIP config, role) under `$DIFFABLATE_CACHE/clip/<key>/`,
written atomically (tmp dir + rename) under a file lock, so a study trains each once and every trial
(and every parallel worker) reuses it. The default `ClipConfig()` is the same on every device (`PRESETS`
has a larger "base" for GPUs), so a run trained on the GPU reloads on a CPU with the same CLIP shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from diffablate.models import cache
from diffablate.models.config import ConfigError, DataConfig, RunConfig, _build, _check, _parse_overrides, _positive
from diffablate.models.data import CaptionedImages, build_dataset
from diffablate.models.device import resolve_device
from diffablate.models.retrieval import retrieval_scores
from diffablate.models.text import TextEmbedding, TextEncoder

CACHE_VERSION = 1  # bump when training code changes what a cached CLIP contains
META_FILE = "diffablate_clip.json"  # provenance + training/eval numbers, next to the HF files
PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
# EOS id is 3, not 2: transformers' CLIPTextModel treats eos_token_id == 2 as a legacy config and pools at
# argmax(input_ids) instead of at the EOS position.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


class ClipError(ValueError):
    """A CLIP directory or role is unusable; the message names the path or field."""


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipConfig:
    """Size and training of the in-project CLIP. Part of the cache key: change a field, get a new CLIP."""

    # The default is sized so that any machine can train it (~2.5 CPU-minutes, 20 s on a GPU) and, being
    # device-independent, a run trained on the GPU reloads elsewhere with the same architecture.
    image_size: int = 16  # vision tower input side (the processor resizes); 0 = the data resolution
    patch_size: int = 4  # 16 px -> 4x4 patches: enough to see colour, shape, size and position
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2  # captions are short templates: two layers bind colour to shape
    heads: int = 4
    mlp_ratio: int = 4  # ViT's MLP width multiple
    projection_dim: int = 64  # joint embedding width (the encoder's pooled_dim)
    max_position: int = 32  # text context in tokens incl. BOS/EOS; longer captions are truncated with a warning
    steps: int = 1000  # measured numbers at PRESETS
    batch_size: int = 128  # contrastive learning wants many negatives per step
    lr: float = 1e-3  # tiny transformers from scratch tolerate (and need) a high LR with warm-up
    weight_decay: float = 0.05
    warmup_steps: int = 100  # linear warm-up (at most a fifth of the steps), then cosine decay to 0
    grad_clip: float = 1.0
    logit_scale_init: float = 2.6592  # ln(1/0.07), CLIP's initial temperature
    seed: int = 0  # base training seed; each role adds its own offset (ROLES)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, p: str = "clip") -> None:
        """Raise ConfigError naming the first bad field."""
        for name in ("patch_size", "vision_width", "vision_layers", "text_width", "text_layers", "heads",
                     "mlp_ratio", "projection_dim", "steps", "batch_size", "lr", "grad_clip"):
            _positive(f"{p}.{name}", getattr(self, name))
        _check(self.image_size >= 0, f"{p}.image_size", "must be >= 0 (0 = data resolution)", self.image_size)
        _check(self.image_size == 0 or self.image_size % self.patch_size == 0, f"{p}.image_size",
               f"must be a multiple of clip.patch_size={self.patch_size}", self.image_size)
        for name in ("vision_width", "text_width"):
            _check(getattr(self, name) % self.heads == 0, f"{p}.{name}",
                   f"must be divisible by clip.heads={self.heads}", getattr(self, name))
        _check(self.max_position >= 3, f"{p}.max_position", "must be >= 3 (BOS, a word, EOS)", self.max_position)
        _check(self.batch_size >= 2, f"{p}.batch_size", "must be >= 2 (contrastive loss needs negatives)",
               self.batch_size)
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0", self.warmup_steps)

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str]) -> "ClipConfig":
        """New config with overrides {"steps": 100} / ["clip.steps=100"] (the `clip.` prefix is optional)."""
        items = dict(overrides) if isinstance(overrides, Mapping) else _parse_overrides(overrides)
        d = dataclasses.asdict(self)
        for key, value in items.items():
            name = key.removeprefix("clip.")
            if name not in d:
                raise ConfigError(f"clip.{name}: unknown config key; known keys: {sorted(d)}")
            d[name] = value
        return _build(ClipConfig, d, prefix="clip.", where="")


# Named sizes for `diffablate clip train --preset`. Measured 2026-11-29 on shapes at 32 px, 2,048 training
# pairs per role, text->image top-1 on held-out pairs (a hit = same caption text):
#   "small" (the default): 20 s on one H200, 149 s of CPU time on one core here (11 min wall on the shared
#           2-core box); 0.76 of 1,024 held-out (chance 0.009), 0.90 of 256 (chance 0.010).
#   "base": 32 px tower, wider and deeper: 67 s on one H200; 0.84 of 1,024 held-out. GPU only in practice
#           (~2.6 CPU-s per step).
PRESETS: dict[str, ClipConfig] = {
    "small": ClipConfig(),
    "base": ClipConfig(image_size=0, vision_width=128, vision_layers=3, text_width=128, batch_size=256, steps=3000),
}


@dataclass(frozen=True)
class Role:
    """Which half of the train split a role trains on, and its seed offset (disjoint data, different init)."""

    half: int  # train on items i with i % 2 == half
    seed_offset: int
    doc: str


ROLES: dict[str, Role] = {
    "encoder": Role(0, 0, "frozen text tower for the diffusion UNet"),
    "judge": Role(1, 1, "scores generated images (CLIP-score); never seen by the generator's encoder"),
}


def _role(role: str) -> Role:
    if role not in ROLES:
        raise ClipError(f"role: must be one of {list(ROLES)}, got {role!r}")
    return ROLES[role]


class Tracker(Protocol):
    """The part of models/tracker.py's Tracker that CLIP training uses."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


# --- tokenizer and image processor ---------------------------------------------------------------


def build_tokenizer(captions: Sequence[str], max_position: int) -> Any:
    """Word-level tokenizer over `captions` (lower-cased, split on whitespace and punctuation).

    Every sequence is `<|startoftext|> words <|endoftext|>`; unknown words map to `<|unk|>`. Returned as a
    `PreTrainedTokenizerFast` whose `save_pretrained` output `AutoTokenizer` loads offline.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(captions), trainer=trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=max_position, padding_side="right")


def build_image_processor(image_size: int) -> Any:
    """`CLIPImageProcessor` mapping uint8 images to the tower's input: resize, rescale, normalise to [-1, 1].

    Mean = std = 0.5 makes the CLIP's input range the diffusion model's (`to_model_range`); no centre crop
    because the datasets are already square.
    """
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                              do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def rgb(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1|3, H, W] -> [N, 3, H, W]: grey datasets (fashion-mnist) go through the same 3-channel tower."""
    return images_u8.expand(-1, 3, -1, -1) if images_u8.shape[1] == 1 else images_u8


def too_long(tokenizer: Any, captions: Sequence[str], context: int) -> list[str]:
    """The captions whose token count (incl. BOS/EOS) exceeds `context`."""
    return [c for c, ids in zip(captions, tokenizer(list(captions))["input_ids"]) if len(ids) > context]


def _warn_truncated(long: list[str], context: int) -> None:
    warnings.warn(f"{len(long)} caption(s) longer than the CLIP text context ({context} tokens incl. BOS/EOS) "
                  f"were truncated, e.g. {long[0]!r}", UserWarning, stacklevel=3)


def tokenize(tokenizer: Any, captions: Sequence[str], context: int, *, pad_to_context: bool = False,
             warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) long [B, L]; captions over `context` tokens are truncated (with a warning).

    Truncation keeps the final EOS (the tokenizer truncates words before adding BOS/EOS), so the pooled
    embedding is still taken at an EOS. `pad_to_context` pads every row to `context`, else to the longest.
    """
    if warn and (long := too_long(tokenizer, captions, context)):
        _warn_truncated(long, context)
    enc = tokenizer(list(captions), truncation=True, max_length=context,
                    padding="max_length" if pad_to_context else "longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def preprocess_images(image_processor: Any, images_u8: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float pixel_values through the saved processor (the exact transform eval uses)."""
    images = rgb(images_u8)
    out = [image_processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 3, 1, 1)


def build_model(clip_cfg: ClipConfig, tokenizer: Any, image_size: int) -> Any:
    """A freshly initialised `CLIPModel` sized by `clip_cfg` (call under a seeded RNG)."""
    from transformers import CLIPConfig, CLIPModel

    c = clip_cfg
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=c.text_width,
                         intermediate_size=c.mlp_ratio * c.text_width,
                         num_hidden_layers=c.text_layers, num_attention_heads=c.heads,
                         max_position_embeddings=c.max_position, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=c.vision_width, intermediate_size=c.mlp_ratio * c.vision_width,
                           num_hidden_layers=c.vision_layers, num_attention_heads=c.heads, image_size=image_size,
                           patch_size=c.patch_size, num_channels=3),
        projection_dim=c.projection_dim, logit_scale_init_value=c.logit_scale_init)
    return CLIPModel(config)


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipTrainResult:
    """What `train_clip` did; also written to `<out>/diffablate_clip.json`."""

    out_dir: Path
    steps: int
    final_loss: float
    temperature: float  # 1 / exp(logit_scale) at the end
    wall_s: float
    n_train: int


def _lr_factor(step: int, warmup: int, total: int) -> float:
    # Linear warm-up then cosine to zero: the usual CLIP / ViT schedule.
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_clip(train: CaptionedImages, clip_cfg: ClipConfig, out_dir: str | Path, *, seed: int | None = None,
               tracker: Tracker | None = None, progress: bool = True, device: str = "auto",
               meta: Mapping[str, Any] | None = None) -> ClipTrainResult:
    """Train a CLIP on (image, caption) pairs and save it in HF format to `out_dir` (created).

    `seed` defaults to `clip_cfg.seed`; it fixes the init and the batch order. The tracker (optional) gets
    the CLIP config as params and `clip_train_loss`, `clip_lr`, `clip_temperature` by step.
    """
    from tqdm.auto import tqdm

    seed = clip_cfg.seed if seed is None else seed
    dev = resolve_device(device)
    image_size = clip_cfg.image_size or train.resolution
    t0 = time.perf_counter()

    tokenizer = build_tokenizer(train.captions, clip_cfg.max_position)
    image_processor = build_image_processor(image_size)
    pixels = preprocess_images(image_processor, train.images).to(dev)
    ids, mask = tokenize(tokenizer, train.captions, clip_cfg.max_position)
    ids, mask = ids.to(dev), mask.to(dev)

    torch.manual_seed(seed)
    model = build_model(clip_cfg, tokenizer, image_size).to(dev).train()
    # No weight decay on norms, biases, embeddings and the temperature: the usual AdamW split.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": clip_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=clip_cfg.lr, betas=(0.9, 0.98))
    warmup = min(clip_cfg.warmup_steps, clip_cfg.steps // 5)  # short (test) runs still get their cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, clip_cfg.steps))
    gen = torch.Generator().manual_seed(seed)
    if tracker is not None:
        tracker.log_params({f"clip.{k}": v for k, v in dataclasses.asdict(clip_cfg).items()}
                           | {"clip.seed_effective": seed, "clip.n_train": len(train)})

    n, bs = len(train), min(clip_cfg.batch_size, len(train))
    order, pos, loss_ema = torch.randperm(n, generator=gen), 0, float("nan")
    bar = tqdm(range(clip_cfg.steps), desc="clip", disable=not progress, leave=False)
    for step in bar:
        # Sample a batch: epochs of a seeded permutation, so every pair is seen equally often.
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs].to(dev)
        pos += bs
        m = mask[idx]
        length = int(m.sum(1).max())  # trim padding columns: short captions, cheaper attention
        # Contrastive step: CLIPModel's own symmetric InfoNCE with the learned temperature.
        out = model(input_ids=ids[idx, :length], attention_mask=m[:, :length], pixel_values=pixels[idx],
                    return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the logit scale at 100 to keep the softmax stable
            model.logit_scale.clamp_(0, math.log(100))
        # Logging (a sync point; cheap at this size).
        loss = float(out.loss.detach())
        loss_ema = loss if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss
        if not math.isfinite(loss):
            raise ClipError(f"CLIP training diverged at step {step} (loss {loss}); lower clip.lr")
        if step % 25 == 0 or step == clip_cfg.steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
            if tracker is not None:
                tracker.log_metrics({"clip_train_loss": loss, "clip_lr": sched.get_last_lr()[0],
                                     "clip_temperature": float(1 / model.logit_scale.detach().exp())}, step=step)
    bar.close()

    result = ClipTrainResult(Path(out_dir), clip_cfg.steps, loss_ema, float(1 / model.logit_scale.detach().exp()),
                             time.perf_counter() - t0, n)
    save_clip(model.cpu(), tokenizer, image_processor, out_dir, meta={
        "clip": dataclasses.asdict(clip_cfg), "seed": seed, "n_train": n, "final_loss": result.final_loss,
        "temperature": result.temperature, "train_wall_s": result.wall_s, "device": str(dev), **(meta or {})})
    return result


def save_clip(model: Any, tokenizer: Any, image_processor: Any, out_dir: str | Path,
              meta: Mapping[str, Any] | None = None) -> None:
    """Write model, tokenizer, image processor and CLIPProcessor files (+ our metadata) to `out_dir`."""
    from transformers import CLIPProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_hf():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        image_processor.save_pretrained(out)  # preprocessor_config.json: what CLIPImageProcessor / older versions read
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    if meta is not None:
        (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """transformers' per-load "Loading weights" / "Writing model shards" progress bars off for a block (a study
    worker loads a CLIP per trial: the bars would fill its log), restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# --- loading and embedding -----------------------------------------------------------------------


class Clip:
    """A loaded CLIP directory: model (eval, frozen), tokenizer, image processor, and embedding helpers."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ClipError(f"{self.path}: not a Hugging Face CLIP directory (no config.json)")
        self.device = resolve_device(device)
        with quiet_hf():
            self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.image_processor = CLIPImageProcessor.from_pretrained(self.path)
        self.context = int(self.model.config.text_config.max_position_embeddings)

    @property
    def meta(self) -> dict[str, Any]:
        """Contents of diffablate_clip.json ({} for foreign CLIP directories)."""
        f = self.path / META_FILE
        return json.loads(f.read_text()) if f.is_file() else {}

    @torch.no_grad()
    def image_embeds(self, images_u8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """L2-normalised image embeddings [N, projection_dim] (float32, on CPU)."""
        out = []
        for i in range(0, len(images_u8), batch_size):
            pv = preprocess_images(self.image_processor, images_u8[i:i + batch_size]).to(self.device)
            out.append(self.model.get_image_features(pixel_values=pv).pooler_output.float().cpu())
        return nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, captions: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """L2-normalised caption embeddings [N, projection_dim] (float32, on CPU)."""
        out = []
        for i in range(0, len(captions), batch_size):
            ids, mask = tokenize(self.tokenizer, captions[i:i + batch_size], self.context)
            feats = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            out.append(feats.pooler_output.float().cpu())
        return nn.functional.normalize(torch.cat(out), dim=-1)


# --- the cache ------------------------------------------------------------------------------------


cache_root = cache.cache_root


def cache_key(data_cfg: DataConfig, role: str, clip_cfg: ClipConfig) -> str:
    """Stable hash of what determines a trained CLIP. n_heldout is left out: it does not touch training."""
    _role(role)
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k != "n_heldout"}
    return cache.key_of({"data": data, "clip": dataclasses.asdict(clip_cfg), "role": role, "v": CACHE_VERSION})


def role_split(train: CaptionedImages, role: str) -> CaptionedImages:
    """The half of the train split a role trains on (even items: encoder, odd: judge) - disjoint by index."""
    half = _role(role).half
    labels = train.labels[half::2] if train.labels is not None else None
    return CaptionedImages(train.name, f"{train.split}[{role}]", train.images[half::2].contiguous(),
                           train.captions[half::2], labels)


def ensure_clip(data_cfg: DataConfig, role: str, clip_cfg: ClipConfig | None = None, progress: bool = True, *,
                tracker: Tracker | None = None, device: str = "auto") -> Path:
    """Path of the cached CLIP for (data, clip config, role); trains and caches it first if missing.

    `clip_cfg=None` is `ClipConfig()` on every device, so a run reloads anywhere with the same CLIP shape.
    Concurrent callers (parallel study workers) serialise on a lock file, so only one trains; the directory
    appears atomically (tmp dir + rename), so a reader never sees a half-written CLIP. The held-out
    retrieval numbers are stored in its diffablate_clip.json (and sent to the tracker).
    """
    clip_cfg = clip_cfg or ClipConfig()
    key = cache_key(data_cfg, role, clip_cfg)

    def build(tmp: Path) -> None:
        train_role(data_cfg, role, clip_cfg, tmp, tracker=tracker, progress=progress, device=device,
                   meta={"cache_key": key})

    return cache.ensure_dir(cache_root() / "clip", key, build, complete=META_FILE)


def train_role(data_cfg: DataConfig, role: str, clip_cfg: ClipConfig, out_dir: str | Path, *,
               tracker: Tracker | None = None, progress: bool = True, device: str = "auto",
               meta: Mapping[str, Any] | None = None) -> ClipTrainResult:
    """Train `role`'s CLIP (its half of the train split, its seed) into `out_dir`, then record held-out retrieval."""
    spec = _role(role)
    train = role_split(build_dataset(data_cfg, "train"), role)
    result = train_clip(train, clip_cfg, out_dir, seed=clip_cfg.seed + spec.seed_offset, tracker=tracker,
                        progress=progress, device=device,
                        meta={"role": role, "data": dataclasses.asdict(data_cfg), **(meta or {})})
    record_heldout_retrieval(out_dir, data_cfg, tracker, device)
    return result


def record_heldout_retrieval(clip_dir: str | Path, data_cfg: DataConfig, tracker: Tracker | None = None,
                             device: str = "auto") -> dict[str, float]:
    """Score the CLIP's held-out retrieval, store it in its diffablate_clip.json and send it to the tracker."""
    heldout = build_dataset(data_cfg, "heldout")
    clip = Clip(clip_dir, device=device)
    scores = retrieval_scores(clip.image_embeds(heldout.images), clip.text_embeds(heldout.captions), heldout.captions)
    meta = clip.meta | {"heldout_retrieval": scores}
    (Path(clip_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if tracker is not None:
        tracker.log_metrics({f"clip_{k}": v for k, v in scores.items()}, step=int(meta.get("clip", {}).get("steps", 0)))
    return scores


def resolve_clip(cfg: RunConfig, role: str, *, progress: bool = True) -> Path:
    """The CLIP directory a run uses for `role`: the configured path (text.clip_path / eval.judge_path) or the cache."""
    _role(role)
    configured = {"encoder": cfg.text.clip_path, "judge": cfg.eval.judge_path}[role]
    if configured:
        if not (Path(configured) / "config.json").is_file():
            field = "text.clip_path" if role == "encoder" else "eval.judge_path"
            raise ConfigError(f"{field}: {configured!r} is not a Hugging Face CLIP directory (no config.json)")
        return Path(configured)
    return ensure_clip(cfg.data, role, progress=progress, device=cfg.device)


# --- the text encoder for the diffusion UNet ------------------------------------------------------


_ROW_CACHE_MAX = 200_000  # memoised captions per encoder (a few MB); cleared when full


class ClipTextEncoder(TextEncoder):
    """Frozen CLIP text tower as the UNet's text encoder (the contract's TextEncoder).

    - `tokens`: the tower's last hidden states after its final layer norm, [B, max_length, dim],
      dim = text hidden size (what Stable Diffusion feeds cross-attention).
    - `mask`: True on real tokens, BOS and EOS included; padding is False (and its token states are zero).
    - `pooled`: the projected EOS state (`text_embeds`, as SDXL's pooled embedding), not normalised,
      pooled_dim = the CLIP's projection_dim.
    `""` (the classifier-free-guidance null caption) encodes as BOS, EOS. Always pads to `max_length`, so
    shapes are fixed across batches; it stays in eval mode even when the parent module calls `.train()`.
    """

    def __init__(self, path: str | Path, max_length: int | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ClipError(f"{path}: not a Hugging Face CLIP directory (no config.json)")
        with quiet_hf():
            clip = CLIPModel.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.path = path
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        context = int(clip.config.text_config.max_position_embeddings)
        self.max_length = min(max_length or context, context)
        self.dim = int(clip.config.text_config.hidden_size)
        self.pooled_dim = int(clip.config.projection_dim)
        self.trainable = False
        self._warned = False
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # caption -> (ids, mask), see _token_rows
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, cfg: RunConfig, captions: list[str] | None = None) -> "ClipTextEncoder":
        """Build from `cfg.text` (clip_path, else the cached encoder CLIP for cfg.data).

        `captions` (the train split) is accepted for the TextEncoder ctor signature; the CLIP's vocabulary
        comes from its own training captions, so it is not used.
        """
        return cls(resolve_clip(cfg, "encoder"), max_length=cfg.text.max_length)

    def train(self, mode: bool = True) -> "ClipTextEncoder":
        # Frozen means frozen: no dropout etc. even when the trainer puts the whole denoiser in train mode.
        return super().train(False)

    def _token_rows(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # The HF tokenizer costs ~0.3 ms per caption here, more than a GPU training step's share; captions
        # repeat across steps (shapes has ~1,100 distinct ones), so each is tokenized once and memoised.
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        if missing:
            if not self._warned and (long := too_long(self.tokenizer, missing, self.max_length)):
                _warn_truncated(long, self.max_length)  # once per encoder, not at every step
                self._warned = True
            ids, mask = tokenize(self.tokenizer, missing, self.max_length, pad_to_context=True, warn=False)
            if len(self._rows) + len(missing) > _ROW_CACHE_MAX:
                self._rows.clear()
            self._rows.update(zip(missing, zip(ids, mask)))
        rows = [self._rows[c] for c in captions]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._token_rows(captions)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        with torch.no_grad():
            out = self.text_model(input_ids=ids, attention_mask=mask)
            pooled = self.text_projection(out.pooler_output)
        mask = mask.bool()
        # Zero the padding positions (TextEmbedding's convention), so no route can read pad states.
        tokens = out.last_hidden_state * mask.unsqueeze(-1)
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)
