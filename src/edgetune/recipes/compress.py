"""`edgetune compress`: structurally prune, recover and/or int8-quantize a model (and map
or merge its adapter) and measure the cost of each stage.

load model + data -> evaluate "before" -> [prune: importance scores on calibration batches
from the training split -> select kept units (global ratio, `prune.layer_ratios` or
`prune.ranking=global`; whole layers with `--prune-units ...,layers`) -> optional FLAP bias
compensation -> prune -> save DIR/model (and the mapped DIR/adapter) -> evaluate
"after-prune"] -> [recover: LoRA training of the pruned model, optionally distilled from
the unpruned one (`recipes/recover.py`), saved to DIR/adapter -> evaluate "after-recover"]
-> [quantize int8: merge the adapter into the fp32 weights -> int8 linear weights -> save
DIR/model in the int8 folder format (`compress/int8_folder.py`) -> evaluate
"after-quantize"; or int8-dynamic: merge -> SmoothQuant smoothing on the calibration rows
(`compress/smooth.py`) -> save the smoothed fp32 DIR/model -> fbgemm dynamic int8
(`compress/int8_dynamic.py`) -> evaluate "after-quantize"]. Or vocabulary pruning
(`--vocab task|N`, `compress/vocab.py`): keep the token rows the training prompts use ->
save DIR/model with its id map (and the re-based DIR/adapter) -> evaluate "after-vocab"
-> [quantize int8 as above, the folder stored in the kept id space with its map]; it
takes no prune, recovery or int8-dynamic stage in the same run. A stage not requested is
skipped; a run requesting nothing is refused.
An fp32 DIR/model loads with stock transformers when every layer keeps the same widths,
else with `edgetune.models.load` (per-layer widths; see `compress/prune/structured.py`).
Every input is checked before DIR is created, so a refused request writes nothing; an
existing run in DIR is refused unless `--overwrite`, which replaces it only then.
metrics.jsonl holds one line per stage (recovery's step lines carry "step" instead);
summary.json the parameter counts, size on disk, speed and memory of each stage.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import console, models, threads, track
from edgetune.compress.int8_dynamic import (
    dynamic_weight_bytes,
    is_dynamic_int8,
    quantize_dynamic_int8,
    save_int8_dynamic,
)
from edgetune.compress.int8_folder import release_file_pages, save_int8
from edgetune.compress.prune import (
    activation_scores,
    compensate,
    input_means,
    layer_widths,
    llama_layers,
    magnitude_scores,
    map_adapter_folder,
    prune,
    select_kept,
    taylor_scores,
)
from edgetune.compress.prune.select import RANKINGS, UNITS
from edgetune.compress.quantize import Int8Linear, linear_weight_bytes, quantize_int8
from edgetune.compress.smooth import activation_maxima, smooth
from edgetune.compress.speed import measure_speed, prefill_ids
from edgetune.compress.vocab import (
    VOCAB_MAP,
    VocabMap,
    attach_map,
    is_vocab_pruned,
    map_adapter,
    nearest_kept,
    oov_token_id,
    required_ids,
    save_pruned,
    select_vocab,
    shrink,
    token_counts,
    unmapped,
)
from edgetune.config import check_choice, option, to_dict
from edgetune.data import DataConfig, build_task, load_splits
from edgetune.data.recorded import with_recorded_task
from edgetune.data.tasks.classification import ClassificationTask
from edgetune.errors import ConfigError
from edgetune.peft.targets import is_conv1d
from edgetune.recipes.evaluate import load_adapter
from edgetune.recipes.recover import RecoverConfig, load_teacher, recover, teacher_logits
from edgetune.runs import RunDir, check_out, peak_rss_mb
from edgetune.train.loop import evaluate_model

IMPORTANCE = ("activation", "taylor", "magnitude")
QUANTIZE = ("none", "int8", "int8-dynamic")
SPEED_REPEATS = 3


@dataclass
class PruneConfig:
    """How much to prune, which units, and how importance is scored."""

    ratio: float = option(
        0.0,
        "fraction of units to remove per layer, in [0, 1) (0 = no pruning); with "
        "prune.layer_ratios it sets only the fraction of whole layers removed",
        flag="--prune",
    )
    units: str = option(
        "mlp,heads",
        "unit kinds to prune, comma-separated: mlp, heads, layers",
        flag="--prune-units",
    )
    importance: str = option("activation", "activation | taylor | magnitude", flag="--importance")
    calib: int = option(32, "calibration examples from the training split", flag="--calib")
    layer_ratios: list[float] | None = option(
        None,
        "one mlp/heads ratio per decoder layer, comma-separated (e.g. 0,0.2,0.4,0.4,0.6); "
        "widths then differ per layer and DIR/model loads with edgetune only",
    )
    ranking: str = option(
        "layer",
        "layer: every layer loses prune.ratio of its units (uniform widths) | global: "
        "layer-normalized scores compete across layers (per-layer widths)",
    )
    bias_compensation: bool = option(
        False,
        "FLAP: add the removed units' mean output on the calibration rows as a bias of "
        "down_proj / o_proj (needs activation or taylor importance)",
    )

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
        check_choice("prune", "ranking", self.ranking, RANKINGS)
        if self.calib < 1:
            raise ConfigError(f"prune.calib: expected an integer >= 1, got {self.calib}")
        self._check_layer_ratios()
        self._check_bias_compensation()

    def _check_layer_ratios(self) -> None:
        """Values in [0, 1), and a unit kind they act on; the global ratio then only removes layers."""
        if self.layer_ratios is None:
            return
        if self.ranking == "global":
            raise ConfigError(
                "prune.layer_ratios gives each layer its ratio and prune.ranking=global "
                "chooses the widths itself; drop one of them"
            )
        bad = [r for r in self.layer_ratios if not 0.0 <= r < 1.0]
        if bad or not self.layer_ratios:
            raise ConfigError(
                f"prune.layer_ratios: {bad or 'an empty list'} is not a list of ratios in "
                "[0, 1); give one per decoder layer, e.g. prune.layer_ratios=0,0.2,0.4,0.4,0.6"
            )
        widths = {"mlp", "heads"} & set(self.unit_list)
        if not widths:
            raise ConfigError(
                f"prune.layer_ratios sets MLP / head widths but prune.units={self.units} "
                "prunes neither; add mlp and/or heads to --prune-units"
            )
        if self.ratio > 0 and "layers" not in self.unit_list:
            raise ConfigError(
                f"prune.ratio={self.ratio} would be ignored: with prune.layer_ratios the "
                "widths come from the per-layer list and prune.ratio only removes whole "
                "layers; drop --prune, or add layers to --prune-units"
            )

    def _check_bias_compensation(self) -> None:
        """Compensation needs activations and something removed from an MLP or attention block."""
        if not self.bias_compensation:
            return
        if self.importance == "magnitude":
            raise ConfigError(
                "prune.bias_compensation needs the calibration activations and "
                "prune.importance=magnitude runs none; use --importance activation or taylor"
            )
        widths = {"mlp", "heads"} & set(self.unit_list)
        if not widths or not (self.ratio > 0 or self.layer_ratios):
            raise ConfigError(
                "prune.bias_compensation has nothing to compensate: no MLP channel or head "
                "is removed; prune mlp and/or heads (e.g. --prune 0.3 --prune-units mlp,heads) "
                "or drop prune.bias_compensation"
            )

    @property
    def requested(self) -> bool:
        """Whether anything is pruned (a global ratio or per-layer ratios)."""
        return self.ratio > 0.0 or self.layer_ratios is not None

    @property
    def unit_list(self) -> list[str]:
        """The unit kinds as a list."""
        return [u.strip() for u in self.units.split(",") if u.strip()]


@dataclass
class CompressConfig:
    """Everything `edgetune compress` needs (YAML sections = the nested fields)."""

    model: str = option(
        "smollm2-135m", "built-in name, HF folder, .gguf file or hub id", flag="--model"
    )
    adapter: str = option(
        "", "PEFT adapter folder of the model, mapped onto the pruned one", flag="--adapter"
    )
    seed: int = option(0, "run seed: data split and calibration rows", flag="--seed")
    out: str = option("runs/compress", "run directory", flag="--out")
    batch_size: int = option(16, "evaluation and calibration batch size", flag="--batch-size")
    progress: bool = option(True, "progress lines on stderr")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    recover: RecoverConfig = dataclasses.field(default_factory=RecoverConfig)
    quantize: str = option(
        "none",
        "none | int8: store the final model's linear weights in int8 | int8-dynamic: "
        "SmoothQuant smoothing (on prune.calib training rows) + fbgemm int8 weights and "
        "activations, faster on CPU; saved as the smoothed fp32 model, int8 at load",
        flag="--quantize",
    )
    vocab: str = option(
        "none",
        "none | task: keep only the tokens of the task's training prompts plus special and "
        "label tokens | N: at most N of those, the most frequent; the embedding and head "
        "shrink and token ids are mapped at the model's edge (compress/vocab.py)",
        flag="--vocab",
    )
    vocab_head: str = option(
        "all",
        "with --vocab: all: the head scores every kept token | labels: only the "
        "classification label tokens (a classifier that cannot generate; the rest of the "
        "head leaves prefill)",
        flag="--vocab-head",
    )
    vocab_oov: str = option(
        "unk",
        "with --vocab, how a pruned input id is read: unk (the tokenizer's unk token, else "
        "eos) | nearest (the kept token whose input embedding is closest by cosine)",
    )
    threads: int = option(
        0, "torch threads per process (0 = chosen at start from the free cores and recorded)"
    )
    report_to: str = track.report_to_option()

    @property
    def vocab_size(self) -> int | None:
        """The `--vocab N` cap (None for task or none)."""
        return int(self.vocab) if self.vocab.isdigit() else None

    def _check_vocab(self) -> None:
        """none, task or a positive count; and (for now) a stage of its own."""
        check_choice("compress", "vocab_head", self.vocab_head, ("all", "labels"))
        check_choice("compress", "vocab_oov", self.vocab_oov, ("unk", "nearest"))
        for key, default in (("vocab_head", "all"), ("vocab_oov", "unk")):
            if self.vocab == "none" and getattr(self, key) != default:
                raise ConfigError(
                    f"{key}={getattr(self, key)} is not used without --vocab; add --vocab "
                    f"task or drop {key}"
                )
        if self.vocab not in ("none", "task") and not (
            self.vocab.isdigit() and int(self.vocab) > 0
        ):
            raise ConfigError(
                f"vocab: {self.vocab!r} is not none, task or a positive token count; e.g. "
                "--vocab task or --vocab 4000"
            )
        others = [
            flag
            for flag, on in (
                ("--prune", self.prune.requested),
                ("--quantize int8-dynamic", self.quantize == "int8-dynamic"),
                ("recover.method", self.recover.method != "none"),
            )
            if on
        ]
        if self.vocab != "none" and others:
            raise ConfigError(
                f"--vocab cannot be combined with {others[0]} in one run (only --quantize "
                f"int8 follows it); drop {others[0]}, or run --prune (uniform widths) first "
                "and --vocab on its DIR/model"
            )
        if self.vocab != "none" and self.quantize == "int8" and self.vocab_head == "labels":
            raise ConfigError(
                "--vocab-head labels with --quantize int8: the int8 folder rebuilds the head "
                "from the kept vocabulary, so a label-only head cannot be stored in it yet; "
                "use --vocab-head all, or drop --quantize int8"
            )

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        self._check_vocab()
        track.names(self.report_to)  # an unknown tracker fails here, with the closest
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        check_choice("compress", "quantize", self.quantize, QUANTIZE)
        self._check_recover()
        if not self.prune.requested and self.quantize == "none" and self.vocab == "none":
            raise ConfigError(
                "compress: nothing to do (prune.ratio=0, quantize=none, vocab=none); give "
                "--prune R, --quantize int8 and/or --vocab task"
            )
        unused = [  # every prune setting but those that ask for pruning acts only then
            f.name
            for f in dataclasses.fields(PruneConfig)
            if f.name not in ("ratio", "layer_ratios")
            and getattr(self.prune, f.name) != getattr(PruneConfig, f.name)
        ]
        if self.quantize == "int8-dynamic":  # smoothing calibrates on prune.calib rows
            unused = [k for k in unused if k != "calib"]
        calib_unread = self.prune.importance == "magnitude" and self.quantize != "int8-dynamic"
        if calib_unread and self.prune.calib != PruneConfig.calib:
            raise ConfigError(
                f"prune.calib={self.prune.calib} is not used by prune.importance=magnitude "
                "(it reads weights only); drop --calib, or use --importance activation|taylor"
            )
        if not self.prune.requested and unused:
            raise ConfigError(
                f"prune.{unused[0]} is not used without pruning (prune.ratio=0); add "
                f"--prune R, e.g. --prune 0.3, or drop the prune.{unused[0]} setting"
            )

    def _check_recover(self) -> None:
        """Recovery needs something to recover from, and a mapped adapter keeps its rank."""
        if self.recover.method == "none":
            return
        if not self.prune.requested:
            raise ConfigError(
                f"recover.method={self.recover.method} with prune.ratio=0 would fine-tune an "
                "unpruned model; use edgetune finetune for that, or add --prune R"
            )
        if self.adapter and self.recover.rank != RecoverConfig.rank:
            raise ConfigError(
                f"recover.rank={self.recover.rank} is not used: recovery continues from the "
                "mapped --adapter, which keeps its own rank; drop recover.rank"
            )


def run(cfg: CompressConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Prune, recover and/or quantize `cfg.model`, write the run directory `cfg.out`;
    returns the summary. With `overwrite`, a run already in `cfg.out` (finished or
    interrupted) is replaced, and only once every input has been checked. There is no
    --resume: the stages keep no checkpoints, so an interrupted run starts over.

    With `cfg.adapter` from a finetune or federate run, the task settings left at their
    defaults (dataset, labels, verbalizer, template...) are the run's (`data.recorded`).

    Raises:
        EdgetuneError: --out holds a run, too few calibration rows, an unsupported
            architecture, a model that is already int8, a ratio that empties a layer, an
            adapter of another model, or a task setting that contradicts the adapter's
            run; all before the run folder is created.
    """
    start = time.perf_counter()
    track.require(cfg.report_to)  # a missing tracker package stops here, before any work
    if (Path(cfg.out) / "metrics.jsonl").exists() and not overwrite:
        raise ConfigError(
            f"{cfg.out} already holds a run (finished or interrupted); pass --overwrite to "
            f"replace it, or another --out"
        )
    check_out(cfg.out)  # before importance is scored
    if cfg.adapter:  # scored with the labels, verbalizer and template it was trained on
        cfg = dataclasses.replace(cfg, data=with_recorded_task(cfg.data, cfg.adapter))
    console.status(f"loading model {cfg.model} and data {cfg.data.dataset}", cfg.progress)
    model, tokenizer = models.load(cfg.model)
    # vocabulary pruning reads only the embedding and the head (and refuses --prune and
    # --quantize beside it); the other stages need their layers
    if cfg.vocab == "none" and (cfg.prune.requested or cfg.quantize == "int8-dynamic"):
        llama_layers(model)  # an unsupported architecture stops here, before DIR exists
    elif cfg.quantize == "int8":
        _refuse_conv1d(model)
    _refuse_int8_input(model, cfg)
    _refuse_vocab_input(model, cfg)
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    if cfg.vocab_head == "labels" and not isinstance(task, ClassificationTask):
        raise ConfigError(
            f"--vocab-head labels keeps a classifier's label tokens, and the {task.name} task "
            "has none (it scores every next token); use --vocab-head all"
        )
    eval_rows = task.prepare_rows(splits.eval)
    train_rows = task.prepare_rows(splits.train)
    pruning = cfg.prune.requested
    dynamic = cfg.quantize == "int8-dynamic"
    calib_rows = train_rows[: cfg.prune.calib] if pruning or dynamic else []
    calibrates = dynamic or (pruning and cfg.prune.importance != "magnitude")
    if calibrates and len(calib_rows) < cfg.prune.calib:
        raise ConfigError(
            f"prune.calib={cfg.prune.calib} but the training split has {len(calib_rows)} "
            f"rows; lower --calib to {len(calib_rows)} or raise data.train_size"
        )
    scored = load_adapter(models.load(cfg.model)[0], cfg.adapter) if cfg.adapter else model
    teacher = _teacher(cfg, scored, tokenizer, model.config.vocab_size)
    # a ratio too high stops here
    kept, rounded = _select(model, task, calib_rows, cfg) if pruning else (None, None)
    rundir = RunDir(cfg.out, overwrite=overwrite)  # the old run goes only now
    rundir.write_config(to_dict(cfg))
    rundir.track(cfg.report_to, to_dict(cfg))

    console.status("evaluating before compression", cfg.progress)
    before = {**_evaluate(scored, task, eval_rows, cfg), **_speed(model, cfg.seed)}
    rundir.log({"stage": "before", **before["metrics"]})
    stages: dict[str, dict] = {}
    params_before = _params(model)
    recovered = None
    if cfg.vocab != "none":
        scored, stages["after-vocab"] = _vocab_stage(
            model, tokenizer, task, train_rows, eval_rows, rundir, cfg
        )
    if pruning:
        del scored
        scored, adapter_dir, stages["after-prune"] = _prune_stage(
            model, tokenizer, kept, task, calib_rows, eval_rows, rundir, cfg
        )
    if cfg.recover.method != "none":
        store = teacher_logits(cfg.recover, teacher, task, train_rows) if teacher else None
        del teacher  # with recover.teacher_cache the store holds the only logits needed
        base = scored.unload() if cfg.adapter else model
        adapter, recovered = recover(
            base, adapter_dir, store, task, train_rows, rundir, cfg.recover, cfg.seed, cfg.progress
        )
        console.status("evaluating after recovery", cfg.progress)
        recovered["metrics"] = _evaluate(adapter.model, task, eval_rows, cfg)["metrics"]
        rundir.log({"stage": "after-recover", **recovered["metrics"]})
        # LoRA merges into weights of the same shapes: the speed is the pruned model's
        speed = {k: stages["after-prune"][k] for k in ("prefill_ms", "decode_tokens_per_s")}
        stages["after-recover"] = {"metrics": recovered["metrics"], **speed}
        scored = adapter.model
    params_after = _params(model)
    if cfg.quantize == "int8":
        stages["after-quantize"] = _quantize_stage(scored, tokenizer, task, eval_rows, rundir, cfg)
    elif dynamic:
        stages["after-quantize"] = _quantize_dynamic_stage(
            scored, tokenizer, task, calib_rows, eval_rows, rundir, cfg
        )
    folder = rundir.path / "model"
    summary = {
        "command": "compress",
        "model": cfg.model,
        "adapter": cfg.adapter or None,
        "prune": _prune_summary(cfg.prune, kept, model) if pruning else None,
        "heads_rounded": rounded,
        "params_before": params_before,
        "params_after": params_after,
        "model_bytes_before": _folder_bytes(models.resolve(cfg.model)[0]),
        "model_bytes_after": _folder_bytes(folder),
        "eval_examples": len(eval_rows),
        "before": before,
        **stages,
        "after": stages[list(stages)[-1]],
        "recover": recovered,
        "peak_rss_mb": peak_rss_mb(),
        "wall_s": time.perf_counter() - start,
    }
    rundir.write_summary(summary)
    return summary


