"""`edgetune compress`: structurally prune and/or int8-quantize a model (and map or merge
its adapter) and measure the cost of each stage.

load model + data -> evaluate "before" -> [prune: importance scores on calibration
batches from the training split -> select kept units -> prune -> save DIR/model (and the
mapped DIR/adapter) -> evaluate "after-prune"] -> [quantize int8: merge the adapter into
the fp32 weights -> int8 linear weights -> save DIR/model in the int8 folder format
(`compress/int8_folder.py`) -> evaluate "after-quantize"]. A stage not requested is
skipped; a run requesting neither is refused. Every input is checked before DIR is
created, so a refused request writes nothing. metrics.jsonl holds one line per stage;
summary.json the parameter counts, size on disk, speed and memory of each.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune import console, models, threads
from edgetune.compress.int8_folder import release_file_pages, save_int8
from edgetune.compress.prune import (
    activation_scores,
    llama_layers,
    magnitude_scores,
    map_adapter_folder,
    prune,
    select_kept,
    taylor_scores,
)
from edgetune.compress.prune.select import UNITS
from edgetune.compress.quantize import Int8Linear, linear_weight_bytes, quantize_int8
from edgetune.config import check_choice, option, to_dict
from edgetune.data import DataConfig, build_task, load_splits
from edgetune.errors import ConfigError
from edgetune.recipes.evaluate import load_adapter
from edgetune.runs import RunDir, peak_rss_mb
from edgetune.train.loop import evaluate_model

IMPORTANCE = ("activation", "taylor", "magnitude")
QUANTIZE = ("none", "int8")
PRUNE_ONLY = ("units", "importance", "calib")  # settings that only act when pruning
PREFILL_TOKENS = 128
DECODE_TOKENS = 32
SPEED_REPEATS = 3


@dataclass
class PruneConfig:
    """How much to prune, which units, and how importance is scored."""

    ratio: float = option(0.0, "fraction of units to remove per layer, in [0, 1); 0 = no pruning")
    units: str = option("mlp,heads", "unit kinds to prune, comma-separated: mlp, heads")
    importance: str = option("activation", "activation | taylor | magnitude")
    calib: int = option(32, "calibration examples from the training split")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(
                f"prune.ratio: {self.ratio} is outside [0, 1); give the fraction of units "
                "to remove, e.g. --prune 0.3"
            )
        unknown = [u for u in self.unit_list if u not in UNITS]
        if unknown or not self.unit_list:
            raise ConfigError(
                f"prune.units: {', '.join(unknown) or 'none given'} is not a unit kind; "
                f"choose from {', '.join(UNITS)}, e.g. --prune-units mlp,heads"
            )
        check_choice("prune", "importance", self.importance, IMPORTANCE)
        if self.calib < 1:
            raise ConfigError(f"prune.calib: expected an integer >= 1, got {self.calib}")
        if self.importance == "magnitude" and self.calib != PruneConfig.calib:
            raise ConfigError(
                f"prune.calib={self.calib} is not used by prune.importance=magnitude (it "
                "reads weights only); drop --calib, or use --importance activation|taylor"
            )

    @property
    def unit_list(self) -> list[str]:
        """The unit kinds as a list."""
        return [u.strip() for u in self.units.split(",") if u.strip()]


@dataclass
class CompressConfig:
    """Everything `edgetune compress` needs (YAML sections = the nested fields)."""

    model: str = option("smollm2-135m", "built-in name, HF folder, .gguf file or hub id")
    adapter: str = option("", "PEFT adapter folder of the model, mapped onto the pruned one")
    seed: int = option(0, "run seed: data split and calibration rows")
    out: str = option("runs/compress", "run directory")
    batch_size: int = option(16, "evaluation and calibration batch size")
    progress: bool = option(True, "progress lines on stderr")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    quantize: str = option("none", "none | int8: store the final model's linear weights in int8")
    threads: int = option(
        0, "torch threads per process (0 = chosen at start from the free cores and recorded)"
    )

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        check_choice("compress", "quantize", self.quantize, QUANTIZE)
        if self.prune.ratio == 0.0 and self.quantize == "none":
            raise ConfigError(
                "compress: nothing to do (prune.ratio=0 and quantize=none); give --prune R "
                "and/or --quantize int8"
            )
        unused = [k for k in PRUNE_ONLY if getattr(self.prune, k) != getattr(PruneConfig, k)]
        if self.prune.ratio == 0.0 and unused:
            raise ConfigError(
                f"prune.{unused[0]} is not used without pruning (prune.ratio=0); add "
                f"--prune R, e.g. --prune 0.3, or drop the prune.{unused[0]} setting"
            )


def run(cfg: CompressConfig) -> dict[str, Any]:
    """Prune and/or quantize `cfg.model`, write the run directory `cfg.out`; returns the
    summary.

    Raises:
        EdgetuneError: --out holds a run, too few calibration rows, an unsupported
            architecture, a model that is already int8, a ratio that empties a layer, or an
            adapter of another model; all before the run folder is created.
    """
    start = time.perf_counter()
    if (Path(cfg.out) / "metrics.jsonl").exists():
        raise ConfigError(
            f"{cfg.out} already holds a run; pass another --out (compress never replaces a run)"
        )
    console.status(f"loading model {cfg.model} and data {cfg.data.dataset}", cfg.progress)
    model, tokenizer = models.load(cfg.model)
    llama_layers(model)  # an unsupported architecture stops here, before DIR exists
    _refuse_int8_input(model, cfg)
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    eval_rows = task.prepare_rows(splits.eval)
    pruning = cfg.prune.ratio > 0.0
    calib_rows = task.prepare_rows(splits.train)[: cfg.prune.calib] if pruning else []
    if pruning and cfg.prune.importance != "magnitude" and len(calib_rows) < cfg.prune.calib:
        raise ConfigError(
            f"prune.calib={cfg.prune.calib} but the training split has {len(calib_rows)} "
            f"rows; lower --calib to {len(calib_rows)} or raise data.train_size"
        )
    scored = load_adapter(models.load(cfg.model)[0], cfg.adapter) if cfg.adapter else model
    # a ratio too high stops here
    kept, rounded = _select(model, task, calib_rows, cfg) if pruning else (None, None)
    rundir = RunDir(cfg.out)
    rundir.write_config(to_dict(cfg))

    console.status("evaluating before compression", cfg.progress)
    before = {**_evaluate(scored, task, eval_rows, cfg), **_speed(model, cfg.seed)}
    rundir.log({"stage": "before", **before["metrics"]})
    stages: dict[str, dict] = {}
    params_before = _params(model)
    folder = rundir.path / "model"
    if pruning:
        del scored
        scored, stages["after-prune"] = _prune_stage(
            model, tokenizer, kept, task, eval_rows, rundir, cfg
        )
    params_after = _params(model)
    if cfg.quantize == "int8":
        stages["after-quantize"] = _quantize_stage(scored, tokenizer, task, eval_rows, rundir, cfg)
    summary = {
        "command": "compress",
        "model": cfg.model,
        "adapter": cfg.adapter or None,
        "prune": {**to_dict(cfg.prune), "kept_kv_groups": len(kept.kv_groups[0])}
        if pruning
        else None,
        "heads_rounded": rounded,
        "params_before": params_before,
        "params_after": params_after,
        "model_bytes_after": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        "eval_examples": len(eval_rows),
        "before": before,
        **stages,
        "after": stages[list(stages)[-1]],
        "peak_rss_mb": peak_rss_mb(),
        "wall_s": time.perf_counter() - start,
    }
    rundir.write_summary(summary)
    return summary


def _refuse_int8_input(model: Any, cfg: CompressConfig) -> None:
    """An int8 model (a compress output) can be neither pruned nor quantized again."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ConfigError(
            f"{cfg.model} is already an int8 model; compress the fp32 model it came from "
            "(prune and quantize in one run: --prune R --quantize int8)"
        )


