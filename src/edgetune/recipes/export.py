"""`edgetune export`: a model (and its LoRA adapter) to ONNX, ExecuTorch or GGUF.

load model [+ adapter] -> the graph (`export/graph.py`): adapter tensors as inputs (the
adapter's shapes, or `--lora-rank` for on-device training from scratch), merged into the
weights (`--merge`), or a plain base graph -> the format's writer -> a parity check of the
real runtime against PyTorch on a small batch -> tokenizer, starting adapter and
`export.json` (`export/manifest.py`). GGUF writes llama.cpp's base model (f32 / q8_0 /
q4_0, tokenizer embedded) and LoRA adapter files (`export/gguf.py`), then, when
llama.cpp's Python binding is installed, compares its logits on a short prompt with
PyTorch's (`export/llama_cpp.py`: an F32 file must match; a quantized one's figures are
recorded); without the binding it says the check was skipped, and records why.

Everything is written into a temporary sibling of --out and renamed at the end, so a
failed export leaves nothing behind; an existing --out is never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune import console, models, threads
from edgetune.compress.int8_dynamic import is_dynamic_int8
from edgetune.compress.vocab import is_vocab_pruned
from edgetune.config import check_choice, option
from edgetune.errors import ConfigError
from edgetune.export.gguf import GGUF_TYPES
from edgetune.export.graph import (
    LOGITS_MODES,
    AdapterInputLM,
    PlainLM,
    slots_for,
    slots_from_peft,
)
from edgetune.export.manifest import ExportManifest, write_manifest
from edgetune.models.builtin import base_model_id
from edgetune.peft.targets import default_targets
from edgetune.recipes.evaluate import load_adapter
from edgetune.runs import check_out

# The decoders the graph exporters take, each checked against PyTorch in ONNX Runtime
# (tests/models/test_families.py); GGUF narrows this to what llama.cpp's llama
# architecture holds (export/gguf.py). GPT-2, OPT and Phi-3 are not among them: their
# blocks differ (Conv1D and learned positions; fused projections) and nothing checks them.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
# An ExecuTorch program runs at exactly its limits (export/executorch.py): one copy (MeZO,
# inference) by default; P-RGE needs --max-copies 2q.
PTE_DEFAULTS = {"max_copies": 1, "max_batch": 16, "max_seq": 128}
# What a GGUF export is checked on in llama.cpp (tokenized with BOS, as llama.cpp runs it).
GGUF_CHECK_PROMPT = "Once upon a time, there was a little girl named Lily."


@dataclass
class ExportConfig:
    """Everything `edgetune export` needs."""

    model: str = option(
        "smollm2-135m", "built-in name, HF folder, .gguf file or hub id", flag="--model"
    )
    adapter: str = option(
        "", "PEFT LoRA adapter folder trained on --model (e.g. RUN/adapter)", flag="--adapter"
    )
    format: str = option("onnx", "onnx | executorch | gguf", flag="--format")
    out: str = option("runs/export", "export folder (must not exist yet)", flag="--out")
    merge: bool = option(
        False, "fold --adapter into the weights (a graph without adapter inputs)", flag="--merge"
    )
    logits: str = option(
        "all",
        "onnx/executorch: logits at every position (all) or only the last (last)",
        flag="--logits",
    )
    lora_rank: int = option(
        0,
        "onnx/executorch without --adapter: LoRA inputs of this rank (0: a plain graph)",
        flag="--lora-rank",
    )
    lora_alpha: float = option(16.0, "with lora_rank: LoRA alpha (scale = alpha / rank)")
    lora_targets: list[str] = option(
        [], "with lora_rank: linear layers adapted (empty: the family's default, as peft's)"
    )
    gguf_type: str = option(
        "f32", "gguf: weight type of the base model, f32 | q8_0 | q4_0", flag="--gguf-type"
    )
    max_copies: int = option(
        PTE_DEFAULTS["max_copies"],
        "executorch: adapter copies per call (smaller calls are padded to it)",
        flag="--max-copies",
    )
    max_batch: int = option(
        PTE_DEFAULTS["max_batch"], "executorch: rows per copy (padded to it)", flag="--max-batch"
    )
    max_seq: int = option(
        PTE_DEFAULTS["max_seq"], "executorch: tokens per row (left-padded to it)", flag="--max-seq"
    )
    threads: int = option(0, "threads (0 = chosen at start from the free cores)")

    def __post_init__(self) -> None:
        check_choice("export", "format", self.format, FORMATS)  # the registry, below
        check_choice("export", "logits", self.logits, LOGITS_MODES)
        check_choice("export", "gguf_type", self.gguf_type, GGUF_TYPES)
        threads.check(self.threads, "threads")
        if self.lora_rank < 0:
            raise ConfigError(f"export.lora_rank: expected a value >= 0, got {self.lora_rank}")
        for name in PTE_DEFAULTS:  # a program with room for 0 copies, rows or tokens runs nothing
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"export.{name}: expected an integer >= 1, got {getattr(self, name)}; "
                    f"e.g. --{name.replace('_', '-')} {PTE_DEFAULTS[name]}"
                )
        self._refuse_ignored()

    def _refuse_ignored(self) -> None:
        """A setting this export would not read is an error (the message says why)."""
        given = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f)}
        unused: dict[str, str] = {}
        for name in sorted(given - set(FORMATS[self.format].reads)):
            readers = [f for f, fmt in FORMATS.items() if name in fmt.reads]
            if readers:
                unused[name] = f"only --format {' | '.join(readers)} reads it"
        if self.merge and not self.adapter:
            unused["merge"] = "there is no --adapter to merge"
        if self.adapter and "lora_rank" in given:
            unused["lora_rank"] = "the adapter's own shapes are used"
        if not self.lora_rank:
            for name in ("lora_alpha", "lora_targets"):
                if name in given:
                    unused[name] = "it shapes LoRA inputs only with --lora-rank R"
        if unused:
            reasons = "; ".join(f"{k} ({why})" for k, why in unused.items())
            raise ConfigError(f"settings this export would ignore: {reasons}; drop them")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def run(cfg: ExportConfig, overwrite: bool = False) -> dict[str, Any]:
    """Export `cfg.model` (and adapter) into `cfg.out`; returns the summary.

    Raises:
        EdgetuneError: --out exists (without `overwrite`, which replaces it once the new
            export is complete), an adapter of another base, an int8-dynamic model, an
            architecture or format the exporter does not support, a missing optional
            package; nothing is left in --out.
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    check_out(out)  # before the model loads and the exporter runs
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass another --out, or --overwrite to replace it")
    console.status(f"loading model {cfg.model}")
    model, tokenizer = models.load(cfg.model)
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{cfg.model} is a {arch!r} model; edgetune exports Llama-family causal LMs "
            f"(model_type {', '.join(ARCHITECTURES)}: SmolLM2, stories260K, Llama 2/3, Qwen2.5, "
            "Qwen3, Mistral, Gemma 3), with LoRA on their linear layers; fine-tune and "
            "federate this one in PyTorch"
        )
    if is_dynamic_int8(model):
        raise ConfigError(
            f"{cfg.model} is a dynamic int8 model (compress --quantize int8-dynamic), whose "
            "fbgemm kernels no exporter supports; export the fp32 model (or --quantize int8)"
        )
    if cfg.format == "gguf" and is_vocab_pruned(model):
        raise ConfigError(
            f"{cfg.model} is vocabulary-pruned: its token ids are mapped at the model's edge, "
            "but llama.cpp's tokenizer reads the vocabulary from the GGUF file and would emit "
            "the original ids; export the pruned model to onnx or executorch (the id map is "
            "in their graph), or the unpruned model to gguf"
        )
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _export(cfg, model, tokenizer, tmp)
        write_manifest(tmp, manifest)
        if out.is_dir():  # --overwrite: the old export goes only once the new one is whole
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {name: (out / name).stat().st_size for name in manifest.files.values()}
    return {
        "out": str(out),
        "format": cfg.format,
        "files": sizes,
        "adapter_inputs": manifest.adapter_inputs,
        "export_s": round(time.perf_counter() - started, 2),
        **manifest.facts,
    }


