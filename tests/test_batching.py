"""Length-bucketed batches: every example once per epoch, little padding, and no long-to-short drift; token budgets:
every batch within its budget, the same batches each epoch in a new order."""

from __future__ import annotations

import random

from scipy.stats import spearmanr

from peftune.batching import POOL_BATCHES, LengthBucketSampler, TokenBudgetBatches, auto_budget

BATCH = 8


def lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def chunks(order: list[int]) -> list[list[int]]:
    """The batches a DataLoader cuts from the sampler's index stream."""
    return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]


def padding_share(batches: list[list[int]], sizes: list[int]) -> float:
    padded = sum(max(sizes[i] for i in b) * len(b) for b in batches)
    return 1 - sum(sizes) / padded


def test_each_example_once_per_epoch_and_only_the_last_batch_short():
    sizes = lengths(1001)
    sampler = LengthBucketSampler(sizes, BATCH, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1001)) and len(sampler) == 1001
    assert [len(b) for b in chunks(order)][:-1] == [BATCH] * (1001 // BATCH) and len(chunks(order)[-1]) == 1


def test_batches_carry_far_less_padding_than_random_ones():
    sizes = lengths()
    bucketed = padding_share(chunks(list(LengthBucketSampler(sizes, BATCH, seed=0))), sizes)
    shuffled = list(range(len(sizes)))
    random.Random(0).shuffle(shuffled)
    plain = padding_share(chunks(shuffled), sizes)
    print(f"padding: bucketed {bucketed:.1%}, random {plain:.1%}")
    assert bucketed < 0.1 < 0.3 < plain


def test_batch_order_is_random_not_long_to_short():
    sizes = lengths(BATCH * POOL_BATCHES * 4)
    batches = chunks(list(LengthBucketSampler(sizes, BATCH, seed=1)))
    longest = [max(sizes[i] for i in b) for b in batches]
    for start in range(0, len(batches), POOL_BATCHES):  # transformers' group_by_length sorts each pool
        window = longest[start : start + POOL_BATCHES]
        assert abs(spearmanr(range(len(window)), window)[0]) < 0.5


def test_the_order_depends_on_seed_and_epoch_only():
    sizes = lengths()
    first = LengthBucketSampler(sizes, BATCH, seed=5)
    again = LengthBucketSampler(sizes, BATCH, seed=5)
    assert list(first) == list(again), "a resumed run sees the same batches"
    first.set_epoch(1)
    assert list(first) != list(again), "each epoch has its own order"
    assert list(LengthBucketSampler(sizes, BATCH, seed=6)) != list(again)


def test_token_budget_batches_fill_the_budget_and_no_more():
    sizes, budget = lengths(1001), 480
    sampler = TokenBudgetBatches(sizes, budget, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1001)) and len(batches) == len(sampler)
    cost = [len(b) * max(sizes[i] for i in b) for b in batches]
    assert max(cost) <= budget
    # Many short texts per batch, few long ones: the count of texts follows the budget, not a fixed size.
    counts = {max(sizes[i] for i in b): len(b) for b in batches}
    assert counts[min(counts)] >= budget // min(counts) - 1 and counts[max(counts)] == budget // max(counts)
    # Cut greedily from the sorted lengths: no batch could take the next text of the sort without overflowing,
    # so there are no more batches than the budget needs.
    assert len(batches) <= sum(sizes) / budget * 1.2 + 1
    assert padding_share(batches, sizes) < 0.05


def test_a_text_over_the_budget_is_a_batch_of_its_own():
    batches = list(TokenBudgetBatches([10, 50, 10, 10], 40, seed=0))
    assert sorted(map(sorted, batches)) == [[0, 2, 3], [1]]


def test_token_budget_batches_stay_and_their_order_changes_by_epoch():
    sizes = lengths()
    first, again = TokenBudgetBatches(sizes, 400, seed=5), TokenBudgetBatches(sizes, 400, seed=5)
    assert list(first) == list(again), "a resumed run sees the same batches in the same order"
    first.set_epoch(1)
    epoch_two = list(first)
    assert epoch_two != list(again), "each epoch has its own order"
    assert sorted(map(sorted, epoch_two)) == sorted(map(sorted, again)), "of the same batches"
    assert sorted(map(sorted, TokenBudgetBatches(sizes, 400, seed=6))) != sorted(map(sorted, again))
    longest = [max(sizes[i] for i in b) for b in epoch_two]
    assert abs(spearmanr(range(len(longest)), longest)[0]) < 0.3, "not short to long"


def test_an_auto_budget_keeps_about_the_steps_of_a_fixed_batch():
    sizes = lengths(1000)
    budget = auto_budget(sizes, BATCH, max_length=120)
    assert budget == max(120, -(-BATCH * sum(sizes) // len(sizes)))
    steps = len(TokenBudgetBatches(sizes, budget, seed=0))
    assert len(sizes) / BATCH <= steps <= 1.25 * len(sizes) / BATCH
    assert auto_budget([3] * 10, BATCH, max_length=64) == 64, "never below one text of max_length"