def _prune_summary(prune_cfg: PruneConfig, kept: Any, model: Any) -> dict[str, Any]:
    """The prune settings with what survived: kv groups, layers and per-layer widths."""
    return {
        **to_dict(prune_cfg),
        "kept_kv_groups": len(kept.kv_groups[kept.kept_layers[0]]),
        "kept_layers": list(kept.kept_layers),
        "layer_widths": layer_widths(model),
    }


def _refuse_int8_input(model: Any, cfg: CompressConfig) -> None:
    """An int8 model (a compress output) can be neither pruned nor quantized again."""
    if is_dynamic_int8(model) or any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ConfigError(
            f"{cfg.model} is already an int8 model; compress the fp32 model it came from "
            "(prune and quantize in one run: --prune R --quantize int8)"
        )


def _refuse_vocab_input(model: Any, cfg: CompressConfig) -> None:
    """A vocabulary-pruned model is final; per-layer widths cannot be vocabulary-pruned."""
    if is_vocab_pruned(model):
        raise ConfigError(
            f"{cfg.model} is already vocabulary-pruned (it has {VOCAB_MAP}); compress the "
            "model it came from (structured pruning first, then --vocab)"
        )
    if cfg.vocab != "none" and getattr(model.config, "edgetune_layer_widths", None):
        raise ConfigError(
            f"{cfg.model} has per-layer widths, whose loader does not map token ids; prune "
            "the vocabulary of a model with uniform widths (prune.ranking=layer)"
        )