def _prune_stage(
    model: Any,
    tokenizer: Any,
    kept: Any,
    task: Any,
    rows: list[dict],
    rundir: RunDir,
    cfg: CompressConfig,
) -> tuple[Any, dict]:
    """Prune `model` in place, save DIR/model (and the mapped DIR/adapter), evaluate.

    Returns:
        (the pruned model, wrapped with its mapped adapter when there is one; the stage
        result: metrics and speed of the bare pruned model).
    """
    unpruned_config = copy.deepcopy(model.config)
    prune(model, kept)
    folder = rundir.path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    speed_after = _speed(model, cfg.seed)  # of the bare model, as before pruning
    scored = model
    if cfg.adapter:
        adapter = map_adapter_folder(
            cfg.adapter, rundir.path / "adapter", kept, unpruned_config, base_model=folder
        )
        scored = load_adapter(model, str(adapter))
    console.status("evaluating after pruning", cfg.progress)
    after = {**_evaluate(scored, task, rows, cfg), **speed_after}
    rundir.log({"stage": "after-prune", **after["metrics"]})
    return scored, after


def _quantize_stage(
    scored: Any, tokenizer: Any, task: Any, rows: list[dict], rundir: RunDir, cfg: CompressConfig
) -> dict:
    """Merge the adapter (if any) into the fp32 weights, quantize to int8, save DIR/model
    in the int8 folder format (replacing a pruned fp32 model there), evaluate.

    Returns:
        The stage result: metrics, speed, linear weight bytes before and after, the size
        of DIR/model on disk, and whether an adapter was merged into it.
    """
    merged = bool(cfg.adapter)
    model = scored.merge_and_unload() if merged else scored
    bytes_before = linear_weight_bytes(model)
    release_file_pages(quantize_int8(model))
    folder = rundir.path / "model"
    (folder / "model.safetensors").unlink(missing_ok=True)
    save_int8(model, folder)
    tokenizer.save_pretrained(folder)
    console.status("evaluating after int8 quantization", cfg.progress)
    after = {**_evaluate(model, task, rows, cfg), **_speed(model, cfg.seed)}
    rundir.log({"stage": "after-quantize", **after["metrics"]})
    return {
        **after,
        "method": cfg.quantize,
        "adapter_merged": merged,
        "linear_weight_bytes_before": bytes_before,
        "linear_weight_bytes_after": linear_weight_bytes(model),
        "model_mb": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20,
    }


