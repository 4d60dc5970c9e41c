"""The model card (README.md) saved beside an adapter.

PEFT writes a blank template of "[More Information Needed]" fields; a user who finds the
adapter folder later (or on the Hub) needs what it is instead: the base model, the data
and task, how it was trained, its PEFT settings, the metrics it reached and the command
that made it. The YAML front matter keeps the fields the Hub reads (`base_model`,
`library_name: peft`, `pipeline_tag`, `tags`).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgetune.config import to_dict
from edgetune.models.builtin import BUILTIN_MODELS, base_model_id


@dataclass
class ModelCard:
    """What the card says about one adapter.

    Attributes:
        base_model: the hub id or path recorded as `base_model_name_or_path`.
        model: the model as the run named it (a built-in's name with its description,
            e.g. that SmolLM2 was dequantized from Q4_1: the adapter was trained on those
            weights).
        dataset: the dataset setting of the run.
        task: classification | instruction | lm.
        method: how it was trained, e.g. "finetune, zo (MeZO), 100 steps".
        peft: the PEFT settings (method, rank, alpha, targets...).
        metrics: final figures, e.g. {"eval/accuracy": 0.81}.
        data_details: resolved data settings worth knowing (labels, template...).
        command: the command that made it.
    """

    base_model: str
    model: str
    dataset: str
    task: str
    method: str
    peft: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    data_details: dict[str, Any] = field(default_factory=dict)
    command: str = ""

    @classmethod
    def for_run(cls, cfg: Any, command: str, method: str, metrics: dict[str, float]) -> ModelCard:
        """The card of a finetune or federate run whose resolved config is `cfg` (its
        `model`, `seed`, `out`, `data` and `peft` sections are read)."""
        data = cfg.data
        details = {
            "labels": data.labels,
            "verbalizer": data.verbalizer,
            "template": data.template,
            "max_length": data.max_length,
            "eval_size": data.eval_size,
            "seed": cfg.seed,
        }
        typed = command_line()
        builtin = BUILTIN_MODELS.get(cfg.model)
        return cls(
            base_model=base_model_id(cfg.model),
            model=f"{cfg.model} ({builtin.description})" if builtin else cfg.model,
            dataset=data.dataset,
            task=data.task or "",
            method=method,
            peft=to_dict(cfg.peft),
            metrics=metrics,
            data_details=details,
            command=typed or f"edgetune {command} --config {Path(cfg.out) / 'config.yaml'}",
        )

    def render(self) -> str:
        """The card as Markdown with YAML front matter."""
        front = {
            "base_model": self.base_model,
            "library_name": "peft",
            "pipeline_tag": "text-generation",
            "tags": ["edgetune", str(self.peft.get("method", "")), self.task],
        }
        lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
        lines += [f"# {self.peft.get('method', 'adapter')} adapter for {self.base_model}", ""]
        lines += [
            f"Trained with edgetune on `{self.dataset}` ({self.task} task).",
            "",
            "## Base model",
            "",
            f"- `base_model_name_or_path`: `{self.base_model}`",
            f"- as named in the run: {self.model}",
            "",
            "## Data",
            "",
            f"- dataset: `{self.dataset}`",
            f"- task: {self.task}",
            *[f"- {k}: {_inline(v)}" for k, v in self.data_details.items() if v is not None],
            "",
            "## Training",
            "",
            f"- method: {self.method}",
            *[f"- peft.{k}: {_inline(v)}" for k, v in self.peft.items()],
            "",
            "## Metrics",
            "",
            *([f"- {k}: {v:.4f}" for k, v in self.metrics.items()] or ["- none recorded"]),
            "",
            "## Command",
            "",
            "```",
            self.command or "(not recorded)",
            "```",
            "",
            "## Use",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
            "```",
            "",
            "or `edgetune eval --adapter PATH/TO/THIS/FOLDER` (it reads the run's config.yaml "
            "one folder up).",
            "",
        ]
        return "\n".join(lines)

    def write(self, folder: Path) -> Path:
        """Write `folder/README.md` (replacing PEFT's template); returns its path."""
        path = folder / "README.md"
        path.write_text(self.render())
        return path


def _inline(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, str):
        return f"`{value}`" if "\n" not in value else "`" + value.replace("\n", "\\n") + "`"
    return str(value)


def command_line() -> str:
    """This process's edgetune command, as typed (empty when not run from the CLI)."""
    entry = Path(sys.argv[0]) if sys.argv else Path()
    from_cli = entry.name == "edgetune" or (
        entry.name in ("cli.py", "__main__.py") and entry.parent.name == "edgetune"
    )
    if not from_cli:
        return ""
    return shlex.join(["edgetune", *sys.argv[1:]])
