"""Shared trunk: the frozen bottom layers run once per batch, not once per forward pass.

When every trainable tensor lives in the top K transformer blocks (`peft.layers=top:K`
for LoRA / LoRA-FA, or `last-n`), the bottom L - K blocks compute the same hidden states
for every perturbed copy of a ZO step: MeZO's 2q passes and P-RGE's 2q batched copies all
feed them the same rows through the same frozen weights. So a step runs those blocks once
over its b rows (under no_grad), keeps the hidden states (b x T x hidden, fp32), and each
loss evaluation runs only the top K blocks, the final norm and the head. P-RGE's batch
repetition moves from the input to the cut: the cached states are repeated 2q times. A
first-order step takes the same path, which changes nothing in its cost: it runs each block
once per row either way, and autograd records nothing below the lowest trainable tensor.

The split reuses the model's own forward for both halves, so the attention mask, the
position ids and the rotary embeddings are computed exactly as in a full pass:
  - the trunk: the decoder with its block list cut to blocks [0, cut) and the final norm
    replaced by the identity, returning the hidden states after block cut - 1;
  - the top: the decoder with its block list cut to [cut, L) and its token embedding
    replaced by a module that returns the cached states (repeated to the batch given).
Both swaps are undone when the block ends. This holds for decoders that hand the token
embeddings straight to block 0 (`SHARED_TRUNK_MODEL_TYPES`); others run full depth, and
asking one of them for a cut is an error.

Decoders with several kinds of block (Gemma 3's sliding-window and global attention, each
with its own rotary base; Qwen2/3 with a sliding window on some blocks) pick block i's mask
and rotary table by `config.layer_types[i]`, i counted in the block list they are given.
So the top also sees `layer_types` cut to [cut, L) (and the trunk [0, cut)); without that,
block cut would get block 0's kind. Gemma 3 scales its token embedding by sqrt(hidden)
inside the embedding module, which the replay replaces, so the cached states (already
scaled) go in unchanged.

Losses equal full-depth losses to fp32 rounding (a matmul over b rows against one over
2q*b rows may round differently), and the seeds, hence ZO traces, are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch

from edgetune import console
from edgetune.errors import ConfigError

# Decoders whose forward is embed -> blocks -> norm with nothing between the embedding and
# block 0 (no scaling, no extra inputs), read in their transformers source.
SHARED_TRUNK_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
# Why the others cannot be split this way (what is missing), for the refusal.
UNSHARED_REASONS = {
    "gpt2": "GPT-2 adds learned position embeddings (transformer.wpe) to the token "
    "embeddings before block 0, so cached states cannot stand in for the embedding",
    "opt": "OPT adds learned position embeddings (and may project) before block 0, so "
    "cached states cannot stand in for the embedding",
}


class _Replay(torch.nn.Module):
    """Stands in for the token embedding: returns the cached hidden states, repeated
    copy-major to the batch it is given (as `repeat_batch` repeats the rows)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows, length = self.hidden.shape[:2]
        if input_ids.shape[1] != length or input_ids.shape[0] % rows:
            raise ValueError(
                f"shared trunk: a batch of shape {tuple(input_ids.shape)} does not repeat the "
                f"{rows} x {length} rows the trunk ran"
            )
        return self.hidden.repeat(input_ids.shape[0] // rows, 1, 1)


@contextmanager
def _swapped(owner: Any, **attributes: Any) -> Iterator[None]:
    saved = {name: getattr(owner, name) for name in attributes}
    try:
        for name, value in attributes.items():
            setattr(owner, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


class Trunk:
    """Runs blocks [0, cut) of a decoder once per batch; `cut == 0` is full depth.

    Attributes:
        cut: how many bottom blocks run once per batch.
        layers: how many blocks the model has.
    """

    def __init__(self, decoder: torch.nn.Module | None, cut: int):
        self.decoder, self.cut = decoder, cut
        self.layers = len(decoder.layers) if decoder is not None else 0  # type: ignore[arg-type]

    @property
    def shared(self) -> bool:
        """Whether any block runs once per batch."""
        return self.cut > 0

    @torch.no_grad()
    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The hidden states after block cut - 1 for `batch` [b, T, hidden] (None at full
        depth)."""
        if not self.shared:
            return None
        decoder: Any = self.decoder
        bottom = torch.nn.ModuleList(list(decoder.layers)[: self.cut])
        with (
            _swapped(decoder, layers=bottom, norm=torch.nn.Identity()),
            self._layer_types(0, self.cut),
        ):
            out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state

    def top(self, hidden: torch.Tensor | None) -> Any:
        """A context in which the model runs only blocks [cut, L) on top of `hidden`;
        full depth when `hidden` is None."""
        if hidden is None:
            return nullcontext()
        decoder: Any = self.decoder
        top = torch.nn.ModuleList(list(decoder.layers)[self.cut :])
        stack = ExitStack()
        stack.enter_context(_swapped(decoder, layers=top, embed_tokens=_Replay(hidden)))
        stack.enter_context(self._layer_types(self.cut, self.layers))
        return stack

    def _layer_types(self, start: int, stop: int) -> Any:
        """A context in which the decoder's `config.layer_types` (where it has one) lists
        only blocks [start, stop), matching the block list it runs. No KV cache is made
        meanwhile: one sized from the cut list would lack the slots of the blocks' own
        indices (and training reads no cache)."""
        config = getattr(self.decoder, "config", None)
        kinds = getattr(config, "layer_types", None)
        if kinds is None:
            return nullcontext()
        return _swapped(config, layer_types=list(kinds)[start:stop], use_cache=False)


FULL_DEPTH = Trunk(None, 0)


def find_decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding the block list, token embedding and final norm, if any."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if (
            isinstance(layers, torch.nn.ModuleList)
            and hasattr(module, "embed_tokens")
            and hasattr(module, "norm")
        ):
            return module
    return None


def lowest_trainable(model: torch.nn.Module, decoder: torch.nn.Module) -> dict[str, int]:
    """Each trainable tensor's name -> the lowest block that needs it: its block index,
    0 for anything used below the blocks (token embedding, soft prompts), L for what is
    used above them (final norm, an untied head)."""
    count = len(decoder.layers)  # type: ignore[arg-type]
    depth: dict[int, int] = {}
    for i, block in enumerate(decoder.layers):  # type: ignore[arg-type]
        depth.update({id(p): i for p in block.parameters()})
    depth.update({id(p): count for p in decoder.norm.parameters()})  # type: ignore[union-attr]
    embedding = {id(p) for p in decoder.embed_tokens.parameters()}  # type: ignore[union-attr]
    head = {
        id(p)
        for name, module in model.named_modules()
        if name.endswith("lm_head")
        for p in module.parameters()
    } - embedding
    depth.update({i: count for i in head})
    return {name: depth.get(id(p), 0) for name, p in model.named_parameters() if p.requires_grad}


def _frozen_bottom(model: torch.nn.Module) -> bool:
    """Whether the first block of the model's block list (found by name: `layers`, or
    GPT-2's `h`) holds nothing trainable while a later one does."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            trains = [any(p.requires_grad for p in block.parameters()) for block in module]
            return bool(trains) and not trains[0] and any(trains)
    return False


def resolve_trunk(setting: str, model: torch.nn.Module, runtime: bool = False) -> Trunk:
    """The trunk a stepper shares, from `train.trunk`.

    Args:
        setting: "auto" (cut just below the lowest trainable block; full depth when that is
            block 0 or the model's decoder is not one the split holds for), "off", or a
            block count N (run blocks 0..N-1 once; an error when anything trainable lives
            there).
        model: the model with its adapter attached.
        runtime: the forward passes run in an exported graph, which always runs whole.

    Returns:
        The Trunk (FULL_DEPTH when nothing is shared).
    """
    if setting == "off":
        return FULL_DEPTH
    explicit = setting != "auto"
    if runtime:
        if explicit:
            raise ConfigError(
                f"train.trunk={setting}: a device runtime runs the whole exported graph, so "
                "it cannot share a trunk; use train.trunk=auto or off"
            )
        return FULL_DEPTH
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    decoder = find_decoder(model)
    if decoder is None or model_type not in SHARED_TRUNK_MODEL_TYPES:
        reason = UNSHARED_REASONS.get(
            str(model_type), "its decoder is not one the split is built for"
        )
        if explicit:
            raise ConfigError(
                f"train.trunk={setting}: a shared trunk is supported for "
                f"{', '.join(SHARED_TRUNK_MODEL_TYPES)} decoders, not model_type "
                f"{model_type!r} ({reason}); use train.trunk=auto or off"
            )
        if _frozen_bottom(model):
            console.warn(
                f"train.trunk=auto: the frozen bottom blocks of this {model_type!r} model run "
                f"in every forward pass, not once per batch ({reason})"
            )
        return FULL_DEPTH
    needs = lowest_trainable(model, decoder)
    count = len(decoder.layers)  # type: ignore[arg-type]
    if not explicit:
        return Trunk(decoder, min(min(needs.values()), count - 1))
    cut = int(setting)
    if not 0 < cut < count:
        raise ConfigError(
            f"train.trunk={cut}: the model has {count} blocks; give a count in 1..{count - 1}"
        )
    below = [name for name, depth in needs.items() if depth < cut]
    if below:
        lowest = min(needs.values())
        raise ConfigError(
            f"train.trunk={cut} runs blocks 0..{cut - 1} once per batch without gradients, but "
            f"{len(below)} trainable tensors live there: {', '.join(below[:3])}"
            f"{' ...' if len(below) > 3 else ''}; train only the top {count - cut} blocks "
            f"(peft.layers=top:{count - cut}, or last-n with peft.last_layers<={count - cut}), "
            f"or use train.trunk={lowest if lowest > 0 else 'off'} / auto"
        )
    return Trunk(decoder, cut)