def _vocab_stage(
    model: Any,
    tokenizer: Any,
    task: Any,
    train_rows: list[dict],
    rows: list[dict],
    rundir: RunDir,
    cfg: CompressConfig,
) -> dict:
    """Keep the task's tokens (`compress/vocab.py`), save DIR/model with its id map (and
    the adapter, re-based, as DIR/adapter), evaluate with the map at the edge.

    Returns:
        (the mapped model, with its re-based adapter when there is one; the stage result:
        metrics, speed, and the vocabulary kept).
    """
    labels = task.verbalizer_ids if isinstance(task, ClassificationTask) else []
    counts = token_counts(_calib_batches(task, train_rows, cfg.batch_size))
    original = model.config.vocab_size
    required = required_ids(tokenizer, model.config, labels)
    kept = select_vocab(counts, required, cfg.vocab_size, original)
    head = sorted(labels) if cfg.vocab_head == "labels" else None
    embedding = model.get_input_embeddings().weight
    nearest = nearest_kept(embedding, kept) if cfg.vocab_oov == "nearest" else None
    vmap = VocabMap(kept, original, oov_token_id(tokenizer), head, nearest)
    console.status(f"keeping {len(kept)} of {original} tokens", cfg.progress)
    shrink(model, kept, head)
    folder = rundir.path / "model"
    save_pruned(model, tokenizer, folder, vmap)
    attach_map(model, vmap)
    scored = model
    if cfg.adapter:
        adapter = map_adapter(Path(cfg.adapter), rundir.path / "adapter", folder)
        scored = load_adapter(model, str(adapter))
    console.status("evaluating after vocabulary pruning", cfg.progress)
    after = {**_evaluate(scored, task, rows, cfg), **_speed(model, cfg.seed)}
    rundir.log({"stage": "after-vocab", **after["metrics"]})
    unused = len([i for i in counts if i < original]) - len(set(counts) & set(kept))
    vocab = {
        "kept": len(kept),
        "original": original,
        "head_rows": len(vmap.head_ids),
        "oov_id": vmap.oov_id,
        "oov": cfg.vocab_oov,
        "dropped_used": unused,
    }
    return scored, {**after, "vocab": vocab}


