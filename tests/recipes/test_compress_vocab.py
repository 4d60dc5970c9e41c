"""`edgetune compress --vocab` end to end on stories260K + SST-2: the run directory, the
pruned model through finetune / eval / export, the mapped adapter and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgetune import models
from edgetune.recipes.evaluate import load_adapter

TINY_DATA = ["data.train_size=64", "data.eval_size=16", "data.max_length=32"]


def vocab_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        "--model",
        str(model),
        "--dataset",
        "sst2",
        "--out",
        str(out),
        *TINY_DATA,
        "progress=false",
        *extra,
    ]


@pytest.fixture
def vocab_run(cli, stories260k_path, shared_data, tmp_path) -> Path:
    del shared_data
    out = tmp_path / "vocab"
    assert cli(vocab_args(stories260k_path, out, "--vocab", "task")) == 0
    return out


def test_compress_vocab_writes_a_smaller_model_with_its_map(vocab_run, stories260k_path):
    summary = json.loads((vocab_run / "summary.json").read_text())
    vocab = summary["after-vocab"]["vocab"]
    kept = json.loads((vocab_run / "model" / "vocab_map.json").read_text())["kept"]
    assert vocab["original"] == 512 and vocab["kept"] == len(kept) < 512
    assert vocab["dropped_used"] == 0  # --vocab task keeps every token the prompts use
    # the tied 64-wide embedding loses its pruned rows, nothing else changes
    assert summary["params_after"] == summary["params_before"] - (512 - len(kept)) * 64
    assert summary["model_bytes_after"] < summary["model_bytes_before"]
    lines = [json.loads(line) for line in (vocab_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["before", "after-vocab"]
    # the verbalizer's label tokens are kept, so the classes are still scored
    _, tokenizer = models.load(str(stories260k_path))
    for word in ("negative", "positive"):  # SST-2's default verbalizer
        assert tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] in kept


def test_compress_vocab_n_keeps_at_most_n_tokens(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    assert cli(vocab_args(stories260k_path, out, "--vocab", "40")) == 0
    vocab = json.loads((out / "summary.json").read_text())["after-vocab"]["vocab"]
    assert vocab["kept"] == 40 and vocab["dropped_used"] > 0


def test_a_vocabulary_pruned_model_finetunes_and_evaluates(cli, tiny_args, vocab_run, tmp_path):
    model = vocab_run / "model"
    run = tmp_path / "ft"
    args = tiny_args(run, "train.keep=last", method="fo", steps=2)
    args[args.index("--model") + 1] = str(model)
    assert cli(args) == 0
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained
    assert cli(["eval", str(run), "--out", str(tmp_path / "eval")]) == 0
    scored = json.loads((tmp_path / "eval" / "summary.json").read_text())
    trained = json.loads((run / "summary.json").read_text())
    assert scored["eval/loss"] == pytest.approx(trained["eval/loss"], rel=1e-5)


def test_compress_vocab_maps_the_adapter(cli, tiny_args, stories260k_path, shared_data, tmp_path):
    finetuned = tmp_path / "ft"
    assert cli(tiny_args(finetuned, "train.keep=last", method="fo", steps=2)) == 0
    out = tmp_path / "run"
    args = vocab_args(stories260k_path, out, "--vocab", "task")
    assert cli([*args, "--adapter", str(finetuned / "adapter")]) == 0
    mapped = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert mapped["base_model_name_or_path"] == str(out / "model")
    kept = json.loads((out / "model" / "vocab_map.json").read_text())["kept"]
    summary = json.loads((out / "summary.json").read_text())
    # the model's parameters, not the LoRA matrices loaded into it
    assert summary["params_after"] == summary["params_before"] - (512 - len(kept)) * 64
    ids = torch.tensor([kept[3:20]])  # only kept tokens: no id is read as unk
    original = load_adapter(models.load(str(stories260k_path))[0], str(finetuned / "adapter"))
    pruned = load_adapter(models.load(str(out / "model"))[0], str(out / "adapter"))
    with torch.no_grad():
        want, got = original(input_ids=ids).logits, pruned(input_ids=ids).logits
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-5)


def test_a_vocabulary_pruned_model_exports_to_onnx_with_its_map(cli, vocab_run, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "onnx"
    assert cli(["export", "--model", str(vocab_run / "model"), "--out", str(out)]) == 0
    model, _ = models.load(str(vocab_run / "model"))
    ids = torch.tensor([[1, 300, 7, 450, 2]])  # original ids, some of them pruned
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert got.shape[-1] == 512  # the runtime takes and returns the tokenizer's ids
    kept = json.loads((vocab_run / "model" / "vocab_map.json").read_text())["kept"]
    torch.testing.assert_close(torch.from_numpy(got)[..., kept], want[..., kept], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vocab", "0"], "vocab: '0' is not none, task or a positive token count"),
        (["--vocab", "all"], "vocab: 'all' is not none, task or a positive token count"),
        (["--vocab", "task", "--prune", "0.3"], "cannot be combined with --prune in one run"),
        (
            ["--vocab", "task", "--quantize", "int8-dynamic"],
            "cannot be combined with --quantize int8-dynamic",
        ),
        (
            ["--vocab", "task", "--quantize", "int8", "--vocab-head", "labels"],
            "--vocab-head labels with --quantize int8",
        ),
        (["--vocab", "3"], "vocab=3 is below the"),
    ],
)
def test_compress_vocab_refuses_bad_settings(
    cli, stories260k_path, shared_data, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    assert cli(vocab_args(stories260k_path, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_vocab_then_int8_in_one_run_stores_both_and_loads_with_the_map(
    cli, vocab_run, stories260k_path, tmp_path
):
    out = tmp_path / "vocab-int8"
    assert cli(vocab_args(stories260k_path, out, "--vocab", "task", "--quantize", "int8")) == 0
    summary = json.loads((out / "summary.json").read_text())
    fp32 = json.loads((vocab_run / "summary.json").read_text())
    assert [s for s in summary if s.startswith("after-")] == ["after-vocab", "after-quantize"]
    assert summary["after-vocab"]["vocab"] == fp32["after-vocab"]["vocab"]
    # int8 linears on top of the smaller vocabulary: a smaller folder than vocab alone
    assert summary["model_bytes_after"] < fp32["model_bytes_after"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert "edgetune_vocab" in config and "edgetune_int8" in config
    # loaded back: int8 layers, the id map at the edge, the stage's accuracy reproduced
    model, _ = models.load(str(out / "model"))
    from edgetune.compress.quantize import Int8Linear
    from edgetune.compress.vocab import is_vocab_pruned

    assert is_vocab_pruned(model) and any(isinstance(m, Int8Linear) for m in model.modules())
    kept = json.loads((out / "model" / "vocab_map.json").read_text())["kept"]
    ids = torch.tensor([kept[3:20]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == 512  # logits over the original vocabulary
    assert cli(["eval", "--model", str(out / "model"), "--dataset", "sst2", *TINY_DATA]) == 0


def test_a_vocabulary_pruned_model_is_refused_by_compress_and_gguf(
    cli, vocab_run, tmp_path, capsys
):
    model = str(vocab_run / "model")
    assert cli(vocab_args(Path(model), tmp_path / "again", "--vocab", "task")) == 2
    assert "already vocabulary-pruned" in capsys.readouterr().err
    out = tmp_path / "gguf"
    assert cli(["export", "--model", model, "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp's tokenizer reads the vocabulary from the GGUF file" in err
    assert not out.exists() and "Traceback" not in err


def test_a_label_head_scores_the_label_tokens_as_the_full_head(
    cli, vocab_run, stories260k_path, tmp_path
):
    out = tmp_path / "labels"
    args = vocab_args(stories260k_path, out, "--vocab", "task", "--vocab-head", "labels")
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    full = json.loads((vocab_run / "summary.json").read_text())
    assert summary["after-vocab"]["vocab"]["head_rows"] == 2  # SST-2: two label tokens
    # the same embedding rows, 2 untied head rows instead of sharing the tied embedding
    assert summary["params_after"] == full["params_after"] + 2 * 64
    assert summary["after-vocab"]["metrics"] == full["after-vocab"]["metrics"]
    vmap = json.loads((out / "model" / "vocab_map.json").read_text())
    labels = vmap["head"]
    model, _ = models.load(str(out / "model"))
    original, _ = models.load(str(stories260k_path))
    ids = torch.tensor([vmap["kept"][3:20]])  # only kept tokens: no id is read as unk
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, original(input_ids=ids).logits
    torch.testing.assert_close(got[..., labels], want[..., labels], rtol=0, atol=1e-5)
    others = torch.ones(512, dtype=torch.bool)
    others[labels] = False
    assert torch.all(got[..., others] == torch.finfo(torch.float32).min)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vocab-head", "labels", "--quantize", "int8"], "vocab_head=labels is not used"),
        (
            ["--vocab", "task", "--vocab-head", "labels", "--task", "lm"],
            "the lm task has none",
        ),
    ],
)
def test_compress_vocab_head_refusals(
    cli, stories260k_path, shared_data, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    assert cli(vocab_args(stories260k_path, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
