"""PEFT configuration: which parameters train and how the adapter is shaped."""

from __future__ import annotations

from dataclasses import dataclass

from edgetune.config import check_choice, check_positive, option
from edgetune.errors import ConfigError

PEFT_METHODS = ("lora", "lora-fa", "prompt", "bitfit", "last-n", "full")


# LoRA initialisations (PEFT's `init_lora_weights`) and what each does to the start.
LORA_INITS = {
    "default": True,  # A Kaiming-uniform, B = 0: the adapter starts as a no-op
    "gaussian": "gaussian",  # A Gaussian scaled by the rank, B = 0: a no-op start
    "orthogonal": "orthogonal",  # A and B orthogonal: the start already moves the model
}
# The ones edgetune refuses, and why (each would need something it does not ship).
REFUSED_INITS = {
    "pissa": "rewrites the base weights into a residual (W - BA), which every federated "
    "client and every export would need instead of the shared base model",
    "olora": "rewrites the base weights into a residual (W - QR), which every federated "
    "client and every export would need instead of the shared base model",
    "eva": "is computed from activations on calibration data, which a federation's clients "
    "do not share, so they would not start from the same adapter",
    "corda": "is computed from activations on calibration data and rewrites the base "
    "weights, neither of which a federation's clients share",
    "loftq": "quantizes the base weights with the adapter, which needs a quantized base "
    "edgetune does not build",
    "lora_ga": "is computed from gradients on training data, which a federation's clients "
    "do not share, so they would not start from the same adapter",
}


@dataclass
class PeftConfig:
    """What trains: a LoRA / LoRA-FA adapter, a soft prompt, selected parameters, or all."""

    method: str = option(
        "lora", "lora | lora-fa (A frozen) | prompt | bitfit | last-n | full", flag="--peft"
    )
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = option(0.0, "LoRA dropout on the adapter input")
    target_modules: list[str] = option(
        [],
        "linear layers LoRA wraps (empty: every attention and MLP projection, named as the "
        "model's family names them; see peft/targets.py)",
    )
    virtual_tokens: int = option(8, "prompt tuning: number of soft-prompt tokens")
    last_layers: int = option(2, "last-n: how many final transformer blocks train")
    layers: str = option(
        "all", "lora / lora-fa: which transformer blocks get adapters: all | top:K (the last K)"
    )
    init: str = option(
        "default",
        "lora / lora-fa initialisation: default (B = 0, a no-op start) | gaussian (B = 0) | "
        "orthogonal (A, B orthogonal: not a no-op start)",
    )

    def __post_init__(self) -> None:
        check_choice("peft", "method", self.method, PEFT_METHODS)
        check_positive("peft", "rank", self.rank)
        check_positive("peft", "alpha", self.alpha)
        check_positive("peft", "virtual_tokens", self.virtual_tokens)
        check_positive("peft", "last_layers", self.last_layers)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if self.layers != "all":
            if self.method not in ("lora", "lora-fa"):
                raise ConfigError(
                    f"peft.layers={self.layers} places LoRA adapters, but peft.method is "
                    f"{self.method!r}; drop peft.layers (last-n: use peft.last_layers)"
                )
            self.top_layers()
        if self.init in REFUSED_INITS:
            raise ConfigError(
                f"peft.init={self.init}: edgetune does not support it, because it "
                f"{REFUSED_INITS[self.init]}; use one of {' | '.join(LORA_INITS)}"
            )
        check_choice("peft", "init", self.init, LORA_INITS)
        if self.init != "default" and self.method not in ("lora", "lora-fa"):
            raise ConfigError(
                f"peft.init={self.init} initialises LoRA, but peft.method is {self.method!r}; "
                "drop peft.init"
            )

    def top_layers(self) -> int | None:
        """K of `layers=top:K`; None for all blocks."""
        if self.layers == "all":
            return None
        kind, _, count = self.layers.partition(":")
        if kind != "top" or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"peft.layers: expected all or top:K with K >= 1 (e.g. top:6), got {self.layers!r}"
            )
        return int(count)