def _select(model: Any, task: Any, rows: list[dict], cfg: CompressConfig) -> tuple[Any, Any]:
    """(the kept units, the head rounding select_kept applied or None); warns of rounding."""
    say = f"scoring {cfg.prune.importance} importance on {len(rows)} calibration rows"
    console.status(say, cfg.progress)
    scores = _scores(model, task, rows, cfg)
    kept = select_kept(scores, cfg.prune.ratio, cfg.prune.unit_list)
    rounded = _head_rounding(scores, kept, cfg.prune)
    if rounded:
        console.status(f"warning: {rounded['message']}")
    return kept, rounded


def _scores(model: Any, task: Any, rows: list[dict], cfg: CompressConfig) -> Any:
    """Unit importance of `cfg.prune.importance` from calibration batches of `rows`."""
    if cfg.prune.importance == "magnitude":
        return magnitude_scores(model)
    batches = [
        {k: v for k, v in task.collate(rows[i : i + cfg.batch_size]).items() if k != "labels"}
        for i in range(0, len(rows), cfg.batch_size)
    ]
    if cfg.prune.importance == "taylor":
        return taylor_scores(model, batches)
    return activation_scores(model, batches)


def _head_rounding(scores: Any, kept: Any, prune_cfg: PruneConfig) -> dict[str, Any] | None:
    """What select_kept did to the requested key/value group count (None = kept as asked)."""
    if "heads" not in prune_cfg.unit_list:
        return None
    n = scores.kv_groups[0].numel()
    requested = n - round(prune_cfg.ratio * n)
    got = len(kept.kv_groups[0])
    if got == requested:
        return None
    return {
        "requested_kv_groups": requested,
        "kept_kv_groups": got,
        "message": f"prune.ratio={prune_cfg.ratio} asks to keep {requested} of {n} key/value "
        f"head groups per layer; kept {got}, the nearest count the model can load with",
    }


def _evaluate(scored: Any, task: Any, rows: list[dict], cfg: CompressConfig) -> dict:
    """Task metrics of `scored` (the model, or the model with its adapter)."""
    return {"metrics": evaluate_model(scored, task, rows, cfg.batch_size, cfg.progress)}


@torch.no_grad()
def _speed(model: Any, seed: int) -> dict[str, float]:
    """Median prefill latency (batch 1 x PREFILL_TOKENS) and greedy decode tokens/s."""
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(seed)
    )
    prefill, decode = [], []
    for _ in range(SPEED_REPEATS):
        t = time.perf_counter()
        model(input_ids=ids)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(
            ids[:, :8],
            attention_mask=torch.ones_like(ids[:, :8]),
            max_new_tokens=DECODE_TOKENS,
            min_new_tokens=DECODE_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        decode.append((out.shape[1] - 8) / (time.perf_counter() - t))
    return {
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
    }


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
