"""Batching: training batches of similar-length examples, in random order, so little compute goes to padding.

transformers' `group_by_length` sorts each pool of 50 batches from longest to shortest and trains on them in
that order, so the model sees long sentences, then short ones, pool after pool; on SST-2 that cost accuracy.
Here each pool is sorted only to form the batches, and the batches of the whole epoch are then shuffled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

POOL_BATCHES = 50  # batches formed from one sorted pool of examples


class LengthBucketSampler(Sampler[int]):
    """Indices in batch order: random pools sorted by length, cut into batches, batches shuffled.

    The order is a function of the seed and the epoch (`set_epoch`), so a resumed run skips the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool = self.batch_size * POOL_BATCHES
        batches = []
        for start in range(0, len(order), pool):
            ranked = sorted(order[start : start + pool], key=self.lengths.__getitem__, reverse=True)
            batches += [ranked[i : i + self.batch_size] for i in range(0, len(ranked), self.batch_size)]
        # Only the last batch of the epoch may be short: the loader cuts the index stream every batch_size.
        full = [batch for batch in batches if len(batch) == self.batch_size]
        rest = [index for batch in batches if len(batch) < self.batch_size for index in batch]
        shuffled = torch.randperm(len(full), generator=generator).tolist()
        return [full[i] for i in shuffled] + ([rest] if rest else [])

    def __iter__(self) -> Iterator[int]:
        return (index for batch in self.batches() for index in batch)


def auto_budget(lengths: Sequence[int], batch_size: int, max_length: int) -> int:
    """`train.batch_tokens: auto`: the batch size times the training texts' mean length (at least max_length),
    so that an epoch takes about as many steps as batches of `batch_size` texts would."""
    mean = sum(lengths) / max(len(lengths), 1)
    return max(max_length, math.ceil(batch_size * mean))


class TokenBudgetBatches(Sampler[list[int]]):
    """Batches of at most `max_tokens` tokens each, padding included, instead of a fixed count of texts.

    The training set is sorted by length once (ties in a seeded random order) and cut into the longest runs that
    fit the budget: many short texts or a few long ones per step, so every step costs about the same and the
    longest batch no longer sets the peak memory. The batches stay the same every epoch and come in a new order
    each epoch (as fairseq's `max_tokens`), so an epoch always has the same number of steps and a resumed run
    skips the batches it already trained on. A text longer than the budget is a batch of its own.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(lengths), generator=generator).tolist()
        order.sort(key=lengths.__getitem__)  # stable: equal lengths keep their random order
        self.fixed: list[list[int]] = []
        batch: list[int] = []
        for index in order:
            if batch and (len(batch) + 1) * lengths[index] > max_tokens:  # sorted: the newest text is the longest
                self.fixed.append(batch)
                batch = []
            batch.append(index)
        if batch:
            self.fixed.append(batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.fixed)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return (self.fixed[i] for i in torch.randperm(len(self.fixed), generator=generator).tolist())