def _prune_stage(
    model: Any,
    tokenizer: Any,
    kept: Any,
    task: Any,
    calib_rows: list[dict],
    rows: list[dict],
    rundir: RunDir,
    cfg: CompressConfig,
) -> tuple[Any, Path | None, dict]:
    """(Compensate and) prune `model` in place, save DIR/model (and the mapped
    DIR/adapter), evaluate.

    Returns:
        (the pruned model, wrapped with its mapped adapter when there is one; the mapped
        adapter's folder or None; the stage result: metrics and speed of the bare pruned
        model).
    """
    unpruned_config = copy.deepcopy(model.config)
    if cfg.prune.bias_compensation:
        _compensate(model, kept, task, calib_rows, cfg)
    prune(model, kept)
    folder = rundir.path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    speed_after = _speed(model, cfg.seed)  # of the bare model, as before pruning
    scored, adapter_dir = model, None
    if cfg.adapter:
        adapter_dir = map_adapter_folder(
            cfg.adapter, rundir.path / "adapter", kept, unpruned_config, base_model=folder
        )
        scored = load_adapter(model, str(adapter_dir))
    console.status("evaluating after pruning", cfg.progress)
    after = {**_evaluate(scored, task, rows, cfg), **speed_after}
    rundir.log({"stage": "after-prune", **after["metrics"]})
    return scored, adapter_dir, after