def _export(cfg: ExportConfig, model: Any, tokenizer: Any, tmp: Path) -> ExportManifest:
    base = base_model_id(cfg.model)
    tokenizer.save_pretrained(tmp / "tokenizer")
    return FORMATS[cfg.format].export(cfg, model, tokenizer, tmp, base)


def _export_graph(
    cfg: ExportConfig, model: Any, tokenizer: Any, tmp: Path, base: str
) -> ExportManifest:
    """A graph with the adapter's inputs (or merged, or plain), checked in its runtime."""
    slots, start, peft_config = [], None, None
    if cfg.adapter:
        wrapped = load_adapter(model, cfg.adapter)
        if cfg.merge:
            model = wrapped.merge_and_unload()
        else:
            slots, start = slots_from_peft(wrapped)
            peft_config = _adapter_config(Path(cfg.adapter), base)
            shutil.copytree(cfg.adapter, tmp / "adapter")
            model = wrapped.unload()
    elif cfg.lora_rank:
        targets = list(cfg.lora_targets) or default_targets(model)
        slots = slots_for(model, targets, cfg.lora_rank, cfg.lora_alpha)
        peft_config = _new_lora_config(cfg, targets, base)
    module: torch.nn.Module = (
        AdapterInputLM(model, slots, cfg.logits) if slots else PlainLM(model, cfg.logits)
    )
    module.eval()
    # a P-RGE-like call with 2 copies and 2 rows (sizes > 1 keep ONNX's axes dynamic),
    # within an ExecuTorch program's limits
    bounded = "max_batch" in FORMATS[cfg.format].reads  # a program of fixed sizes
    copies, rows = (min(2, cfg.max_copies), min(2, cfg.max_batch)) if bounded else (2, 2)
    args = _example_args(slots, start, tokenizer, copies, rows, cfg.max_seq if bounded else 10)
    console.status(f"exporting to {cfg.format} (a minute for a 135M model)")
    graph, facts = FORMATS[cfg.format].write_graph(cfg, module, args, tmp)
    facts["parity_max_abs"] = _parity(cfg, module, args, tmp / graph)
    files = {"graph": graph}
    if (tmp / f"{graph}.data").exists():  # weights the exporter stored beside the graph
        files["graph_data"] = f"{graph}.data"
    return ExportManifest(
        format=cfg.format,
        files=files,
        base_model=base,
        logits=cfg.logits,
        slots=slots,
        peft_config=peft_config,
        merged_adapter=str(Path(cfg.adapter).resolve()) if cfg.merge else None,
        adapter="adapter" if cfg.adapter and not cfg.merge else None,
        facts=facts,
    )


