"""Toy task: a predictor learns to put boundaries where a synthetic signal changes.

Frames carry a piecewise-constant "content" part (one random vector per segment of 3-7 frames, plus
a little noise) next to pure-noise channels. A 3-tap convolution stands in for the encoder layers
below the predictor (a per-frame MLP cannot see a change without context). The task: each pooled
segment must reproduce the content of its own last frame. A segment that straddles a change cannot,
and the straight-through cumulative-sum gradient of ``downsample`` pushes a boundary up exactly at
the change (the frames after it are the ones the pooled vector should lean toward). The binomial count
loss with per-utterance target counts (what phoneme counts give on real speech) keeps the predictor
from the trivial solution of a boundary on every frame, which the task alone reaches.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from magnet_asr.compression import BoundaryPredictor, BoundaryPredictorConfig
from magnet_asr.compression.pooling import last_real_frame

DIM, CONTENT = 16, 8


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # Tiny ops: threads only add OpenMP barrier waits, badly so on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(gen: torch.Generator, batch: int = 16, length: int = 48):
    seglen = torch.randint(3, 8, (batch, length // 3 + 1), generator=gen)
    ends = seglen.cumsum(1) - 1
    boundaries = torch.zeros(batch, 9 * length).scatter_(1, ends, 1.0)[:, :length]
    segment = (boundaries.cumsum(1) - boundaries).long()
    values = torch.randn(batch, length, CONTENT, generator=gen)
    content = torch.gather(values, 1, segment.unsqueeze(-1).expand(batch, length, CONTENT))
    lengths = torch.randint(length - 12, length + 1, (batch,), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    boundaries = torch.maximum(boundaries * mask, last_real_frame(mask).float())
    noisy = content + 0.1 * torch.randn(batch, length, CONTENT, generator=gen)
    frames = torch.cat([noisy, torch.randn(batch, length, DIM - CONTENT, generator=gen)], dim=-1)
    return frames, content, boundaries, mask


def boundary_f1(predicted: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    free = mask & ~last_real_frame(mask)  # the forced final boundary would be free credit
    p, t = (predicted > 0.5) & free, (true > 0.5) & free
    tp = int((p & t).sum())
    return 2 * tp / max(int(p.sum()) + int(t.sum()), 1)


def train(use_count_loss: bool, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    config = BoundaryPredictorConfig(
        hidden_size=DIM, prior=0.2, loss=("binomial",) if use_count_loss else (), loss_weight=3.0
    )
    predictor = BoundaryPredictor(config)
    encoder = nn.Conv1d(DIM, DIM, kernel_size=3, padding=1)
    optimizer = torch.optim.Adam([*predictor.parameters(), *encoder.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def encode(frames: torch.Tensor) -> torch.Tensor:
        return encoder(frames.transpose(1, 2)).transpose(1, 2)

    for _ in range(steps):
        predictor.train()
        frames, content, boundaries, mask = make_batch(gen)
        out = predictor(encode(frames), mask, target_counts=boundaries.sum(1))
        hard = out.boundaries.detach() > 0.5
        rows, cols = hard.nonzero(as_tuple=True)
        rank = hard.long().cumsum(1) - 1  # segment index of each boundary
        target = torch.zeros_like(out.pooled[..., :CONTENT])
        target[rows, rank[rows, cols]] = content[rows, cols]
        error = ((out.pooled[..., :CONTENT] - target) ** 2).sum(-1)
        task = (error * out.pooled_mask).sum() / out.pooled_mask.sum()
        optimizer.zero_grad()
        (task + out.loss).backward()
        optimizer.step()

    predictor.eval()
    frames, _, boundaries, mask = make_batch(torch.Generator().manual_seed(2), batch=64)
    with torch.no_grad():
        out = predictor(encode(frames), mask)
    rate = float(out.num_boundaries.sum() / mask.sum())
    return boundary_f1(out.boundaries, boundaries, mask), rate, float(boundaries.sum() / mask.sum())


def test_learns_boundaries_at_signal_changes() -> None:
    f1, rate, true_rate = train(use_count_loss=True, steps=400)
    assert f1 >= 0.9, f"boundary F1 {f1:.3f}"
    assert abs(rate - true_rate) < 0.03


def test_task_alone_collapses_to_a_boundary_on_every_frame() -> None:
    # The known failure the count losses exist for (docs/architecture.md): one segment per frame is a perfect
    # solution of this task, and with no count loss the predictor finds it.
    f1, rate, _ = train(use_count_loss=False, steps=200)
    assert rate > 0.8 and f1 < 0.5