def _refuse_conv1d(model: Any) -> None:
    """int8 replaces `nn.Linear` layers; GPT-2's projections are transformers' `Conv1D`
    (weight [in, out]), which it would leave fp32 while reporting the model quantized."""
    conv = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_conv1d(m)})
    if conv:
        raise ConfigError(
            f"compress --quantize int8: this model's projections {conv} are transformers' "
            "Conv1D layers (GPT-2's [in, out] weight layout), which edgetune's int8 layer "
            "does not replace; quantize a model whose projections are nn.Linear"
        )


def _quantize_stage(
    scored: Any, tokenizer: Any, task: Any, rows: list[dict], rundir: RunDir, cfg: CompressConfig
) -> dict:
    """Merge the adapter (if any) into the fp32 weights, quantize to int8, save DIR/model
    in the int8 folder format (replacing a pruned fp32 model there and the adapter folder
    merged into it), evaluate.

    Returns:
        The stage result: metrics, speed, linear weight bytes before and after, the size
        of DIR/model on disk, and whether an adapter was merged into it.
    """
    merged = hasattr(scored, "merge_and_unload")  # a PEFT model: a given or recovered adapter
    model = scored.merge_and_unload() if merged else scored
    bytes_before = linear_weight_bytes(model)
    release_file_pages(quantize_int8(model))
    folder = rundir.path / "model"
    (folder / "model.safetensors").unlink(missing_ok=True)
    with unmapped(model):  # a vocabulary-pruned model is stored in its kept id space
        save_int8(model, folder)
    tokenizer.save_pretrained(folder)
    # the adapter is in DIR/model now; kept beside it, it would fit no saved model
    shutil.rmtree(rundir.path / "adapter", ignore_errors=True)
    return _quantized(model, task, rows, rundir, cfg, merged, bytes_before)


