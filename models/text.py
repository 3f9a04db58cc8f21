"""Text encoders: captions -> token embeddings (for cross-attention) + a pooled vector (for the other routes).

Every encoder has the same interface (`TextEncoder.forward(captions) -> TextEmbedding`, split into a host
step `tokenize(captions) -> (ids, mask)` and a device step `encode(ids, mask)` so that the device step can be
captured in a CUDA graph with fixed-shape inputs) and is built by
name from `TEXT_ENCODERS` with `(cfg, captions)`, `captions` being the train split (the learned encoder
builds its vocabulary from them). "" is the null caption that classifier-free guidance trains and samples
with; every encoder must accept it.

- `learned`: a word-level tokenizer from the train captions, learned token + position embeddings and
  `text.layers` transformer layers, trained jointly with the UNet (this module).
- `clip`: a frozen CLIP text tower trained by the project itself (`diffablate.models.clip`, imported lazily).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor, nn

from diffablate.models.registry import Registry

if TYPE_CHECKING:
    from diffablate.models.config import RunConfig


@dataclass
class TextEmbedding:
    """An encoded batch of captions."""

    tokens: Tensor  # [B, L, dim] per-token states (padding positions are zero)
    mask: Tensor  # bool [B, L], True = a real token (incl. [BOS]/[EOS]), False = padding
    pooled: Tensor  # [B, pooled_dim] one vector per caption

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def index(self, idx: Tensor | slice) -> "TextEmbedding":
        """The rows `idx` (a slice or an index tensor)."""
        return TextEmbedding(self.tokens[idx], self.mask[idx], self.pooled[idx])

    @staticmethod
    def cat(parts: list["TextEmbedding"]) -> "TextEmbedding":
        """Concatenate along the batch (all parts must share L)."""
        return TextEmbedding(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                             torch.cat([p.pooled for p in parts]))


class TextEncoder(nn.Module):
    """captions -> TextEmbedding. Subclasses set the four attributes below in `__init__`."""

    dim: int  # width of TextEmbedding.tokens (the UNet's cross_attention_dim)
    pooled_dim: int  # width of TextEmbedding.pooled
    trainable: bool  # False = frozen (no grads, not in the optimizer)
    max_length: int  # tokens per caption including the special tokens; longer captions are truncated

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """Host step: (ids long [B, max_length], mask bool [B, max_length]) on the CPU."""
        raise NotImplementedError

    def encode(self, ids: Tensor, mask: Tensor) -> TextEmbedding:  # pragma: no cover - interface
        """Device step: ids / mask (already on the encoder's device) -> TextEmbedding. No host sync."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def device_tokens(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """`tokenize`, moved to the encoder's device: what `encode` takes."""
        ids, mask = self.tokenize(list(captions))
        device = self.device
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    def forward(self, captions: list[str]) -> TextEmbedding:
        return self.encode(*self.device_tokens(captions))


TEXT_ENCODERS: Registry[TextEncoder] = Registry("text encoder")


# --- the word-level tokenizer ---------------------------------------------------------------------

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIALS = (PAD, UNK, BOS, EOS)  # ids 0..3; PAD = 0 so zero-initialised id tensors are padding
_CACHE_SIZE = 1 << 16  # captions whose ids are memoised per tokenizer
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")  # words (with "'s"), each punctuation mark alone


def split_words(caption: str) -> list[str]:
    """Lower-case word split: "A red Circle, left of..." -> ["a", "red", "circle", ",", "left", "of", ...]."""
    return _WORD.findall(caption.lower())


class WordTokenizer:
    """Word-level vocabulary built from captions; unknown words map to [UNK] (never an error).

    `encode` gives [BOS] w1 .. wn [EOS] [PAD]...; a caption of more than `max_length - 2` words is
    truncated (a warning the first time, per tokenizer) and still ends in [EOS].
    """

    def __init__(self, vocab: Iterable[str], max_length: int) -> None:
        words = [w for w in vocab if w not in SPECIALS]
        self.itos: list[str] = list(SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("tokenizer vocabulary has duplicate words")
        self.max_length = max_length
        self._warned = False
        self._index: dict[str, int] = {}  # caption -> its row of self._table
        self._table = torch.zeros(0, max_length, dtype=torch.long)

    @classmethod
    def from_captions(cls, captions: Iterable[str], max_length: int) -> "WordTokenizer":
        """Vocabulary = the sorted set of words in `captions` (sorted: the same ids on every machine)."""
        return cls(sorted({w for c in captions for w in split_words(c)}), max_length)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """Token ids of one caption, unpadded: [BOS] words [EOS]."""
        words = split_words(caption)
        room = self.max_length - 2
        if len(words) > room:
            if not self._warned:
                warnings.warn(f"caption of {len(words)} words truncated to text.max_length={self.max_length} "
                              f"tokens ({room} words + [BOS]/[EOS]): {caption[:80]!r}", stacklevel=3)
                self._warned = True
            words = words[:room]
        unk = self.stoi[UNK]
        return [self.stoi[BOS], *(self.stoi.get(w, unk) for w in words), self.stoi[EOS]]

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(ids long [B, max_length], mask bool [B, max_length]) for a batch."""
        # Runs on every training step and a dataset's captions repeat: padded rows are memoised in one
        # table and a batch is a single index into it (bounded, in case captions are generated on the fly).
        idx, new_rows, one_off = [], [], []
        for c in captions:
            i = self._index.get(c)
            if i is None:
                row = self.encode(c)
                if len(self._index) < _CACHE_SIZE:
                    i = self._index[c] = len(self._table) + len(new_rows)
                    new_rows.append(row)
                else:  # cache full: a one-off row, marked by a negative index
                    one_off.append(row)
                    i = -len(one_off)
            idx.append(i)
        if new_rows:
            self._table = torch.cat([self._table, self._pad(new_rows)])
        if one_off:
            extra = self._pad(one_off)
            ids = torch.stack([self._table[i] if i >= 0 else extra[-i - 1] for i in idx])
        else:
            ids = self._table[torch.tensor(idx, dtype=torch.long)]
        return ids, ids != self.stoi[PAD]  # [PAD] appears only as padding

    def _pad(self, rows: list[list[int]]) -> Tensor:
        return torch.tensor([r + [0] * (self.max_length - len(r)) for r in rows],
                            dtype=torch.long).reshape(-1, self.max_length)

    def decode(self, ids: Iterable[int]) -> str:
        """Words of `ids`, special tokens dropped ([UNK] kept), joined by spaces."""
        return " ".join(self.itos[i] for i in ids if self.itos[i] not in (PAD, BOS, EOS))


# --- the learned encoder ---------------------------------------------------------------------------


def _num_heads(dim: int) -> int:
    # Heads of >= 16 channels: narrower heads cost time and gain nothing at these widths.
    for h in (8, 4, 2):
        if dim % h == 0 and dim // h >= 16:
            return h
    return 1


class LearnedTextEncoder(TextEncoder):
    """Word embeddings + learned positions + a small pre-norm transformer, trained with the UNet.

    pooled = masked mean of the final token states over the real tokens (incl. [BOS]/[EOS]). Not the
    [EOS] state: with `text.layers = 0` that state would only encode the caption's length.
    The vocabulary travels in the state dict (`get_extra_state`), so a checkpoint is self-contained.
    """

    def __init__(self, tokenizer: WordTokenizer, dim: int, layers: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.dim = self.pooled_dim = dim
        self.trainable = True
        self.max_length = tokenizer.max_length
        self.token_emb = nn.Embedding(len(tokenizer), dim, padding_idx=0)
        self.pos_emb = nn.Parameter(torch.randn(tokenizer.max_length, dim) * 0.02)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, _num_heads(dim), dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor=False: the fast path does not support norm_first and warns about it.
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_config(cls, cfg: "RunConfig", captions: list[str]) -> "LearnedTextEncoder":
        return cls(WordTokenizer.from_captions(captions, cfg.text.max_length), cfg.text.embed_dim, cfg.text.layers)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.tokenizer(captions)

    def encode(self, ids: Tensor, mask: Tensor) -> TextEmbedding:
        h = self.token_emb(ids) + self.pos_emb
        if self.transformer is not None:
            h = self.transformer(h, src_key_padding_mask=~mask)
        h = self.norm(h) * mask[..., None]  # zero the padding: nothing downstream can read it
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextEmbedding(tokens=h, mask=mask, pooled=pooled)

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocab": self.tokenizer.itos, "max_length": self.tokenizer.max_length}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["vocab"]) != self.token_emb.num_embeddings:
            raise ValueError(f"checkpoint vocabulary has {len(state['vocab'])} words, this encoder "
                             f"{self.token_emb.num_embeddings}: build it from the same train captions")
        self.tokenizer = WordTokenizer(state["vocab"], state["max_length"])


@TEXT_ENCODERS.register("learned")
def _learned(cfg: "RunConfig", captions: list[str]) -> TextEncoder:
    return LearnedTextEncoder.from_config(cfg, captions)


@TEXT_ENCODERS.register("clip")
def _clip(cfg: "RunConfig", captions: list[str]) -> TextEncoder:
    # Lazy: the CLIP module pulls in transformers and a trained checkpoint; nothing else should pay that.
    from diffablate.models import clip

    return clip.ClipTextEncoder.from_config(cfg, captions)


def build_text_encoder(cfg: "RunConfig", captions: list[str]) -> TextEncoder:
    """The configured `text.encoder`, built from the train captions."""
    return TEXT_ENCODERS.get(cfg.text.encoder)(cfg, captions)
