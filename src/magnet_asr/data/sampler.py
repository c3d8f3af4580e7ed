"""Dynamic batching by duration: batches of similar-length clips whose total audio stays under a budget.

Sorting within shuffled pools keeps padding small (padded frames are wasted encoder work) while
the batch order stays random. The order is a pure function of (seed, epoch), so a resumed run sees
the same data order; ``num_replicas``/``rank`` shard the batches for distributed training.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch


class DurationBatchSampler(torch.utils.data.Sampler[list[int]]):
    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_factor: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        self.durations = list(durations)
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool_factor = pool_factor
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.durations)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        pool = max(1, self.pool_factor * max(1, self.max_batch_size or 8))
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: self.durations[i])
            batches.extend(self._pack(chunk))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _pack(self, indices: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0.0
        for i in indices:
            longest_if_added = max(longest, self.durations[i])
            # padded cost: every clip in a batch is as long as its longest
            too_long = longest_if_added * (len(current) + 1) > self.max_batch_seconds
            too_many = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and (too_long or too_many):
                batches.append(current)
                current, longest_if_added = [], self.durations[i]
            current.append(i)
            longest = longest_if_added
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        per_rank = math.ceil(len(batches) / self.num_replicas)
        padded = batches + batches[: per_rank * self.num_replicas - len(batches)]
        return iter(padded[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(len(self._batches()) / self.num_replicas)
