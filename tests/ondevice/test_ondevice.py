"""On-device training through ONNX Runtime: it learns, its trace replays in PyTorch to the
same adapter, its steps equal PyTorch's, P-RGE equals sequential MeZO, and bad input
fails before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from edgetune import models
from edgetune.data import DataConfig, build_task, load_splits
from edgetune.export.manifest import read_manifest
from edgetune.export.onnx import OrtSession
from edgetune.ondevice.adapter import build_adapter
from edgetune.ondevice.replay import replay
from edgetune.ondevice.runtime import RuntimeLM
from edgetune.peft import PeftConfig, attach
from edgetune.train import ZOStepper
from edgetune.train.loop import evaluate_model
from edgetune.zo import ZOSGD, MeZOEstimator

LM = ["--dataset", "tinystories", "--task", "lm", "data.max_length=64"]
SST2 = ["--dataset", "sst2", "data.max_length=32"]


def _ondevice(cli, export, out, *extra, steps=40, method="zo"):
    args = [
        "ondevice",
        "--model",
        str(export),
        "--runtime",
        "ort",
        "--method",
        method,
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--threads",
        "1",
        "data.train_size=64",
        "data.eval_size=16",
        "train.progress=false",
        *extra,
    ]
    return cli(args)


def test_ondevice_zo_learns_replays_and_loads_in_peft(
    onnx_lora_export, stories260k_path, tmp_path, cli
):
    # Execute: 40 MeZO steps (q = 4) on TinyStories, every loss from ONNX Runtime
    out = tmp_path / "run"
    status = _ondevice(
        cli, onnx_lora_export, out, *LM, "--lr", "5e-3", "--queries", "4", "train.eval_every=40"
    )
    # Assert: held-out loss went down
    assert status == 0
    evals = [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "eval/loss" in r
    ]
    assert [r["step"] for r in evals] == [0, 40]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"] - 0.02
    # the trace replayed on the PyTorch model gives the runtime's adapter, bit for bit
    base, tok = models.load(str(stories260k_path))
    peft = replay(out, base)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    replayed = {n.replace(".default.", "."): p for n, p in peft.named_parameters() if "lora_" in n}
    assert set(saved) == set(replayed)
    assert max(float((replayed[k] - v).abs().max()) for k, v in saved.items()) == 0.0
    moved = load_file(out / "adapter_init" / "adapter_model.safetensors")
    assert max(float((moved[k] - v).abs().max()) for k, v in saved.items()) > 1e-3
    # PEFT loads DIR/adapter, and PyTorch scores it as the runtime did
    from peft import PeftModel

    model = PeftModel.from_pretrained(models.load(str(stories260k_path))[0], out / "adapter")
    cfg = DataConfig(dataset="tinystories", task="lm", train_size=64, eval_size=16, max_length=64)
    task = build_task(load_splits(cfg, 0), cfg, tok)
    rows = task.prepare_rows(load_splits(cfg, 0).eval)
    pytorch = evaluate_model(model.eval(), task, rows, 16)
    assert abs(pytorch["eval/loss"] - evals[1]["eval/loss"]) < 1e-4


def test_prge_through_the_runtime_equals_sequential_zo(onnx_lora_export, tmp_path, cli):
    # Execute: the same 5 steps as P-RGE (one runtime call of 2q copies) and as MeZO
    for method in ("zo", "prge"):
        assert (
            _ondevice(
                cli,
                onnx_lora_export,
                tmp_path / method,
                *SST2,
                "--queries",
                "2",
                steps=5,
                method=method,
            )
            == 0
        )
    zo, prge = (
        [json.loads(line) for line in (tmp_path / m / "trace.jsonl").read_text().splitlines()]
        for m in ("zo", "prge")
    )
    # Assert: same seeds; scalars equal to float rounding of differently batched passes
    assert [s["seeds"] for s in zo] == [s["seeds"] for s in prge]
    for a, b in zip(zo, prge, strict=True):
        for x, y in zip(a["scalars"], b["scalars"], strict=True):
            assert x == pytest.approx(y, rel=1e-3, abs=1e-3)


def test_a_runtime_step_equals_the_pytorch_step(onnx_lora_export, stories260k_path):
    # Prepare: a PEFT LoRA (q/v, rank 4) with non-zero B, and the same tensors behind ORT
    base, tok = models.load(str(stories260k_path))
    adapter = attach(base, PeftConfig(rank=4, target_modules=["q_proj", "v_proj"]), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    manifest = read_manifest(onnx_lora_export)
    params = dict(adapter.model.named_parameters())
    tensors = {n: params[n].detach().clone() for s in manifest.slots for n in (s.peft_a, s.peft_b)}
    runtime = RuntimeLM(
        OrtSession(onnx_lora_export / "model.onnx"), manifest, list(tensors.values())
    )
    on_device = build_adapter(runtime, "lora", tensors, manifest.peft_config)
    cfg = DataConfig(dataset="tinystories", task="lm", train_size=16, eval_size=8, max_length=32)
    task = build_task(load_splits(cfg, 0), cfg, tok)
    rows = task.prepare_rows(load_splits(cfg, 0).train)[:8]

    def step(target):
        estimator = MeZOEstimator(1e-3, 3, exact_restore=True)
        return ZOStepper(target, task, estimator, ZOSGD(), 1, seed=7).step(rows, 0, 1e-2)

    # Execute
    want, got = step(adapter), step(on_device)
    # Assert: same seeds, the same projected gradients and the same updated adapter
    assert want.estimate.seeds == got.estimate.seeds
    for x, y in zip(want.estimate.scalars, got.estimate.scalars, strict=True):
        assert x == pytest.approx(y, rel=1e-3, abs=1e-3)
    # the updates differ only through the scalars: by at most lr * |scalar gap| * |z| per
    # element (|z| < 6 among these few thousand Gaussian draws; ONNX Runtime's kernels on
    # an AVX-512 CPU put the scalars ~1e-4 apart, more than a fixed 1e-5 allowed)
    pairs = zip(want.estimate.scalars, got.estimate.scalars, strict=True)
    bound = 1e-2 * max(abs(x - y) for x, y in pairs) * 6.0 + 1e-6
    for name, value in tensors.items():
        assert torch.allclose(params[name].detach(), value, atol=bound)


def _edited_copy(tmp_path, export, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(export, copy)
    data = json.loads((copy / "export.json").read_text())
    data.update(changes)
    (copy / "export.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_export", "not an edgetune export folder"),
        ("truncated", "truncated or corrupt"),
        ("no_inputs", "no adapter inputs"),
        ("wrong_runtime", "--runtime ort"),
        ("last_logits_lm", "export with --logits all"),
        ("fo", "forward-only"),
        ("fwdgrad", "Jacobian-vector"),
    ],
)
def test_bad_input_fails_before_writing(onnx_lora_export, tmp_path, cli, capsys, case, message):
    export, extra, runtime = onnx_lora_export, [*LM], "ort"
    if case == "not_export":
        export = tmp_path
    elif case == "truncated":
        export = _edited_copy(tmp_path, onnx_lora_export)
        data = (export / "model.onnx").read_bytes()
        (export / "model.onnx").write_bytes(data[:1000])
    elif case == "no_inputs":
        export = _edited_copy(tmp_path, onnx_lora_export, slots=[])
    elif case == "wrong_runtime":
        export = _edited_copy(tmp_path, onnx_lora_export, format="executorch")
    elif case == "last_logits_lm":
        export = _edited_copy(tmp_path, onnx_lora_export, logits="last")
    elif case == "fwdgrad":
        extra.append("zo.estimator=fwdgrad")
    out = tmp_path / "run"
    args = [
        "ondevice",
        "--model",
        str(export),
        "--runtime",
        runtime,
        "--out",
        str(out),
        "--method",
        "fo" if case == "fo" else "zo",
        "--steps",
        "1",
        *extra,
    ]
    assert cli(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_executorch_prge_run_equals_the_onnx_runtime_run(
    onnx_lora_export, stories260k_path, tmp_path, cli
):
    pytest.importorskip("executorch.runtime")
    # Prepare: the same graph (q/v rank 4, every position) as an ExecuTorch program built
    # for P-RGE with q = 2 (4 copies) on 8 rows of 64 tokens
    pte = tmp_path / "pte"
    args = ["export", "--model", str(stories260k_path), "--format", "executorch", "--lora-rank", "4",
            "lora_targets=[q_proj,v_proj]", "--max-copies", "4", "--max-batch", "8",
            "--max-seq", "64", "--out", str(pte), "--threads", "1"]  # fmt: skip
    assert cli(args) == 0
    # Execute: 3 P-RGE steps through each runtime
    for runtime, export in (("executorch", pte), ("ort", onnx_lora_export)):
        out = tmp_path / runtime
        run = ["ondevice", "--model", str(export), "--runtime", runtime, "--method", "prge",
               "--queries", "2", "--steps", "3", "--batch-size", "8", "--out", str(out),
               "--threads", "1", "data.train_size=64", "data.eval_size=8",
               "train.eval_batch_size=8", "train.progress=false", *LM]  # fmt: skip
        assert cli(run) == 0
    # Assert: the same seeds and projected gradients, and the trace replays exactly
    traces = {
        r: [json.loads(line) for line in (tmp_path / r / "trace.jsonl").read_text().splitlines()]
        for r in ("executorch", "ort")
    }
    for a, b in zip(traces["executorch"], traces["ort"], strict=True):
        assert a["seeds"] == b["seeds"]
        for x, y in zip(a["scalars"], b["scalars"], strict=True):
            assert x == pytest.approx(y, rel=1e-3, abs=1e-3)
    peft = replay(tmp_path / "executorch", models.load(str(stories260k_path))[0])
    saved = load_file(tmp_path / "executorch" / "adapter" / "adapter_model.safetensors")
    replayed = {n.replace(".default.", "."): p for n, p in peft.named_parameters() if "lora_" in n}
    assert max(float((replayed[k] - v).abs().max()) for k, v in saved.items()) == 0.0
