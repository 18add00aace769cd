"""GLUE tasks as text-to-text Tasks for the hub recipe (llm.py): "mnli premise: … hypothesis: …" -> a label word.

GLUE's test labels are hidden, so our *test* split is a seeded sample of GLUE's validation split
(validation_matched for MNLI) and our *val* split is carved from GLUE train, disjoint from the training rows.
The data is read by a Loader; the default downloads with `datasets` (pip install datasets) on first use.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..llm.tasks import Example, Task

GLUE_DATASET = "nyu-mll/glue"
Loader = Callable[[str, str], Sequence[Mapping]]  # (GLUE task, GLUE split) -> rows with the task's fields + "label"


@dataclass(frozen=True)
class GlueSpec:
    """fields: input columns, in prompt order; labels: the label word of each GLUE label id; test_split: the GLUE
    split our test split is drawn from (its labels are public, unlike GLUE's test split)."""

    fields: tuple[str, ...]
    labels: tuple[str, ...]
    test_split: str = "validation"


GLUE = {
    "mnli": GlueSpec(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "validation_matched"),
    "cola": GlueSpec(("sentence",), ("unacceptable", "acceptable")),
    "sst2": GlueSpec(("sentence",), ("negative", "positive")),
    "rte": GlueSpec(("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "qnli": GlueSpec(("question", "sentence"), ("entailment", "not_entailment")),
    "mrpc": GlueSpec(("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qqp": GlueSpec(("question1", "question2"), ("not_duplicate", "duplicate")),
    "wnli": GlueSpec(("sentence1", "sentence2"), ("not_entailment", "entailment")),
}



def glue_loader(dataset: str = GLUE_DATASET) -> Loader:
    """The default Loader: datasets.load_dataset(dataset, task, split=split), downloaded on first use."""
    def load(name: str, split: str) -> Sequence[Mapping]:
        try:
            import datasets
        except ImportError as err:
            raise ModuleNotFoundError("reading GLUE needs the `datasets` package: pip install datasets "
                                      "(or pass your own loader to glue_task / run_hub)") from err
        return datasets.load_dataset(dataset, name, split=split)
    return load


def glue_text(name: str, row: Mapping) -> str:
    """T5-style input: "mnli premise: … hypothesis: …", "cola sentence: …"."""
    return " ".join([name] + [f"{field}: {row[field]}" for field in GLUE[name].fields])


def _examples(name: str, rows: Sequence[Mapping], indices) -> tuple[Example, ...]:
    labels = GLUE[name].labels
    out = []
    for i in indices:
        row = rows[int(i)]
        if 0 <= int(row["label"]) < len(labels):  # -1 marks a hidden label
            out.append(Example(glue_text(name, row), labels[int(row["label"])], int(row["label"])))
    return tuple(out)


def seeded_order(n: int, seed: int) -> list[int]:
    """range(n) in a seeded random order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def glue_task(name: str, loader: Loader | None = None, *, causal: bool = False, n_val: int = 200,
              max_train: int = 20000, n_test: int | None = None, seed: int = 42) -> Task:
    """GLUE task `name` as a "label_words" Task with seeded splits (see the module docstring).

    train: max_train rows of GLUE train; val: n_val other rows of GLUE train; test: n_test rows (None: all) of
    GLUE's validation split. causal=True appends "\\nAnswer:" to the prompt, for a decoder-only LM.
    """
    if name not in GLUE:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of {tuple(GLUE)}")
    loader = loader or glue_loader()
    train_rows, test_rows = loader(name, "train"), loader(name, GLUE[name].test_split)
    order = seeded_order(len(train_rows), seed)
    val, train = order[:n_val], order[n_val:n_val + max_train]
    test = seeded_order(len(test_rows), seed + 1)[:n_test]
    template = "{text}\nAnswer:" if causal else "{text}"
    return Task(name, "label_words", GLUE[name].labels, _examples(name, train_rows, train),
                _examples(name, train_rows, val), _examples(name, test_rows, test), prompt_template=template)
