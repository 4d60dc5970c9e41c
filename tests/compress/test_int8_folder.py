"""The int8 model folder on stories260K: a save -> load round trip computes the same logits
without an fp32 copy of the quantized layers, the file is ~the int8 size, stock
from_pretrained refuses the folder, and a LoRA attaches to the loaded int8 model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgetune.compress.int8_folder import WEIGHTS_FILE, load_int8, save_int8
from edgetune.compress.quantize import Int8Linear, quantize_int8
from edgetune.errors import EdgetuneError
from edgetune.models import load
from edgetune.peft import PeftConfig, attach

PROMPT_IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def int8_folder(stories260k_path, tmp_path):
    model, tokenizer = load(str(stories260k_path))
    quantize_int8(model)
    save_int8(model, tmp_path / "int8")
    tokenizer.save_pretrained(tmp_path / "int8")
    return model, tmp_path / "int8"


def test_round_trip_gives_identical_logits_without_fp32_linears(int8_folder):
    # Prepare
    saved, folder = int8_folder
    # Execute
    loaded, tokenizer = load(str(folder))
    with torch.no_grad():
        want = saved(input_ids=PROMPT_IDS).logits
        got = loaded(input_ids=PROMPT_IDS).logits
    # Assert: the same computation, bit for bit; 35 int8 layers and no fp32 linear but the
    # lm_head, which is the embedding itself (tied, stored once)
    assert torch.equal(got, want)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 35
    linears = [n for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["lm_head"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert tokenizer("hello")["input_ids"]


def test_file_holds_int8_layers_and_one_fp32_embedding(int8_folder, stories260k_path):
    # Prepare: 35 layers' int8 weights + fp32 scales, the 512 x 64 fp32 embedding, 11 norms
    _, folder = int8_folder
    linear = 5 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 172 * 3)
    rows = 5 * (64 + 32 + 32 + 64 + 172 + 172 + 64)
    tensors = linear + 4 * rows + 4 * 512 * 64 + 4 * 64 * 11
    # Execute
    size = (folder / WEIGHTS_FILE).stat().st_size
    fp32_size = (stories260k_path / "model.safetensors").stat().st_size
    # Assert: the tensors plus the JSON header (82 names and offsets: 8.5 kB), 0.36x of
    # the fp32 file
    assert tensors < size < tensors + 12_000
    assert size / fp32_size < 0.4


def test_stock_from_pretrained_refuses_the_folder_loudly(int8_folder):
    _, folder = int8_folder
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_config_that_does_not_match_the_file_is_refused(int8_folder):
    # Prepare: the config forgets one int8 module, so its file tensors have no home
    _, folder = int8_folder
    config = json.loads((folder / "config.json").read_text())
    config["edgetune_int8"]["modules"].pop(0)
    (folder / "config.json").write_text(json.dumps(config))
    # Execute / Assert
    with pytest.raises(EdgetuneError, match="does not match its config.json"):
        load_int8(folder)
    config["edgetune_int8"]["format"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgetuneError, match="int8 format 99 is not 1; save the model again"):
        load_int8(folder)


def test_saving_a_model_without_int8_layers_is_refused(stories260k_path, tmp_path):
    model, _ = load(str(stories260k_path))
    with pytest.raises(EdgetuneError, match="call quantize_int8 first"):
        save_int8(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_lora_on_the_loaded_int8_model_equals_lora_attached_before_quantizing(
    int8_folder, stories260k_path
):
    # Prepare: the same LoRA (seed 0, B made non-zero) both ways
    _, folder = int8_folder
    loaded, _ = load(str(folder))
    on_loaded = attach(loaded, PeftConfig(rank=4), seed=0)
    fp32, _ = load(str(stories260k_path))
    first = attach(fp32, PeftConfig(rank=4), seed=0)
    quantize_int8(first.model)
    for adapter in (on_loaded, first):
        with torch.no_grad():
            for name, p in adapter.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    # Execute
    with torch.no_grad():
        got = on_loaded.model(input_ids=PROMPT_IDS).logits
        want = first.model(input_ids=PROMPT_IDS).logits
    # Assert: same trainable tensors over int8 bases, same logits
    assert on_loaded.names == first.names and len(on_loaded.names) == 2 * 35
    assert sum(isinstance(m, Int8Linear) for m in on_loaded.model.modules()) == 35
    assert torch.equal(got, want)


def test_methods_that_train_base_weights_are_refused_on_int8(int8_folder):
    _, folder = int8_folder
    loaded, _ = load(str(folder))
    with pytest.raises(EdgetuneError, match="peft.method=full trains base weights"):
        attach(loaded, PeftConfig(method="full"), seed=0)
