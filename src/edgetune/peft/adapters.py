"""Attach a PEFT method to a model and expose what trains.

LoRA and prompt tuning are built with Hugging Face PEFT, so the saved adapter is the
standard `adapter_config.json` + `adapter_model.safetensors` that
`PeftModel.from_pretrained` loads. LoRA-FA is LoRA with A frozen after its random init.
Selective methods (bitfit, last-n) and full fine-tuning mark existing parameters
trainable and save the whole model.

The `Adapter` is the one interface the training code uses: an ordered list of trainable
tensors (the ZO directions are drawn in this order, so it must be deterministic) and a
state dict that restores everything the method created, frozen parts included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.compress.int8_dynamic import is_dynamic_int8
from edgetune.compress.quantize import Int8Linear, int8_as_linear
from edgetune.errors import ConfigError
from edgetune.peft.card import ModelCard
from edgetune.peft.config import LORA_INITS, PeftConfig
from edgetune.peft.targets import adaptable_names, default_targets, is_conv1d

PEFT_FORMAT_METHODS = ("lora", "lora-fa", "prompt")
INT8_BASE_METHODS = PEFT_FORMAT_METHODS  # the others would train base weights int8 freezes


@dataclass
class Adapter:
    """A model with a PEFT method attached.

    Attributes:
        model: the (possibly PEFT-wrapped) model to call.
        method: the PEFT method name.
        names: names of the trainable tensors, in a fixed order.
    """

    model: torch.nn.Module
    method: str
    names: list[str]

    def trainable(self) -> list[torch.nn.Parameter]:
        """The trainable tensors, in the order of `names`."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.trainable())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything this method created or changes (LoRA A and B, prompts, selected
        weights), cloned, so a fresh `attach` + `load_state_dict` restores the model."""
        if self.method in ("lora", "lora-fa"):
            return {
                n: p.detach().clone()
                for n, p in self.model.named_parameters()
                if ".lora_A." in n or ".lora_B." in n
            }
        return {n: p.detach().clone() for n, p in zip(self.names, self.trainable(), strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors from `state` into the model, in place."""
        params = dict(self.model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ConfigError(
                f"adapter state does not match this model/method (unknown tensors: "
                f"{missing[:3]}...); resume with the same --model and --peft settings"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def save(self, out: Path, base_model: str | None = None, card: ModelCard | None = None) -> Path:
        """Save in the standard format: PEFT adapter folder, or the full model.

        Args:
            out: the run directory.
            base_model: recorded as the adapter's `base_model_name_or_path` (a hub id for
                a built-in made from one; see `models.base_model_id`); None keeps the
                path the model was loaded from.
            card: written as the folder's README.md instead of PEFT's blank template.

        Returns:
            The folder written (`out/adapter` for PEFT methods, `out/model` otherwise).
        """
        if self.method in PEFT_FORMAT_METHODS:
            target = out / "adapter"
            if base_model is not None:
                for config in self.model.peft_config.values():  # type: ignore[union-attr]
                    config.base_model_name_or_path = base_model
            # The vocabulary never changes here; "auto" would ask the Hub for the base
            # model's config (a network lookup, or a warning when offline).
            self.model.save_pretrained(target, save_embedding_layers=False)  # type: ignore[operator]
        else:
            target = out / "model"
            self.model.save_pretrained(target)  # type: ignore[operator]
        if card is not None:
            card.write(target)
        return target


def attach(model: torch.nn.Module, cfg: PeftConfig, seed: int) -> Adapter:
    """Attach the PEFT method in `cfg` to `model` (modified in place or wrapped).

    Args:
        model: a Hugging Face causal LM.
        cfg: the PEFT config.
        seed: seeds the adapter's random initialisation (LoRA A, soft prompt).

    Returns:
        The Adapter; everything outside it is frozen.
    """
    # PEFT draws its initial weights from the global RNG; fork it so the adapter is a
    # function of the run seed only and the caller's RNG stream is untouched.
    if is_dynamic_int8(model):
        raise ConfigError(
            "this model's linear layers are dynamic int8 (edgetune compress --quantize "
            "int8-dynamic), which have no backward, so nothing can be trained on them; "
            "fine-tune the fp32 model, or one compressed with --quantize int8"
        )
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    if int8 and cfg.method not in INT8_BASE_METHODS:
        raise ConfigError(
            f"peft.method={cfg.method} trains base weights, but this model's linear weights "
            f"are int8 and frozen; use --peft {' or '.join(INT8_BASE_METHODS)}, or fine-tune "
            "the fp32 model"
        )
    with torch.random.fork_rng(), int8_as_linear(model):
        torch.manual_seed(seed)
        wrapped = _ATTACHERS[cfg.method](model, cfg)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(f"peft.method={cfg.method} selects no parameters of this model")
    return Adapter(wrapped, cfg.method, names)


def _lora(model: torch.nn.Module, cfg: PeftConfig, freeze_a: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules) or default_targets(model)
    present = adaptable_names(model)
    unknown = [t for t in targets if t not in present]
    if unknown:
        raise ConfigError(
            f"peft.target_modules: {unknown} not found in this model; its linear layers are "
            f"{present}"
        )
    # GPT-2's Conv1D keeps its weight as [in, out]; PEFT must be told (it would guess and
    # warn otherwise; it still treats any nn.Linear among the targets as [out, in]).
    conv1d = any(is_conv1d(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    placed: dict[str, Any] = {}
    top = cfg.top_layers()
    if top is not None:
        pattern, blocks = _block_list(model)
        count = len(blocks)
        if top > count:
            raise ConfigError(f"peft.layers=top:{top} but the model has {count} layers")
        placed = {"layers_to_transform": list(range(count - top, count)), "layers_pattern": pattern}
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
        init_lora_weights=LORA_INITS[cfg.init],
        **placed,
    )
    wrapped = get_peft_model(model, lora)
    if freeze_a:
        for name, param in wrapped.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return wrapped


def _lora_fa(model: torch.nn.Module, cfg: PeftConfig) -> torch.nn.Module:
    return _lora(model, cfg, freeze_a=True)


def _prompt(model: torch.nn.Module, cfg: PeftConfig) -> torch.nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens)
    return get_peft_model(model, prompt)


def _bitfit(model: torch.nn.Module, cfg: PeftConfig) -> torch.nn.Module:
    model.requires_grad_(False)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    if not biases:
        raise ConfigError(
            "peft.method=bitfit: this model has no bias parameters (Llama-family models "
            "have none); use --peft last-n or --peft lora"
        )
    for p in biases:
        p.requires_grad_(True)
    return model


def _last_n(model: torch.nn.Module, cfg: PeftConfig) -> torch.nn.Module:
    layers = _decoder_layers(model)
    if cfg.last_layers > len(layers):
        raise ConfigError(
            f"peft.last_layers={cfg.last_layers} but the model has {len(layers)} layers"
        )
    model.requires_grad_(False)
    for layer in layers[-cfg.last_layers :]:
        layer.requires_grad_(True)
    return model


def _decoder_layers(model: torch.nn.Module) -> Any:
    return _block_list(model)[1]


def _block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of transformer blocks and its attribute name (`layers`; GPT-2's
    `h`)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("layers", "h") and isinstance(module, torch.nn.ModuleList):
            return leaf, module
    raise ConfigError(
        "cannot find this model's list of transformer blocks (a module list named layers or "
        "h), which last-n and peft.layers select from"
    )


def _full(model: torch.nn.Module, cfg: PeftConfig) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


_ATTACHERS = {
    "lora": _lora,
    "lora-fa": _lora_fa,
    "prompt": _prompt,
    "bitfit": _bitfit,
    "last-n": _last_n,
    "full": _full,
}