def _write_onnx(
    cfg: ExportConfig, module: torch.nn.Module, args: tuple, tmp: Path
) -> tuple[str, dict[str, Any]]:
    from edgetune.export.onnx import export_onnx

    export_onnx(module, args, tmp / "model.onnx")
    return "model.onnx", {}


def _write_pte(
    cfg: ExportConfig, module: torch.nn.Module, args: tuple, tmp: Path
) -> tuple[str, dict[str, Any]]:
    from edgetune.export.executorch import PteLimits, export_pte

    limits = PteLimits(cfg.max_copies, cfg.max_batch, cfg.max_seq)
    facts = export_pte(module, args, tmp / "model.pte", limits, isinstance(module, AdapterInputLM))
    return "model.pte", facts


def _example_args(
    slots: list, start: list | None, tokenizer: Any, copies: int, rows: int, seq: int
) -> tuple[torch.Tensor, ...]:
    """A left-padded batch of `rows` real sentences (at most `seq` tokens), repeated for
    `copies` adapters: the exported one (if any) first, then random ones of a trained
    LoRA's scale."""
    from edgetune.export.graph import example_adapter

    text = ["Once upon a time there was a little dog", "The market fell"][:rows]
    ids_list = [tokenizer(t, add_special_tokens=False)["input_ids"][: min(seq, 10)] for t in text]
    width = max(len(r) for r in ids_list)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in ids_list])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids_list])
    if not slots:
        return ids, mask
    adapter = example_adapter(slots, copies=copies)
    if start is not None:
        adapter = [torch.cat([s, a[1:]]) for s, a in zip(start, adapter, strict=True)]
    return ids.expand(copies, -1, -1).clone(), mask.expand(copies, -1, -1).clone(), *adapter


