"""The adapter an on-device run trains: plain tensors, saved in PEFT's format.

The tensors are torch CPU tensors used as arrays (no module, no autograd): the ZO
estimators and optimizers perturb and update them in place exactly as they do a PEFT
model's parameters, in the same order (slot order, A before B), so the same seeds draw
the same directions on both sides. `save` writes `adapter_config.json` +
`adapter_model.safetensors` that `PeftModel.from_pretrained(base, folder)` loads.

A run that does not start from an exported adapter initialises LoRA as PEFT does, from
its own seed: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0,
drawn from `generator(stream_seed(seed, Stream.INIT))`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import ConfigError
from edgetune.export.graph import LoraSlot
from edgetune.ondevice.runtime import RuntimeLM
from edgetune.peft.card import ModelCard
from edgetune.zo.seeds import Stream, generator, stream_seed

LORA_METHODS = ("lora", "lora-fa")


def _saved_key(peft_name: str) -> str:
    """PEFT saves parameter `...lora_A.default.weight` as `...lora_A.weight`."""
    return peft_name.replace(".default.", ".")


def slot_names(slots: list[LoraSlot]) -> list[str]:
    """PEFT parameter names of every A and B, in slot order."""
    return [name for s in slots for name in (s.peft_a, s.peft_b)]


def init_lora(slots: list[LoraSlot], seed: int) -> dict[str, torch.Tensor]:
    """A fresh LoRA: A uniform in +-1/sqrt(in), B zero (see the module docstring)."""
    gen = generator(stream_seed(seed, Stream.INIT))
    tensors = {}
    for s in slots:
        bound = 1.0 / math.sqrt(s.in_features)
        a = torch.rand(s.rank, s.in_features, generator=gen) * (2 * bound) - bound
        tensors[s.peft_a] = a
        tensors[s.peft_b] = torch.zeros(s.out_features, s.rank)
    return tensors


def load_lora(folder: Path, slots: list[LoraSlot]) -> dict[str, torch.Tensor]:
    """A PEFT LoRA folder's tensors, checked against the slots' shapes.

    Raises:
        ConfigError: a tensor is missing or has another shape (an adapter of another
            base or rank than the graph was exported for).
    """
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no {path.name})")
    saved = load_file(path)
    tensors = {}
    for s in slots:
        for name, shape in (
            (s.peft_a, (s.rank, s.in_features)),
            (s.peft_b, (s.out_features, s.rank)),
        ):
            value = saved.get(_saved_key(name))
            if value is None or tuple(value.shape) != shape:
                found = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise ConfigError(
                    f"adapter {folder} does not fit the exported graph: {_saved_key(name)} is "
                    f"{found}, the graph takes {shape}; export the graph from this adapter "
                    "(edgetune export --adapter DIR) or start without one"
                )
            tensors[name] = value.float().contiguous()
    return tensors


@dataclass
class RuntimeAdapter:
    """The `Adapter` interface the training loop uses, over plain tensors.

    Attributes:
        model: the runtime, reading `tensors` at every call.
        method: lora or lora-fa (A frozen).
        names: PEFT names of the trainable tensors, in direction order.
        tensors: every A and B by PEFT name, in slot order.
        peft_config: adapter_config.json to save with the tensors.
    """

    model: RuntimeLM
    method: str
    names: list[str]
    tensors: dict[str, torch.Tensor]
    peft_config: dict

    def trainable(self) -> list[torch.Tensor]:
        """The trainable tensors, in the order of `names`."""
        return [self.tensors[n] for n in self.names]

    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(t.numel() for t in self.trainable())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every A and B, cloned."""
        return {n: t.clone() for n, t in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors from `state` in place (the runtime sees them at once)."""
        for name, value in state.items():
            self.tensors[name].copy_(value)

    def save(
        self,
        out: Path,
        base_model: str | None = None,
        card: ModelCard | None = None,
        name: str = "adapter",
    ) -> Path:
        """Write `out/name` in PEFT's format; returns the folder."""
        from safetensors.torch import save_file

        target = Path(out) / name
        target.mkdir(parents=True, exist_ok=True)
        config = dict(self.peft_config)
        if base_model is not None:
            config["base_model_name_or_path"] = base_model
        (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(
            {_saved_key(n): t.contiguous() for n, t in self.tensors.items()},
            str(target / "adapter_model.safetensors"),
        )
        if card is not None:
            card.write(target)
        return target


def build_adapter(
    model: RuntimeLM, method: str, tensors: dict[str, torch.Tensor], peft_config: dict
) -> RuntimeAdapter:
    """A RuntimeAdapter over `tensors` whose trainable part `method` selects.

    Raises:
        ConfigError: a method other than lora / lora-fa.
    """
    if method not in LORA_METHODS:
        raise ConfigError(
            f"peft.method={method!r}: an exported graph takes LoRA tensors as inputs, so "
            f"on-device training trains {' or '.join(LORA_METHODS)}"
        )
    names = [n for n in tensors if method == "lora" or ".lora_B." in n]
    return RuntimeAdapter(model, method, names, tensors, peft_config)
