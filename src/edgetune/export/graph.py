"""The graph edgetune exports: a causal LM whose LoRA tensors are inputs, not weights.

On-device training (P-RGE, Gao et al. 2024) needs nothing but an inference engine if the
adapter goes *into* the graph as data: the runtime is handed perturbed adapters and
returns losses' logits. So every adapted linear y = x W^T is exported as

    y[c] = x[c] W^T + s * (x[c] A_c^T) B_c^T

with W a frozen weight of the graph and A_c [r, in], B_c [out, r] graph inputs. The
leading axis c = 0..C-1 is the *copy* axis: every input carries it,

    input_ids, attention_mask   [C, b, T]   (int64)
    <module>.lora_A             [C, r, in]  (fp32)
    <module>.lora_B             [C, out, r] (fp32)
    logits                      [C, b, P, V] (P = 1 for `last`, T for `all`)

so one call evaluates C adapters on the same b rows: C = 1 for inference or a MeZO
forward, C = 2q for a P-RGE step. Inside, the copies are folded into the batch (C*b rows)
and the base projection x W^T is one ordinary matmul over all of them; only the rank-r
branch is a batched matmul per copy. The heavy W stays a static parameter, which is what
ExecuTorch's XNNPACK needs to delegate a linear.

Inputs are named after the PEFT module path, in PEFT's parameter order (A then B per
module, modules in model order), which is also the order ZO directions are drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from edgetune.compress.quantize import Int8Linear
from edgetune.errors import ConfigError

LOGITS_MODES = ("last", "all")


@dataclass(frozen=True)
class LoraSlot:
    """One adapted linear layer of the exported graph.

    Attributes:
        module: its path in the base model, e.g. "model.layers.0.self_attn.q_proj".
        in_features / out_features: the base linear's shape.
        rank: r.
        scaling: s = alpha / r (fixed in the graph).
    """

    module: str
    in_features: int
    out_features: int
    rank: int
    scaling: float

    @property
    def a_name(self) -> str:
        """The graph input holding this layer's A copies."""
        return f"{self.module}.lora_A"

    @property
    def b_name(self) -> str:
        """The graph input holding this layer's B copies."""
        return f"{self.module}.lora_B"

    @property
    def peft_a(self) -> str:
        """The PEFT parameter name of A (for a LoRA model built by `get_peft_model`)."""
        return f"base_model.model.{self.module}.lora_A.default.weight"

    @property
    def peft_b(self) -> str:
        """The PEFT parameter name of B."""
        return f"base_model.model.{self.module}.lora_B.default.weight"

    def to_dict(self) -> dict:
        """A JSON-ready dict (the export's metadata)."""
        return asdict(self)


def slots_for(
    model: torch.nn.Module, target_modules: Sequence[str], rank: int, alpha: float
) -> list[LoraSlot]:
    """The LoRA slots PEFT would create for these targets, in module order.

    Raises:
        ConfigError: a target names no linear layer of the model.
    """
    slots = []
    found: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules and _is_linear(module):
            found.add(leaf)
            slots.append(
                LoraSlot(name, module.in_features, module.out_features, rank, alpha / rank)
            )
    missing = [t for t in target_modules if t not in found]
    if missing:
        linears = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise ConfigError(
            f"LoRA target modules {missing} are not linear layers of this model; "
            f"its linear layers are {linears}"
        )
    return slots


def _is_linear(module: torch.nn.Module) -> bool:
    """A layer LoRA can adapt: a linear, fp32 or edgetune's weight-only int8."""
    return isinstance(module, torch.nn.Linear | Int8Linear)


