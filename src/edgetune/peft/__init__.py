"""PEFT: adapters (LoRA, LoRA-FA, prompt, selective, full) and what trains."""

from edgetune.peft.adapters import Adapter, attach
from edgetune.peft.config import PEFT_METHODS, PeftConfig

__all__ = ["PEFT_METHODS", "Adapter", "PeftConfig", "attach"]
