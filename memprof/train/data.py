"""Training data as byte-level token streams that exist on every machine without a download.

- ``stdlib``: the source text of Python's own standard library (learnable, real text).
- ``synthetic``: a seeded first-order Markov chain whose entropy rate is known exactly, so a loss can be
  compared with the best possible one.
- ``file``: a local text file, or JSONL with a ``text`` field per line.
"""

from __future__ import annotations

import bisect
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from memprof.config.corpus import file_bytes
from memprof.config.spec import HELD_OUT_FRACTION, DataSpec

STDLIB_BYTES = 4 << 20
SYNTHETIC_TOKENS = 1 << 18
SYNTHETIC_VOCAB = 64


@dataclass(frozen=True)
class Corpus:
    """A token stream split into training and held-out parts.

    Attributes:
        train: 1-D uint8 token ids (byte-level; kept small so the corpus does not inflate measured memory).
        eval: 1-D uint8 token ids, never trained on.
        entropy_floor_nats: the best achievable mean cross-entropy per token, when known.
    """

    train: torch.Tensor
    eval: torch.Tensor
    entropy_floor_nats: float | None = None


def load_corpus(spec: DataSpec) -> Corpus:
    if spec.source == "synthetic":
        return markov_corpus(spec.seed)
    raw = stdlib_bytes() if spec.source == "stdlib" else file_bytes(Path(spec.path))
    return _split(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def stdlib_bytes(limit: int = STDLIB_BYTES) -> bytes:
    """The standard library's ``.py`` files in a fixed order, concatenated up to ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def markov_corpus(seed: int, vocab: int = SYNTHETIC_VOCAB, length: int = SYNTHETIC_TOKENS) -> Corpus:
    """Tokens from a seeded Markov chain with sparse, peaked transitions, and its exact entropy rate."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * 3.0
    transition = torch.softmax(logits, dim=1)
    stationary = _stationary(transition)
    row_entropy = -(transition * transition.clamp_min(1e-300).log()).sum(dim=1)
    floor = float((stationary * row_entropy).sum())
    cumulative = transition.cumsum(dim=1).tolist()
    state = int(torch.multinomial(stationary, 1, generator=gen))
    out = [0] * length
    for i, u in enumerate(torch.rand(length, generator=gen, dtype=torch.float64).tolist()):
        out[i] = state
        state = min(bisect.bisect_left(cumulative[state], u), vocab - 1)
    tokens = torch.tensor(out, dtype=torch.uint8)
    corpus = _split(tokens)
    return Corpus(corpus.train, corpus.eval, floor)


def _stationary(transition: torch.Tensor) -> torch.Tensor:
    dist = torch.full((transition.shape[0],), 1.0 / transition.shape[0], dtype=torch.float64)
    for _ in range(10_000):
        nxt = dist @ transition
        if torch.allclose(nxt, dist, atol=1e-14):
            break
        dist = nxt
    return dist / dist.sum()


def _split(tokens: torch.Tensor) -> Corpus:
    cut = int(len(tokens) * (1 - HELD_OUT_FRACTION))
    return Corpus(tokens[:cut], tokens[cut:])


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random windows of ``seq_len`` tokens, reproducible for a seed."""
    if len(tokens) <= seq_len:
        raise ValueError(f"corpus of {len(tokens)} tokens is too short for seq_len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
        yield tokens[starts[:, None] + offsets].long()



def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """``count`` fixed batches of windows spread evenly over the held-out tokens: the same for every seed."""
    if count == 0:
        return []
    if len(tokens) < seq_len:
        raise ValueError(f"held-out split of {len(tokens)} tokens is too short for seq_len {seq_len}")
    starts = torch.linspace(0, len(tokens) - seq_len, count * batch_size).long()
    windows = tokens[starts[:, None] + torch.arange(seq_len)].long()
    return list(windows.split(batch_size))