def _quantize_dynamic_stage(
    scored: Any,
    tokenizer: Any,
    task: Any,
    calib_rows: list[dict],
    rows: list[dict],
    rundir: RunDir,
    cfg: CompressConfig,
) -> dict:
    """Merge the adapter (if any), smooth on the calibration rows, save the smoothed fp32
    model to DIR/model (it loads as dynamic int8 with edgetune), quantize, evaluate.

    Returns:
        The stage result: metrics, speed, linear weight bytes before and after (in memory;
        the file stays fp32) and the size of DIR/model on disk.
    """
    merged = hasattr(scored, "merge_and_unload")
    model = scored.merge_and_unload() if merged else scored
    bytes_before = linear_weight_bytes(model)
    console.status(f"smoothing on {len(calib_rows)} calibration rows", cfg.progress)
    smooth(model, activation_maxima(model, _calib_batches(task, calib_rows, cfg.batch_size)))
    folder = rundir.path / "model"
    save_int8_dynamic(model, folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(rundir.path / "adapter", ignore_errors=True)
    quantize_dynamic_int8(model)
    return {
        **_quantized(model, task, rows, rundir, cfg, merged, bytes_before),
        "weights_on_disk": "fp32 (smoothed); edgetune.models.load quantizes them to int8",
    }


def _quantized(
    model: Any,
    task: Any,
    rows: list[dict],
    rundir: RunDir,
    cfg: CompressConfig,
    merged: bool,
    bytes_before: int,
) -> dict:
    """Evaluate and time the quantized `model`, log "after-quantize"; the stage result."""
    console.status(f"evaluating after {cfg.quantize} quantization", cfg.progress)
    after = {**_evaluate(model, task, rows, cfg), **_speed(model, cfg.seed)}
    rundir.log({"stage": "after-quantize", **after["metrics"]})
    weights = dynamic_weight_bytes if cfg.quantize == "int8-dynamic" else linear_weight_bytes
    return {
        **after,
        "method": cfg.quantize,
        "adapter_merged": merged,
        "linear_weight_bytes_before": bytes_before,
        "linear_weight_bytes_after": weights(model),
        "model_mb": (_folder_bytes(rundir.path / "model") or 0) / 2**20,
    }


def _teacher(cfg: CompressConfig, unpruned: Any, tokenizer: Any, vocab_size: int) -> Any:
    """The distillation teacher (None without --distill): recover.teacher, else a frozen
    unpruned copy of the model with its adapter (`unpruned` when an adapter was given:
    the model itself is about to be pruned in place)."""
    if not cfg.recover.distill:
        return None
    if cfg.recover.teacher:
        return load_teacher(cfg.recover, tokenizer, vocab_size)
    teacher = unpruned if cfg.adapter else models.load(cfg.model)[0]
    return teacher.requires_grad_(False)


def _select(model: Any, task: Any, rows: list[dict], cfg: CompressConfig) -> tuple[Any, Any]:
    """(the kept units, the head rounding select_kept applied or None); warns of rounding."""
    say = f"scoring {cfg.prune.importance} importance on {len(rows)} calibration rows"
    console.status(say, cfg.progress)
    scores = _scores(model, task, rows, cfg)
    p = cfg.prune
    kept = select_kept(scores, p.ratio, p.unit_list, p.layer_ratios, p.ranking)
    rounded = _head_rounding(scores, kept, cfg.prune)
    if rounded:
        console.status(f"warning: {rounded['message']}")
    return kept, rounded


def _scores(model: Any, task: Any, rows: list[dict], cfg: CompressConfig) -> Any:
    """Unit importance of `cfg.prune.importance` from calibration batches of `rows`."""
    if cfg.prune.importance == "magnitude":
        return magnitude_scores(model)
    batches = _calib_batches(task, rows, cfg.batch_size)
    if cfg.prune.importance == "taylor":
        return taylor_scores(model, batches)
    return activation_scores(model, batches)


def _calib_batches(task: Any, rows: list[dict], batch_size: int) -> list[dict[str, Any]]:
    """Model inputs (no labels) of the calibration rows, `batch_size` at a time."""
    return [
        {k: v for k, v in task.collate(rows[i : i + batch_size]).items() if k != "labels"}
        for i in range(0, len(rows), batch_size)
    ]


def _compensate(model: Any, kept: Any, task: Any, rows: list[dict], cfg: CompressConfig) -> None:
    """FLAP bias compensation of the unpruned `model` for the units `kept` removes."""
    console.status(f"bias compensation on {len(rows)} calibration rows", cfg.progress)
    compensate(model, kept, input_means(model, _calib_batches(task, rows, cfg.batch_size)))


def _head_rounding(scores: Any, kept: Any, prune_cfg: PruneConfig) -> dict[str, Any] | None:
    """What select_kept did to the requested key/value group count (None = kept as asked)."""
    per_layer = prune_cfg.layer_ratios is not None or prune_cfg.ranking == "global"
    if "heads" not in prune_cfg.unit_list or per_layer:
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


def _speed(model: Any, seed: int) -> dict[str, float]:
    """Median prefill latency (batch 1 x PREFILL_TOKENS) and greedy decode tokens/s."""
    return measure_speed(model, prefill_ids(model.config.vocab_size, seed), SPEED_REPEATS)


def _folder_bytes(folder: Path | str) -> int | None:
    """Size on disk of a model folder's files (weights, config, tokenizer); None for a hub
    id, which has no local folder."""
    if not isinstance(folder, Path):
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _params(model: Any) -> int:
    """Parameters of the model itself: a PEFT adapter loaded into it (in place, by the
    prune and vocabulary stages) is not counted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = {
        id(p)
        for m in model.modules()
        if isinstance(m, BaseTunerLayer)
        for name in m.adapter_layer_names
        for p in getattr(m, name).parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in adapter)
