"""The model-family matrix: one row per architecture family and stage, each either working
(checked on values: parity with a reference, a loss that moved, a smaller model that
loads) or refused up front with a message that names what is missing.

Every family is a tiny random model (`models.tiny.TINY_FAMILIES`: 4 blocks, hidden 64)
saved with stories260K's tokenizer, trained and evaluated on a few SST-2 rows. `EXPECTED`
is the matrix; a cell is "ok" or a piece of the refusal's message.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgetune import models
from edgetune.errors import ConfigError
from edgetune.models.tiny import TINY_FAMILIES, tiny_causal_lm
from edgetune.peft import PeftConfig, attach
from edgetune.peft.targets import DEFAULT_TARGETS, is_conv1d, model_type
from edgetune.train.trunk import resolve_trunk

FAMILIES = tuple(TINY_FAMILIES)
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
STAGES = (
    "lora",
    "finetune-fo",
    "finetune-zo",
    "finetune-prge",
    "trunk",
    "fedit",
    "fedkseed",
    "fedspine",
    "prune",
    "int8",
    "export-onnx",
    "export-executorch",
    "export-gguf",
    "ondevice",
)
NO_LLAMA_LAYOUT = {
    "phi3": "lacks self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, mlp.gate_proj",
    "gpt2": "has no model.layers",
    "opt": "has no model.layers",
}
NO_EXPORT = "edgetune exports Llama-family causal LMs"


def _expected(family: str, stage: str) -> str:
    """The matrix cell: "ok", or a piece of the refusal's message."""
    if stage == "trunk" and family in ("gpt2", "opt"):
        return "learned position embeddings"
    if stage in ("fedspine", "prune") and family in NO_LLAMA_LAYOUT:
        return NO_LLAMA_LAYOUT[family]
    if stage == "int8" and family == "gpt2":
        return "are transformers' Conv1D layers"
    if (stage.startswith("export") or stage == "ondevice") and family not in LLAMA_LIKE:
        return NO_EXPORT
    return "ok"


EXPECTED = {(f, s): _expected(f, s) for f in FAMILIES for s in STAGES}
# Rows that take more than a few seconds: an export runs the exporter and checks the
# graph in its runtime (20-50 s on a shared core, ExecuTorch's lowering 2-4 minutes);
# ondevice needs the ONNX export.
SLOW = {"export-onnx", "export-executorch", "export-gguf", "ondevice"}
# llama.cpp's GELU (Gemma 3's MLP) reads an fp16 table: with the adapter it moves the tiny
# Gemma 3's logits by 1.6e-3 (5e-5 against a PyTorch GELU rounded to fp16 the same way).
GGUF_PARITY = {"gemma3": 5e-3}


# ExecuTorch's lowering takes minutes a family: it runs on the two whose blocks differ
# most from Llama's (Qwen3's q/k norms, Gemma 3's four norms and mixed attention); the
# ONNX rows check every family's graph, and tests/export Llama's ExecuTorch program.
EXECUTORCH_RUN = {"qwen3", "gemma3"}


def _rows(*stages: str) -> list:
    rows = []
    for family in FAMILIES:
        for stage in stages:
            ok = EXPECTED[family, stage] == "ok"
            if stage == "export-executorch" and ok and family not in EXECUTORCH_RUN:
                continue
            slow = stage in SLOW and ok
            marks = [pytest.mark.slow] if slow else []
            rows.append(pytest.param(family, stage, id=f"{family}-{stage}", marks=marks))
    return rows


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory, stories260k_path):
    """`folder(family)`: the family's tiny model saved with stories260K's tokenizer files."""
    from transformers import AutoTokenizer

    made: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(stories260k_path / name, path / name)
            tiny_causal_lm(family).save_pretrained(path)
            # transformers picks the tokenizer class by the folder's model_type: Qwen2's
            # adds its own end-of-text token after stories260K's 512, which the embedding
            # must hold.
            rows = len(AutoTokenizer.from_pretrained(path))
            if rows > 512:
                tiny_causal_lm(family, vocab_size=rows).save_pretrained(path)
            made[family] = path
        return made[family]

    return folder


