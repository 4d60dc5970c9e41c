"""Task-aware vocabulary pruning: keep the token rows a task uses, map ids at the edge.

A model deployed for one task reads and writes a small part of its vocabulary (Gemma 3
270M: 168M of its 268M parameters are the 262,144 x 640 embedding; SmolLM2-135M: 28M of
135M, and its head is about a fifth of prefill time). `select_vocab` picks the kept
original ids: every token of the task's training prompts (or the `size` most frequent),
the tokenizer's special tokens, the classification verbalizer's label tokens and the id
that out-of-vocabulary input becomes. `shrink` slices the input embedding and the output
head to those rows in place (a tied head keeps sharing the one sliced matrix), so the
saved folder is a plain Hugging Face model of `K` tokens in the *kept* id space. For a
classifier the head can keep the label tokens alone (`head_ids`): the embedding still
reads every kept token, the head scores only the labels (untied, L rows), so the head's
share of prefill goes; such a model classifies but cannot generate text.

The user's tokenizer keeps working because the ids are mapped at the model's edge
(`attach_map`): the input embedding looks each original id up in a remap table, and the
head's `K` logits are scattered back into a tensor of the original vocabulary size. So
everything downstream (tasks, losses, adapters, generation, `edgetune eval`) sees the
original ids, and the logits of every kept token equal the unpruned model's.

Out-of-vocabulary handling (documented contract, tested):
- an input id that was pruned is read as `oov_id`: the tokenizer's unk token when it has
  one, else its eos token (always kept); or, with `nearest` (`compress vocab_oov=nearest`),
  as the kept token whose input embedding row is closest by cosine, so an unseen word
  keeps some of its meaning instead of becoming unk;
- a pruned token's output logit is the lowest finite float, so it is never predicted and
  its probability is 0 (a loss whose target is a pruned token is not finite: build the
  vocabulary from data that covers what the model must write, or raise `size`);
- an id outside the original vocabulary is an IndexError, as in the unpruned model.

On disk (`save_pruned`): DIR/config.json has `vocab_size=K` and an `edgetune_vocab`
entry naming DIR/vocab_map.json, which holds the kept original ids in new-id order, the
original vocabulary size, `oov_id` and the label head's ids (or null). `edgetune.models.load`
reads the folder back with the map attached; stock transformers loads it in the kept id
space (a label head excepted: its head has L rows, not K).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.errors import ConfigError, EdgetuneError

VOCAB_MAP = "vocab_map.json"
CONFIG_KEY = "edgetune_vocab"


@dataclass(frozen=True)
class VocabMap:
    """The kept original ids (new id i = `kept[i]`, ascending), the OOV rule and, for a
    classifier head, the original ids the head alone scores."""

    kept: list[int]
    original_size: int
    oov_id: int  # the original id a pruned input id is read as
    head: list[int] | None = None  # None: the head scores every kept id
    nearest: list[int] | None = None  # original id -> new id of its nearest kept token

    def __post_init__(self) -> None:
        if self.nearest is not None and len(self.nearest) != self.original_size:
            raise EdgetuneError(
                f"the nearest-token map has {len(self.nearest)} entries for a vocabulary of "
                f"{self.original_size}; it is damaged: compress again"
            )

    @property
    def head_ids(self) -> list[int]:
        """The original ids of the head's rows, in row order."""
        return self.kept if self.head is None else self.head

    def remap_table(self) -> torch.Tensor:
        """[original_size] long: original id -> new id (pruned ids -> new id of `oov_id`,
        or of their nearest kept token)."""
        if self.nearest is not None:
            return torch.tensor(self.nearest, dtype=torch.long)
        table = torch.full((self.original_size,), self.new_id(self.oov_id), dtype=torch.long)
        table[torch.tensor(self.kept, dtype=torch.long)] = torch.arange(len(self.kept))
        return table

    def new_id(self, original: int) -> int:
        """The kept id of `original` (ValueError when it was pruned)."""
        return self.kept.index(original)

    def write(self, folder: Path) -> None:
        (folder / VOCAB_MAP).write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> VocabMap:
        """The map of a vocabulary-pruned folder.

        Raises:
            EdgetuneError: the file is missing or damaged (named, with the fix).
        """
        path = folder / VOCAB_MAP
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            head, nearest = data.get("head"), data.get("nearest")
            vmap = cls(
                list(data["kept"]),
                int(data["original_size"]),
                int(data["oov_id"]),
                None if head is None else list(head),
                None if nearest is None else list(nearest),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EdgetuneError(
                f"{path} cannot be read ({exc}); the vocabulary-pruned model needs it to map "
                "token ids: copy the whole model folder again, or compress again"
            ) from None
        if vmap.oov_id not in vmap.kept or vmap.kept != sorted(set(vmap.kept)):
            raise EdgetuneError(f"{path} is damaged (kept ids unsorted or oov_id not kept)")
        if not set(vmap.head_ids) <= set(vmap.kept):
            raise EdgetuneError(f"{path} is damaged (its head scores ids it does not keep)")
        return vmap


def oov_token_id(tokenizer: Any) -> int:
    """The original id pruned input ids are read as: unk, else eos.

    Raises:
        ConfigError: the tokenizer has neither.
    """
    for token_id in (tokenizer.unk_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    raise ConfigError(
        "vocabulary pruning needs an unk or eos token to read pruned input ids as, and this "
        "tokenizer has neither; use a tokenizer that defines one"
    )


def token_counts(batches: Iterable[dict[str, torch.Tensor]]) -> Counter[int]:
    """How often each token id occurs in the batches' attended `input_ids`."""
    counts: Counter[int] = Counter()
    for batch in batches:
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        counts.update(ids.tolist())
    return counts


def select_vocab(
    counts: Counter[int], required: Iterable[int], size: int | None, original_size: int
) -> list[int]:
    """The kept original ids, ascending: `required` plus the used ids (all of them, or the
    most frequent so that `size` ids are kept in all).

    Raises:
        ConfigError: `size` is below the number of required ids.
    """
    required = {i for i in required if 0 <= i < original_size}
    if size is not None and size < len(required):
        raise ConfigError(
            f"vocab={size} is below the {len(required)} tokens every pruned model keeps "
            "(special tokens, label tokens, the unknown-token id); raise it"
        )
    used = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    used = [i for i in used if i not in required and 0 <= i < original_size]
    if size is not None:
        used = used[: size - len(required)]
    return sorted(required | set(used))


def nearest_kept(embedding: torch.Tensor, kept: Sequence[int], chunk: int = 8192) -> list[int]:
    """For every original id, the new id of the kept token whose input embedding row is
    closest by cosine (a kept token maps to itself). [V, H] x [H, K] in chunks of rows."""
    weight = embedding.detach().float()
    index = torch.tensor(list(kept), dtype=torch.long)
    keys = torch.nn.functional.normalize(weight[index], dim=1)
    nearest = torch.empty(weight.shape[0], dtype=torch.long)
    for start in range(0, weight.shape[0], chunk):
        rows = torch.nn.functional.normalize(weight[start : start + chunk], dim=1)
        nearest[start : start + chunk] = (rows @ keys.T).argmax(dim=1)
    nearest[index] = torch.arange(len(kept))
    return nearest.tolist()


def shrink(model: Any, kept: Sequence[int], head_ids: Sequence[int] | None = None) -> None:
    """Slice the input embedding and the output head of `model` to the `kept` rows, in
    place; a tied head keeps sharing the sliced embedding. With `head_ids` (a classifier's
    label tokens) the head gets only those rows, untied. Sets config.vocab_size = K.
    """
    index = torch.tensor(list(kept), dtype=torch.long)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head_ids is not None:
        rows = torch.tensor(list(head_ids), dtype=torch.long)
        labels = nn.Linear(head.in_features, len(rows), bias=head.bias is not None)
        labels.weight = nn.Parameter(head.weight.detach()[rows].clone())
        if head.bias is not None:
            labels.bias = nn.Parameter(head.bias.detach()[rows].clone())
        model.set_output_embeddings(labels)
        model.config.tie_word_embeddings = False
        head = None
    tied = head is not None and head.weight is embedding.weight
    embedding.weight = nn.Parameter(embedding.weight.detach()[index].clone())
    embedding.num_embeddings = len(kept)
    pad = embedding.padding_idx
    embedding.padding_idx = int((index == pad).nonzero()[0, 0]) if pad in kept else None
    if head is not None:
        if tied:
            head.weight = embedding.weight
        else:
            head.weight = nn.Parameter(head.weight.detach()[index].clone())
        if head.bias is not None:
            head.bias = nn.Parameter(head.bias.detach()[index].clone())
        head.out_features = len(kept)
    model.config.vocab_size = len(kept)


class MappedEmbedding(nn.Module):
    """The pruned input embedding read with original token ids (pruned ids -> oov)."""

    def __init__(self, inner: nn.Module, remap: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("remap", remap, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The kept rows (code that reads the embedding's dtype or width reads these)."""
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(self.remap[input_ids])


class MappedHead(nn.Module):
    """The pruned head whose K logits land at their original ids of a [..., V] tensor;
    every pruned id gets the lowest finite logit (probability 0)."""

    def __init__(self, inner: nn.Module, kept: torch.Tensor, original_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.original_size = original_size
        self.register_buffer("kept", kept, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = self.inner(hidden)
        full = small.new_full((*small.shape[:-1], self.original_size), torch.finfo(small.dtype).min)
        return full.index_copy_(-1, self.kept, small)  # in place: one V-wide tensor, not two


def attach_map(model: Any, vmap: VocabMap) -> Any:
    """Put the id map at `model`'s edge (in place; returns it): original ids in, logits
    over the original vocabulary out. config.vocab_size becomes the original size (the
    losses read it as the logits' width); `config.edgetune_vocab` stays as the marker.

    Raises:
        EdgetuneError: the model's embedding does not have `len(vmap.kept)` rows.
    """
    embedding = model.get_input_embeddings()
    if embedding.weight.shape[0] != len(vmap.kept):
        raise EdgetuneError(
            f"the model has {embedding.weight.shape[0]} token rows but its {VOCAB_MAP} keeps "
            f"{len(vmap.kept)}; the folder's weights and map come from different runs"
        )
    model.set_input_embeddings(MappedEmbedding(embedding, vmap.remap_table()))
    head = model.get_output_embeddings()
    if head is not None:
        rows = torch.tensor(vmap.head_ids, dtype=torch.long)
        model.set_output_embeddings(MappedHead(head, rows, vmap.original_size))
    model.config.vocab_size = vmap.original_size
    return model


@contextmanager
def unmapped(model: Any) -> Iterator[Any]:
    """`model` without its id map for the duration (its kept-id-space modules and
    vocab_size, as a folder stores them), the map put back after; a model without a map
    is left alone. Used to save a mapped model in another format (int8)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, MappedEmbedding):
        yield model
        return
    original = model.config.vocab_size
    model.set_input_embeddings(embedding.inner)
    if isinstance(head, MappedHead):
        model.set_output_embeddings(head.inner)
    model.config.vocab_size = embedding.inner.weight.shape[0]
    try:
        yield model
    finally:
        model.set_input_embeddings(embedding)
        if isinstance(head, MappedHead):
            model.set_output_embeddings(head)
        model.config.vocab_size = original


def is_vocab_pruned(model: Any) -> bool:
    """Whether `model` carries an id map (loaded from a vocabulary-pruned folder)."""
    return isinstance(model.get_input_embeddings(), MappedEmbedding)


def save_pruned(model: Any, tokenizer: Any, folder: Path, vmap: VocabMap) -> None:
    """Save the shrunk (not yet mapped) `model` with its map and the user's tokenizer."""
    entry = {"map": VOCAB_MAP, "original_vocab_size": vmap.original_size}
    model.config.update({CONFIG_KEY: {**entry, "head_rows": len(vmap.head_ids)}})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vmap.write(folder)


def load_pruned(folder: Path) -> Any:
    """A folder written by `save_pruned`, loaded in fp32 with its id map attached."""
    from transformers import AutoModelForCausalLM

    vmap = VocabMap.read(folder)
    if vmap.head is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = _load_label_head(folder, len(vmap.head))
    return attach_map(model, vmap)


def _load_label_head(folder: Path, rows: int) -> Any:
    """A folder whose head has `rows` label rows (config.json's vocab_size sizes the
    embedding only): the model is read with the head left out, then the head is built to
    its saved shape and filled from the file."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the skipped head is reported as a size mismatch
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, ignore_mismatched_sizes=True
        )
    finally:
        logging.set_verbosity(verbosity)
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(f"{name}.")})  # noqa: SIM118
    weight = tensors[f"{name}.weight"]
    head = nn.Linear(weight.shape[1], rows, bias=f"{name}.bias" in tensors)
    head.load_state_dict({k.removeprefix(f"{name}."): v for k, v in tensors.items()})
    model.set_output_embeddings(head)
    return model


def required_ids(tokenizer: Any, config: Any, label_ids: Sequence[int]) -> set[int]:
    """The ids every pruned model keeps: special tokens (the tokenizer's and the config's
    bos / eos / pad), the label tokens and `oov_token_id`."""
    ids = set(tokenizer.all_special_ids) | set(label_ids) | {oov_token_id(tokenizer)}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        ids |= (
            set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
        )
    return ids


def map_adapter(source: Path, target: Path, base_model: Path) -> Path:
    """Copy the PEFT adapter folder `source` to `target` for the vocabulary-pruned model in
    `base_model`: LoRA on the decoder's linear layers and soft prompts do not depend on the
    vocabulary, so the tensors are kept and only `base_model_name_or_path` changes.

    Raises:
        ConfigError: the adapter trains the embedding or the head (their rows change), or
            is not a PEFT adapter folder.
    """
    from safetensors import safe_open

    weights = source / "adapter_model.safetensors"
    config_path = source / "adapter_config.json"
    if not weights.is_file() or not config_path.is_file():
        raise ConfigError(
            f"{source} is not a PEFT adapter folder (adapter_config.json and "
            "adapter_model.safetensors); pass RUN/adapter of a finetune run"
        )
    with safe_open(weights, "pt") as f:
        vocab_keys = [k for k in f.keys() if "embed_tokens" in k or "lm_head" in k]  # noqa: SIM118
    if vocab_keys:
        raise ConfigError(
            f"adapter {source} trains {vocab_keys[0]}, whose rows vocabulary pruning removes; "
            "prune the vocabulary of the base model without --adapter and fine-tune on it"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base_model)
    target.mkdir(parents=True, exist_ok=True)
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (target / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    return target
