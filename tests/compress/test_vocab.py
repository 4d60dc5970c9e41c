"""Vocabulary pruning (`compress/vocab.py`): kept logits equal the original's, the
documented out-of-vocabulary rules, tied and untied heads, the saved folder and its map."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgetune import models
from edgetune.compress.vocab import (
    VOCAB_MAP,
    VocabMap,
    attach_map,
    is_vocab_pruned,
    nearest_kept,
    oov_token_id,
    required_ids,
    save_pruned,
    select_vocab,
    shrink,
)
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.models.tiny import tiny_llama

TEXT = "Once upon a time there was a little cat. The cat was happy."


@pytest.fixture
def pruned(stories260k_path, tmp_path):
    """(original model, tokenizer, the ids of TEXT, the pruned model loaded back through
    models.load, its map): the kept vocabulary is TEXT's tokens plus the required ids."""
    original, tokenizer = models.load(str(stories260k_path))
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    kept = select_vocab(
        Counter(ids[0].tolist()), required_ids(tokenizer, original.config, []), None, 512
    )
    vmap = VocabMap(kept, 512, oov_token_id(tokenizer))
    model, _ = models.load(str(stories260k_path))
    shrink(model, kept)
    save_pruned(model, tokenizer, tmp_path / "model", vmap)
    loaded, _ = models.load(str(tmp_path / "model"))
    return original, tokenizer, ids, loaded, vmap


def test_pruned_logits_on_kept_tokens_equal_the_originals(pruned, tmp_path):
    original, _, ids, loaded, vmap = pruned
    assert is_vocab_pruned(loaded) and len(vmap.kept) < 60
    with torch.no_grad():
        want, got = original(ids).logits, loaded(ids).logits
    kept = torch.tensor(vmap.kept)
    assert got.shape == want.shape  # logits stay over the original vocabulary
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-5)
    # the tied head is the one sliced embedding: 512 - K rows of 64 fewer parameters
    before = sum(p.numel() for p in original.parameters())
    assert sum(p.numel() for p in loaded.parameters()) == before - (512 - len(vmap.kept)) * 64
    # stock transformers reads the folder in the kept id space
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert stock.config.vocab_size == len(vmap.kept)


def test_out_of_vocabulary_ids_follow_the_documented_rules(pruned):
    original, tokenizer, ids, loaded, vmap = pruned
    pruned_id = next(i for i in range(512) if i not in vmap.kept)
    assert vmap.oov_id == tokenizer.unk_token_id == 0  # stories260K has an unk token
    with_oov, as_unk = ids.clone(), ids.clone()
    with_oov[0, 3], as_unk[0, 3] = pruned_id, vmap.oov_id
    kept = torch.tensor(vmap.kept)
    with torch.no_grad():
        got = loaded(with_oov).logits
        want = original(as_unk).logits
    # a pruned input id is read as the unk token
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-5)
    # a pruned output id gets the lowest logit: probability 0, never generated
    dropped = torch.ones(512, dtype=torch.bool)
    dropped[kept] = False
    assert torch.all(got[..., dropped] == torch.finfo(torch.float32).min)
    assert torch.softmax(got, -1)[..., dropped].max() == 0
    generated = loaded.generate(ids[:, :4], max_new_tokens=12, do_sample=False)
    assert set(generated[0].tolist()) <= set(vmap.kept)
    # an id outside the original vocabulary fails as it does unpruned
    with pytest.raises(IndexError):
        loaded(torch.tensor([[1, 512]]))


def test_an_untied_head_is_sliced_with_its_own_rows():
    model = tiny_llama(vocab_size=64, seed=3)
    reference = tiny_llama(vocab_size=64, seed=3)
    kept = [0, 2, 5, 9, 17, 33, 63]
    shrink(model, kept)
    assert model.lm_head.weight.shape == (7, 32) and model.lm_head.weight is not (
        model.model.embed_tokens.weight
    )
    attach_map(model, VocabMap(kept, 64, 0))
    ids = torch.tensor([[2, 5, 9, 63, 0]])
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-6)


def test_select_vocab_keeps_the_required_and_the_most_frequent():
    counts = Counter({10: 5, 11: 9, 12: 1, 13: 7, 700: 3})  # 700: beyond the vocabulary
    assert select_vocab(counts, {0, 1}, None, 512) == [0, 1, 10, 11, 12, 13]
    assert select_vocab(counts, {0, 1}, 4, 512) == [0, 1, 11, 13]
    with pytest.raises(ConfigError, match="vocab=1 is below the 2 tokens"):
        select_vocab(counts, {0, 1}, 1, 512)


def test_a_map_that_does_not_fit_the_weights_is_refused(pruned, tmp_path):
    vmap = pruned[-1]
    model = tiny_llama(vocab_size=512)
    with pytest.raises(EdgetuneError, match="token rows but its vocab_map.json keeps"):
        attach_map(model, vmap)
    (tmp_path / "model" / VOCAB_MAP).write_text("{not json")
    with pytest.raises(EdgetuneError, match="vocab_map.json cannot be read"):
        models.load(str(tmp_path / "model"))


def test_a_tokenizer_without_unk_reads_pruned_ids_as_eos():
    class NoUnk:
        unk_token_id, eos_token_id = None, 2

    assert oov_token_id(NoUnk()) == 2
    NoUnk.eos_token_id = None
    with pytest.raises(ConfigError, match="needs an unk or eos token"):
        oov_token_id(NoUnk())


def _family(name: str):
    """A tiny random model of family `name` with a 512-token vocabulary."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    small = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    heads = dict(num_attention_heads=2, num_key_value_heads=1)
    cls, config = {
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=2, n_head=2, **small)),
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(head_dim=16, **small, **layers, **heads)),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(tie_word_embeddings=False, **small, **layers, **heads),
        ),
    }[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(config).eval()


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "qwen2"])
def test_kept_logits_equal_the_originals_in_other_families(family):
    # gemma3 scales its embedding by sqrt(hidden); qwen2 here has an untied head
    reference, model = _family(family), _family(family)
    kept = list(range(0, 512, 3))
    shrink(model, kept)
    attach_map(model, VocabMap(kept, 512, 0))
    ids = torch.tensor([kept[5:20]])
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-5)
    rows = 512 - len(kept)
    tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    removed = rows * 32 * (1 if tied else 2)
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(p.numel() for p in reference.parameters()) - removed
    )


def test_nearest_reads_a_pruned_id_as_the_closest_kept_token(pruned, stories260k_path):
    original, tokenizer, ids, _, vmap = pruned
    model, _ = models.load(str(stories260k_path))
    nearest = nearest_kept(model.get_input_embeddings().weight, vmap.kept)
    assert [nearest[i] for i in vmap.kept] == list(range(len(vmap.kept)))
    # a text piece (the first ids are byte tokens, several with equal rows: ties)
    pruned_id = next(i for i in range(300, 512) if i not in vmap.kept)
    weight = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach(), dim=1)
    cosine = weight[vmap.kept] @ weight[pruned_id]
    assert nearest[pruned_id] == int(cosine.argmax())
    shrink(model, vmap.kept)
    attach_map(model, VocabMap(vmap.kept, 512, vmap.oov_id, None, nearest))
    with_oov, as_nearest = ids.clone(), ids.clone()
    with_oov[0, 3], as_nearest[0, 3] = pruned_id, vmap.kept[nearest[pruned_id]]
    kept = torch.tensor(vmap.kept)
    with torch.no_grad():
        got, want = model(with_oov).logits, original(as_nearest).logits
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-5)