@torch.no_grad()
def _parity(cfg: ExportConfig, module: torch.nn.Module, args: tuple, path: Path) -> float:
    """Max |runtime logits - PyTorch logits| over the example batch's real tokens."""
    from edgetune.ondevice.runtime import open_session

    want = module(*args).float().numpy()
    got = open_session(cfg.format, path, threads=max(cfg.threads, 1)).run([a.numpy() for a in args])
    if got.shape != want.shape:
        raise ConfigError(f"the exported graph returns {got.shape}, PyTorch {want.shape}")
    # Padding positions attend to nothing; their logits are arbitrary in every runtime.
    real = args[1].bool().numpy()
    if cfg.logits == "last":
        real = real[..., -1:]
    return float(abs(got - want)[real].max())


def _export_gguf(
    cfg: ExportConfig, model: Any, tokenizer: Any, tmp: Path, base: str
) -> ExportManifest:
    from edgetune.export.gguf import export_gguf

    adapter = Path(cfg.adapter) if cfg.adapter else None
    ids = tokenizer(GGUF_CHECK_PROMPT).input_ids
    with torch.no_grad():
        if adapter is not None:  # refuses an adapter of another base
            wrapped = load_adapter(model, cfg.adapter)
            expected = wrapped(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            wrapped.unload()
        else:
            expected = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    console.status(f"writing GGUF ({cfg.gguf_type})")
    written = export_gguf(model, tokenizer, tmp, cfg.gguf_type, adapter, cfg.merge)
    files = {"model": written.model.name}
    if written.adapter is not None:
        files["adapter"] = written.adapter.name
    facts = {"gguf_type": cfg.gguf_type, "bytes": written.bytes}
    return ExportManifest(
        format="gguf",
        files=files,
        base_model=base,
        merged_adapter=str(adapter.resolve()) if adapter and cfg.merge else None,
        facts={**facts, **_gguf_parity(cfg, written, ids, expected)},
    )


def _gguf_parity(cfg: ExportConfig, written: Any, ids: list[int], expected: Any) -> dict:
    """llama.cpp's logits on GGUF_CHECK_PROMPT against PyTorch's (`gguf_parity`), or why
    the check was skipped: the binding is an optional extra."""
    from edgetune.export.llama_cpp import binding_available, gguf_parity

    if not binding_available():
        why = "llama.cpp's Python binding is not installed (pip install 'edgetune[llama]')"
        console.status(f"GGUF parity check skipped: {why}")
        return {"parity_max_abs": None, "parity_skipped": why}
    console.status("checking the GGUF's logits in llama.cpp against PyTorch")
    threads = max(cfg.threads, 1)
    return gguf_parity(written.model, ids, expected, cfg.gguf_type, written.adapter, threads)


def _adapter_config(adapter: Path, base: str) -> dict[str, Any]:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    return config


def _new_lora_config(cfg: ExportConfig, targets: list[str], base: str) -> dict[str, Any]:
    """adapter_config.json of the LoRA the inputs describe (what PEFT would write)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    ).to_dict()
    return json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )


@dataclass(frozen=True)
class Format:
    """An export format: how it exports, and the settings only it (among the formats)
    reads; `write_graph` writes a graph format's file (None: it holds weights only)."""

    export: Callable[[ExportConfig, Any, Any, Path, str], ExportManifest]
    reads: tuple[str, ...]
    write_graph: Callable[..., tuple[str, dict[str, Any]]] | None = None


GRAPH_SETTINGS = ("logits", "lora_rank", "lora_alpha", "lora_targets")
FORMATS: dict[str, Format] = {  # every format is dispatched from here, none by default
    "onnx": Format(_export_graph, GRAPH_SETTINGS, _write_onnx),
    "executorch": Format(_export_graph, (*GRAPH_SETTINGS, *PTE_DEFAULTS), _write_pte),
    "gguf": Format(_export_gguf, ("gguf_type",)),
}