def _refused(run, expected: str, capsys) -> None:
    """`run()` exits 2 (or raises ConfigError) with `expected` in its message."""
    try:
        code = run()
    except ConfigError as exc:
        message = str(exc)
    else:
        assert code == 2
        message = capsys.readouterr().err
        assert "Traceback" not in message
    assert expected in message, message


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _randomize_lora_b(model: torch.nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _batch(length: int = 12) -> dict[str, torch.Tensor]:
    """Two rows, the second left-padded by 3 (longer than Gemma 3's window of 4)."""
    ids = torch.randint(3, 500, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------- LoRA: default targets


@pytest.mark.parametrize("family, stage", _rows("lora"))
def test_lora_on_default_targets_equals_a_hand_merged_model(family, stage):
    # Prepare: LoRA on the family's default projections, B non-zero
    assert EXPECTED[family, stage] == "ok"
    adapter = attach(tiny_causal_lm(family, seed=2), PeftConfig(rank=4, alpha=8.0), seed=0)
    _randomize_lora_b(adapter.model)
    batch = _batch()
    # Execute: the reference writes W + (alpha / r) B A (transposed for Conv1D) into a
    # fresh copy of the base model
    reference = tiny_causal_lm(family, seed=2)
    params = dict(adapter.model.named_parameters())
    adapted = set()
    with torch.no_grad():
        for name, module in reference.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in DEFAULT_TARGETS[model_type(reference)]:
                continue
            prefix = f"base_model.model.{name}"
            delta = (
                params[f"{prefix}.lora_B.default.weight"]
                @ params[f"{prefix}.lora_A.default.weight"]
            )
            module.weight.add_(delta.t() if is_conv1d(module) else delta, alpha=8.0 / 4)
            adapted.add(leaf)
        got = adapter.model(**batch).logits
        want = reference(**batch).logits
        base = tiny_causal_lm(family, seed=2)(**batch).logits
    # Assert: every default target exists and is adapted; the adapter equals the merge
    assert adapted == set(DEFAULT_TARGETS[model_type(reference)])
    real = batch["attention_mask"].bool()
    assert (got - want)[real].abs().max().item() < 1e-5
    assert (want - base)[real].abs().max().item() > 1e-3


def test_a_family_without_default_targets_is_refused_naming_its_linear_layers():
    model = tiny_causal_lm("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match=r"no default LoRA targets for model_type 'mystery'"):
        attach(model, PeftConfig(), seed=0)


# ---------------------------------------------------------------- finetune


def _finetune(folder: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(folder), "--dataset", "sst2", "--method", method,
        "--steps", "2", "--batch-size", "4", "--out", str(out), "data.train_size=16",
        "data.eval_size=8", "data.max_length=32", "train.progress=false", "train.keep=last",
        "train.guard=false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("family, stage", _rows("finetune-fo", "finetune-zo", "finetune-prge"))
def test_finetune(family, stage, family_folder, tmp_path, cli):
    # Execute: two steps of the method on the family's default LoRA
    assert EXPECTED[family, stage] == "ok"
    method = stage.split("-")[1]
    assert cli(_finetune(family_folder(family), tmp_path / "run", method)) == 0
    # Assert: finite losses, and the saved adapter moved off its no-op start (B = 0)
    losses = [r["loss"] for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = [t for n, t in saved.items() if "lora_B" in n]
    assert b and any(t.abs().max().item() > 0 for t in b)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    targets = set(DEFAULT_TARGETS[models.load(str(family_folder(family)))[0].config.model_type])
    assert set(config["target_modules"]) == targets


# ---------------------------------------------------------------- shared trunk


@pytest.mark.parametrize("family, stage", _rows("trunk"))
def test_shared_trunk_equals_full_depth(family, stage, capsys):
    # Prepare: LoRA on the top 2 of 4 blocks, the bottom 2 asked to run once per batch
    adapter = attach(tiny_causal_lm(family), PeftConfig(rank=2, layers="top:2"), seed=0)
    _randomize_lora_b(adapter.model)
    expected = EXPECTED[family, stage]
    if expected != "ok":
        _refused(lambda: resolve_trunk("2", adapter.model), expected, capsys)
        # auto runs full depth, and says so
        assert not resolve_trunk("auto", adapter.model).shared
        assert "train.trunk=auto: the frozen bottom blocks" in capsys.readouterr().err
        return
    trunk = resolve_trunk("2", adapter.model)
    batch = _batch(16)
    # Execute: full depth, and the top blocks on the trunk's states repeated for 2 copies
    with torch.no_grad():
        full = adapter.model(**batch).logits
        hidden = trunk.hidden(batch)
        with trunk.top(hidden):
            twice = {k: v.repeat(2, 1) for k, v in batch.items()}
            cut = adapter.model(**twice).logits
    # Assert
    assert trunk.cut == 2
    real = batch["attention_mask"].bool()
    for copy in cut.chunk(2):
        assert (copy - full)[real].abs().max().item() < 1e-5


# ---------------------------------------------------------------- federation


def _federate(folder: Path, out: Path, algorithm: str) -> list[str]:
    spine = ["--target-sparsity", "0.5", "spine.ramp=0.5", "--fleet", "mixed"]
    fleet = spine if algorithm == "fedspine" else ["--fleet", "jetsons"]
    return [
        "federate", "--model", str(folder), "--dataset", "sst2", "--algorithm", algorithm,
        "--clients", "2", "--participation", "1.0", "--rounds", "1", "--local-steps", "2",
        "--batch-size", "4", "--out", str(out), "data.train_size=16", "data.eval_size=8",
        "data.max_length=32", *fleet,
    ]  # fmt: skip


@pytest.mark.parametrize("family, stage", _rows("fedit", "fedkseed", "fedspine"))
def test_federate_one_round(family, stage, family_folder, tmp_path, cli, capsys):
    args = _federate(family_folder(family), tmp_path / "run", stage)
    expected = EXPECTED[family, stage]
    if expected != "ok":
        _refused(lambda: cli(args), expected, capsys)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        return
    # Execute
    assert cli(args) == 0
    # Assert: one round, both clients accepted, a finite loss, bytes both ways
    (round_one,) = [r for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if r["round"] == 1]
    assert round_one["accepted"] == 2 and math.isfinite(round_one["loss"])
    assert round_one["bytes_up"] > 0 and round_one["bytes_down"] > 0
    assert math.isfinite(round_one["eval/loss"])


# ---------------------------------------------------------------- compress


def _compress(folder: Path, out: Path, *what: str) -> list[str]:
    return [
        "compress", "--model", str(folder), "--dataset", "sst2", "--out", str(out),
        "data.train_size=16", "data.eval_size=8", "data.max_length=32", "progress=false",
        *what,
    ]  # fmt: skip


@pytest.mark.parametrize("family, stage", _rows("prune", "int8"))
def test_compress(family, stage, family_folder, tmp_path, cli, capsys):
    what = ["--prune", "0.5", "--calib", "4"] if stage == "prune" else ["--quantize", "int8"]
    args = _compress(family_folder(family), tmp_path / "run", *what)
    expected = EXPECTED[family, stage]
    if expected != "ok":
        _refused(lambda: cli(args), expected, capsys)
        assert not (tmp_path / "run").exists()
        return
    # Execute
    assert cli(args) == 0
    # Assert: the saved model loads with edgetune and is smaller; pruned: fewer
    # parameters; int8: logits near the fp32 model's
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model_bytes_after"] < summary["model_bytes_before"]
    small, _ = models.load(str(tmp_path / "run" / "model"))
    original, _ = models.load(str(family_folder(family)))
    batch = _batch()
    with torch.no_grad():
        got, want = small(**batch).logits, original(**batch).logits
    assert torch.isfinite(got).all()
    if stage == "prune":
        assert summary["params_after"] < summary["params_before"]
    else:
        real = batch["attention_mask"].bool()
        error = (got - want)[real].abs().max().item()
        assert 0 < error < 0.05 * want[real].abs().max().item()


# ---------------------------------------------------------------- export and on-device


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, family_folder):
    """`export(family)`: the family exported to ONNX with rank-2 LoRA inputs on its
    default targets (made once per family)."""
    from edgetune.cli import main

    made: dict[str, tuple[int, Path]] = {}

    def export(family: str) -> tuple[int, Path]:
        if family not in made:
            out = tmp_path_factory.mktemp(f"onnx-{family}") / "export"
            args = ["export", "--model", str(family_folder(family)), "--format", "onnx",
                    "--lora-rank", "2", "--out", str(out), "--threads", "1"]  # fmt: skip
            made[family] = (main(args), out)
        return made[family]

    return export


@pytest.mark.parametrize("family, stage", _rows("export-onnx"))
def test_export_onnx_runs_the_adapter_as_pytorch_does(
    family, stage, onnx_export, family_folder, capsys
):
    from edgetune.export.manifest import read_manifest
    from edgetune.export.onnx import OrtSession

    expected = EXPECTED[family, stage]
    if expected != "ok":
        _refused(lambda: onnx_export(family)[0], expected, capsys)
        return
    # Prepare: a PEFT LoRA on the default targets with a random B
    code, out = onnx_export(family)
    assert code == 0
    model, _ = models.load(str(family_folder(family)))
    adapter = attach(model, PeftConfig(rank=2), seed=1)
    _randomize_lora_b(adapter.model)
    manifest = read_manifest(out)
    params = dict(adapter.model.named_parameters())
    lora = []
    for slot in manifest.slots:
        lora += [
            params[slot.peft_a].detach()[None].numpy(),
            params[slot.peft_b].detach()[None].numpy(),
        ]
    batch = _batch()
    # Execute: ONNX Runtime with the adapter as inputs, PyTorch with it attached
    session = OrtSession(out / "model.onnx", threads=1)
    got = session.run(
        [batch["input_ids"][None].numpy(), batch["attention_mask"][None].numpy(), *lora]
    )
    with torch.no_grad():
        want = adapter.model(**batch).logits.numpy()
    # Assert: every default target is an input, and the logits agree on real tokens
    assert {s.module.rsplit(".", 1)[-1] for s in manifest.slots} == set(
        DEFAULT_TARGETS[model.config.model_type]
    )
    real = batch["attention_mask"].bool().numpy()
    assert np.abs(got[0][real] - want[real]).max() < 1e-4


@pytest.mark.parametrize("family, stage", _rows("export-executorch"))
def test_export_executorch_matches_pytorch_in_its_runtime(
    family, stage, family_folder, tmp_path, cli, capsys
):
    args = ["export", "--model", str(family_folder(family)), "--format", "executorch",
            "--lora-rank", "2", "--out", str(tmp_path / "pte"), "--threads", "1"]  # fmt: skip
    expected = EXPECTED[family, stage]
    if expected != "ok":
        _refused(lambda: cli(args), expected, capsys)
        assert not (tmp_path / "pte").exists()
        return
    pytest.importorskip("executorch.runtime")
    # Execute: the export runs the program in ExecuTorch on random adapters of a trained
    # LoRA's scale and compares with PyTorch
    assert cli(args) == 0
    # Assert: every default target is an input, the linears went to XNNPACK, logits agree
    manifest = json.loads((tmp_path / "pte" / "export.json").read_text())
    targets = {s["module"].rsplit(".", 1)[-1] for s in manifest["slots"]}
    assert targets == set(
        DEFAULT_TARGETS[models.load(str(family_folder(family)))[0].config.model_type]
    )
    assert manifest["facts"]["xnnpack"] and manifest["facts"]["delegated_nodes"] > 0
    assert manifest["facts"]["parity_max_abs"] < 1e-4


@pytest.mark.parametrize("family, stage", _rows("export-gguf"))
def test_export_gguf_with_its_adapter_runs_in_llama_cpp(
    family, stage, family_folder, tmp_path, cli, capsys
):
    # Prepare: a LoRA on the default targets with a random B, saved as PEFT saves it
    folder = family_folder(family)
    adapter = attach(models.load(str(folder))[0], PeftConfig(rank=2), seed=1)
    _randomize_lora_b(adapter.model)
    adapter.model.save_pretrained(tmp_path / "adapter")
    args = ["export", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
            "--format", "gguf", "--out", str(tmp_path / "gguf"), "--threads", "1"]  # fmt: skip
    expected = EXPECTED[family, stage]
    if expected != "ok":
        _refused(lambda: cli(args), expected, capsys)
        assert not (tmp_path / "gguf").exists()
        return
    pytest.importorskip("llama_cpp")
    # Execute: the export checks llama.cpp's logits (base + adapter GGUF) against PyTorch's
    assert cli(args) == 0
    # Assert
    manifest = json.loads((tmp_path / "gguf" / "export.json").read_text())
    assert manifest["files"]["adapter"].endswith(".gguf")
    assert manifest["facts"]["parity_max_abs"] < GGUF_PARITY.get(family, 1e-3)
    assert manifest["facts"]["parity_top1_agreement"] == 1.0


def test_export_gguf_refuses_a_gemma3_that_llama_cpp_would_run_differently(
    stories260k_path, tmp_path, cli, capsys
):
    # Prepare: attention scaled by 256, where llama.cpp's gemma3 scales by head_dim (16)
    folder = tmp_path / "gemma3"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k_path / name, folder / name)
    tiny_causal_lm("gemma3", query_pre_attn_scalar=256).save_pretrained(folder)
    args = ["export", "--model", str(folder), "--format", "gguf", "--out",
            str(tmp_path / "gguf"), "--threads", "1"]  # fmt: skip
    # Execute, assert: exit 2 naming the setting and llama.cpp's value, nothing written
    _refused(lambda: cli(args), "query_pre_attn_scalar=256, but llama.cpp", capsys)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("family, stage", _rows("ondevice"))
def test_ondevice_zo_through_onnx_runtime(
    family, stage, onnx_export, family_folder, tmp_path, cli, capsys
):
    expected = EXPECTED[family, stage]
    if expected != "ok":  # no graph to run: the export that would make it is refused
        args = ["export", "--model", str(family_folder(family)), "--format", "onnx",
                "--lora-rank", "2", "--out", str(tmp_path / "export")]  # fmt: skip
        _refused(lambda: cli(args), expected, capsys)
        return
    code, export = onnx_export(family)
    assert code == 0
    args = ["ondevice", "--model", str(export), "--runtime", "ort", "--method", "zo",
            "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"),
            "--threads", "1", "data.train_size=16", "data.eval_size=8",
            "train.progress=false", "train.keep=last", "train.guard=false"]  # fmt: skip
    assert cli(args) == 0
    losses = [r["loss"] for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max().item() > 0 for n, t in saved.items() if "lora_B" in n)
