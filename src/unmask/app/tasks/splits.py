"""Seeded, stratified splits: every prefix of a split holds each class's share to within one."""

from __future__ import annotations

import random
from collections import defaultdict

# Local files and hub sets without a split column: 80 / 10 / 10.
EVAL_FRACTION = 0.1


# Every split since version 0.1 (and every committed benchmark record) is drawn from this
# string: it is a data contract, not a module path. Moving the module changed it once, and with
# it every built-in task's train / validation / test split; tests/test_tasks.py pins the splits.
SPLIT_SEED_PREFIX = "unmask.tasks"


def seeded_rng(name: str, seed: int) -> random.Random:
    """The generator that fixes task `name`'s split (and data) for `seed`."""
    # A string seed is hashed with sha512 by `random`: stable across runs and PYTHONHASHSEED.
    return random.Random(f"{SPLIT_SEED_PREFIX}:{name}:{seed}")


def interleaved_order(labels: list[str] | None, rng: random.Random, count: int) -> list[int]:
    """A seeded permutation of range(count) in which every prefix is stratified by `labels`.

    Each class is shuffled and its members placed at evenly spaced positions (r + 0.5) / n_c;
    merging the classes by position gives every prefix each class's share to within one.
    """
    if labels is None:
        order = list(range(count))
        rng.shuffle(order)
        return order
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    keyed = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        keyed += [((r + 0.5) / len(members), rng.random(), i) for r, i in enumerate(members)]
    keyed.sort()
    return [i for _, _, i in keyed]


def cut(order: list[int], n_test: int, n_val: int) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) of `order`: test first, then validation, train the rest."""
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def eval_count(n: int) -> int:
    """Rows of a validation or test split carved out of `n` rows (EVAL_FRACTION, at least 1)."""
    return max(1, round(n * EVAL_FRACTION))


def pick(items: list, indices: list[int]) -> list:
    """`items` at `indices`, in that order."""
    return [items[i] for i in indices]
