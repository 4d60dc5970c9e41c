"""What a command shows on stderr: progress of its long phases, and no third-party noise.

stdout carries a command's result (the summary JSON); everything a person watches while
it runs goes to stderr: one `edgetune: ...` line when a phase starts (loading a model, a
federated round's outcome) and tqdm bars for loops (training steps, evaluation batches).
Every one of them follows `train.progress`, so `train.progress=false` makes a run silent.

Unless `--verbose` is given, the CLI also hides what the libraries print that a user
cannot act on: transformers' weight-loading bars and info logs, and deprecation warnings
raised inside transformers and PEFT (e.g. `is_gradient_checkpointing`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

# Libraries whose deprecation warnings describe their own internals, not the user's code,
# and the two whose UserWarnings are about Hub lookups and defaults a user cannot act on.
_DEPRECATING_MODULES = r"(transformers|peft|accelerate|torch)(\.|$)"
_CHATTY_MODULES = r"(transformers|peft)(\.|$)"


def warn(message: str) -> None:
    """A visible warning `edgetune: warning: MESSAGE` on stderr (the run goes on)."""
    print(f"edgetune: warning: {message}", file=sys.stderr, flush=True)


def status(message: str, enabled: bool = True) -> None:
    """Print one progress line `edgetune: MESSAGE` to stderr (when `enabled`)."""
    if enabled:
        print(f"edgetune: {message}", file=sys.stderr, flush=True)


def bar(
    total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0, leave: bool = True
) -> Any:
    """A tqdm bar on stderr, or None when progress is off (callers test for None);
    `leave=False` erases it when done (a phase inside a longer one)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=leave,
        file=sys.stderr,
    )


def quiet_third_party() -> None:
    """Hide library progress bars, info logs and internal deprecation warnings.

    Called once by the CLI before any command runs; `--verbose` skips it.
    """
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_DEPRECATING_MODULES)
    warnings.filterwarnings("ignore", category=UserWarning, module=_CHATTY_MODULES)
    # torch.utils._pytree: torchao (pulled in by ExecuTorch) registers enums at import and
    # torch logs a deprecation warning for each; torch.onnx / torch.export log internals.
    for name in (
        "transformers",
        "peft",
        "accelerate",
        "huggingface_hub",
        "torch.utils._pytree",
        "torch.onnx",
        "torch.export",
        "torch._dynamo",
        "torch._export",
        "torchao",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported: the environment was read
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