class InputLoRALinear(torch.nn.Module):
    """A frozen linear plus a rank-r branch whose A and B copies are set per call."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot):
        super().__init__()
        self.base, self.slot = base, slot
        self.lora: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora is None:
            raise RuntimeError("InputLoRALinear called outside AdapterInputLM.forward")
        a, b = self.lora  # [C, r, in], [C, out, r]
        # Split only the leading axis into copies (a view whatever the strides: o_proj's
        # input is a transposed one, which ExecuTorch cannot reshape across axes).
        xs = x.unflatten(0, (a.shape[0], -1))  # [C, b, T, in]
        branch = (xs @ a.transpose(1, 2).unsqueeze(1)) @ b.transpose(1, 2).unsqueeze(1)
        return y + self.slot.scaling * branch.reshape(y.shape)


class AdapterInputLM(torch.nn.Module):
    """`forward(input_ids, attention_mask, *adapter)` -> logits [C, b, P, V]; see the module
    docstring. `adapter` holds A and B of every slot, in `input_names` order."""

    def __init__(self, model: torch.nn.Module, slots: Sequence[LoraSlot], logits: str = "all"):
        super().__init__()
        if logits not in LOGITS_MODES:
            raise ConfigError(f"logits={logits!r}: expected one of {', '.join(LOGITS_MODES)}")
        self.model, self.slots, self.logits = model, list(slots), logits
        self.layers: list[InputLoRALinear] = []
        for slot in self.slots:
            parent_name, _, leaf = slot.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapped = InputLoRALinear(getattr(parent, leaf), slot)
            setattr(parent, leaf, wrapped)
            self.layers.append(wrapped)

    def input_names(self) -> list[str]:
        """Graph input names: input_ids, attention_mask, then A and B of every slot."""
        names = ["input_ids", "attention_mask"]
        for slot in self.slots:
            names += [slot.a_name, slot.b_name]
        return names

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *adapter: torch.Tensor
    ) -> torch.Tensor:
        copies, rows, length = input_ids.shape
        for i, layer in enumerate(self.layers):
            layer.lora = (adapter[2 * i], adapter[2 * i + 1])
        try:
            out = self.model(
                input_ids=input_ids.reshape(copies * rows, length),
                attention_mask=attention_mask.reshape(copies * rows, length),
                logits_to_keep=1 if self.logits == "last" else 0,
            )
        finally:
            for layer in self.layers:
                layer.lora = None
        logits = out.logits
        return logits.reshape(copies, rows, logits.shape[1], logits.shape[2])


def example_adapter(
    slots: Sequence[LoraSlot], copies: int = 1, seed: int = 0
) -> list[torch.Tensor]:
    """Random A and B copies for every slot at the scale of a trained LoRA (A as PEFT
    initialises it, ~1/sqrt(in); B ~ 0.01), for export tracing and parity checks: far
    larger adapters push activations out of range and measure that, not the export."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for slot in slots:
        a = torch.randn(copies, slot.rank, slot.in_features, generator=gen)
        tensors.append(a / slot.in_features**0.5)
        tensors.append(torch.randn(copies, slot.out_features, slot.rank, generator=gen) * 0.01)
    return tensors


def slots_from_peft(model: torch.nn.Module) -> tuple[list[LoraSlot], list[torch.Tensor]]:
    """The slots of a loaded PEFT LoRA model and its A/B tensors (each [1, ...], copy axis
    first), read from the LoRA layers themselves so rank, alpha and rsLoRA scaling are
    exactly PEFT's.

    Raises:
        ConfigError: the model has no LoRA layer (a prompt-tuning adapter, say).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    prefix = "base_model.model."
    slots, tensors = [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        a = module.lora_A["default"].weight.detach()
        b = module.lora_B["default"].weight.detach()
        slot = LoraSlot(
            name.removeprefix(prefix),
            a.shape[1],
            b.shape[0],
            a.shape[0],
            float(module.scaling["default"]),
        )
        slots.append(slot)
        tensors += [a.unsqueeze(0).clone(), b.unsqueeze(0).clone()]
    if not slots:
        raise ConfigError(
            "the adapter has no LoRA layers; only LoRA / LoRA-FA adapters can be exported "
            "as graph inputs or merged"
        )
    return slots, tensors


class PlainLM(torch.nn.Module):
    """A causal LM as `forward(input_ids [b, T], attention_mask [b, T])` -> logits
    [b, P, V]: the graph of a base or merged model, with no adapter inputs."""

    def __init__(self, model: torch.nn.Module, logits: str = "all"):
        super().__init__()
        if logits not in LOGITS_MODES:
            raise ConfigError(f"logits={logits!r}: expected one of {', '.join(LOGITS_MODES)}")
        self.model, self.logits = model, logits

    def input_names(self) -> list[str]:
        """Graph input names."""
        return ["input_ids", "attention_mask"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=1 if self.logits == "last" else 0,
        )
        return out.logits
