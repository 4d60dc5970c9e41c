"""Running a GGUF file through llama.cpp's Python binding (llama-cpp-python).

What an export is checked with, and what the benchmark measures: greedy text, the logits
at every position (with or without a LoRA adapter GGUF applied), the parity of a written
file with PyTorch (`gguf_parity`, run by `edgetune export`), and the quality of a
quantized file against its F32 twin (`gguf_quality`: top-1 agreement and perplexity over
one token sequence).

Notable choices:
- Greedy decoding is an argmax over llama.cpp's own logits, token by token, so it is
  comparable with `model.generate(do_sample=False)` without depending on the binding's
  sampler settings; it stops at the vocabulary's end-of-sequence token.
- Files are read with gguf-py before llama.cpp sees them: a truncated or foreign file is
  a `ConfigError` naming the file, not a crash or a bare "failed to load model".
- The KV cache is F32, not llama.cpp's default F16: the F16 cache alone moves
  stories260K's logits by ~1e-2, the F32 one leaves them within ~1e-5 of PyTorch.
- llama.cpp's stderr logging is off (`verbose=False`); threads are explicit (default 1)
  because the machines these run on are small and shared.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.errors import ConfigError

MISSING = (
    "llama.cpp's Python binding is not installed: pip install 'edgetune[llama]' (builds "
    "llama.cpp, about 6 minutes once), or make setup-test"
)
# Max |llama.cpp - PyTorch| logit an F32 file may show, per unit of the largest |logit|:
# stories260K measures 1.5e-5 at logits up to 20.5 (about 1e-6 of it) with the F32 KV
# cache. Quantized files differ by their rounding, so only F32 has a bound; for those the
# figures are recorded.
F32_TOLERANCE = 1e-4
# Architectures whose F32 files llama.cpp computes less exactly, by the same measure.
# gemma3's MLP is a GELU, which llama.cpp's CPU backend reads from an fp16 lookup table:
# on the tiny random Gemma 3 of the tests (logits below 1) that alone moves logits by 3e-4,
# and by 1.6e-3 with a LoRA adapter; rounding PyTorch's GELU to fp16 in and out as well
# brings both to 5e-5 to 7e-5. A file that computes another model moves them by 0.2-0.9.
F32_TOLERANCE_BY_ARCH = {"gemma3": 5e-3}


def binding_available() -> bool:
    """Whether llama.cpp's Python binding imports."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_parity(
    model_path: Path,
    token_ids: list[int],
    expected: np.ndarray,
    quant: str,
    adapter_path: Path | None = None,
    threads: int = 1,
) -> dict[str, float]:
    """How far llama.cpp's logits on `token_ids` are from PyTorch's `expected` [T, V].

    Returns:
        `parity_max_abs` (the largest |difference|) and `parity_top1_agreement` (the share
        of positions where both predict the same next token).

    Raises:
        ConfigError: an F32 file is further from PyTorch than `F32_TOLERANCE` (or its
            architecture's `F32_TOLERANCE_BY_ARCH`) allows (the file does not hold the
            model), or llama.cpp cannot load it.
    """
    got = llama_cpp_logits(model_path, token_ids, adapter_path, threads)
    worst = float(np.abs(got - expected).max())
    tolerance = F32_TOLERANCE_BY_ARCH.get(_architecture(model_path), F32_TOLERANCE)
    bound = tolerance * max(1.0, float(np.abs(expected).max()))
    if quant == "f32" and not worst <= bound:
        raise ConfigError(
            f"llama.cpp's logits from {model_path.name} differ from PyTorch's by up to "
            f"{worst:.3g} (allowed: {bound:.3g}), so the file does not compute this model; "
            "nothing was written. Please report it with the model and the llama-cpp-python "
            "version"
        )
    agreement = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    return {"parity_max_abs": worst, "parity_top1_agreement": agreement}


def _architecture(model_path: Path) -> str:
    """The file's `general.architecture` ("llama", "gemma3", ...)."""
    import gguf

    field = gguf.GGUFReader(model_path).get_field(gguf.Keys.General.ARCHITECTURE)
    return field.contents() if field is not None else ""


def llama_cpp_generate(
    model_path: Path,
    prompt: str,
    max_tokens: int = 32,
    adapter_path: Path | None = None,
    threads: int = 1,
) -> str:
    """Greedy continuation of `prompt` by llama.cpp.

    Args:
        model_path: a model .gguf.
        prompt: the text; tokenized by the file's own tokenizer (BOS added if it says so).
        max_tokens: the most tokens generated (fewer at end-of-sequence).
        adapter_path: a LoRA adapter .gguf applied at scale 1.
        threads: CPU threads for llama.cpp.

    Returns:
        The generated text (the prompt not included).

    Raises:
        ConfigError: llama_cpp is missing, or a file is missing, truncated or not a model
            llama.cpp can load.
    """
    text = prompt.encode("utf-8")
    # A token spells at least one byte; + 2 for BOS and a prefix space.
    llm = _open(model_path, adapter_path, threads, n_ctx=len(text) + 2 + max_tokens)
    try:
        prompt_ids = llm.tokenize(text, add_bos=True)
        llm.eval(prompt_ids)
        generated: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token == llm.token_eos():
                break
            generated.append(token)
            llm.eval([token])
        completion = llm.detokenize(generated, prev_tokens=prompt_ids)
    finally:
        llm.close()
    return completion.decode("utf-8", errors="replace")


def llama_cpp_logits(
    model_path: Path,
    token_ids: list[int],
    adapter_path: Path | None = None,
    threads: int = 1,
) -> np.ndarray:
    """llama.cpp's logits for every position of `token_ids` (fed as given, no BOS added).

    Returns:
        float32 array [T, V]: row t scores the token after `token_ids[: t + 1]`.

    Raises:
        ConfigError: as `llama_cpp_generate`.
    """
    llm = _open(model_path, adapter_path, threads, n_ctx=len(token_ids))
    try:
        llm.eval(list(token_ids))
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llm.close()


def gguf_quality(
    f32_path: Path, quant_path: Path, token_ids: list[int], threads: int = 1
) -> dict[str, float]:
    """How far a quantized GGUF is from its F32 twin on one token sequence.

    Args:
        f32_path: the F32 model .gguf.
        quant_path: the same model quantized (q8_0, q4_0, ...).
        token_ids: the text, tokenized (BOS first if the model wants one).
        threads: CPU threads for llama.cpp.

    Returns:
        `top1_agreement`: the share of positions where both files predict the same next
        token; `ppl_f32`, `ppl_quant`: each file's perplexity of `token_ids[1:]`.
    """
    reference = llama_cpp_logits(f32_path, token_ids, threads=threads)
    quantized = llama_cpp_logits(quant_path, token_ids, threads=threads)
    targets = np.asarray(token_ids[1:])
    return {
        "top1_agreement": float(np.mean(reference.argmax(-1) == quantized.argmax(-1))),
        "ppl_f32": _perplexity(reference[:-1], targets),
        "ppl_quant": _perplexity(quantized[:-1], targets),
    }


def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(targets)), targets].mean()
    return math.exp(nll)


@contextmanager
def _no_weight_repacking() -> Iterator[None]:
    """Load with llama.cpp's weight repacking off. llama.cpp repacks Q4_0 weights into
    interleaved CPU layouts ("extra buffer types"); on an AVX-512 machine that path killed
    the process with a segmentation fault on stories260K's q4_0 file (8 or 200 tokens),
    and with the switch off the same file evaluates. llama-cpp-python's `Llama` does not
    expose the switch, so the default model parameters it reads are wrapped while it loads.
    """
    from llama_cpp import llama_cpp as low

    default = low.llama_model_default_params

    def params() -> Any:
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def open_llama(
    model_path: Path, n_ctx: int, threads: int = 1, adapter_path: Path | None = None
) -> Any:
    """A `llama_cpp.Llama` over `model_path` (and a LoRA adapter GGUF) with every
    position's logits kept (`logits_all`), an F32 KV cache and weight repacking off;
    the caller closes it.

    Raises:
        ConfigError: the binding is missing, or a file is missing, truncated or foreign.
    """
    return _open(Path(model_path), adapter_path, threads, n_ctx)


def _open(model_path: Path, adapter_path: Path | None, threads: int, n_ctx: int) -> Any:
    """A llama.cpp model with every position's logits kept, after checking the files."""
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        raise ConfigError(MISSING) from None
    _check_file(Path(model_path), "model")
    if adapter_path is not None:
        _check_file(Path(adapter_path), "LoRA adapter")
    try:
        with _no_weight_repacking():
            return Llama(
                model_path=str(model_path),
                lora_path=str(adapter_path) if adapter_path is not None else None,
                n_ctx=max(n_ctx, 16),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=True,
                type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32,
                verbose=False,
            )
    except ValueError as exc:
        what = f"{model_path}" + (f" with adapter {adapter_path}" if adapter_path else "")
        raise ConfigError(
            f"llama.cpp cannot load {what} ({exc}); export it again with edgetune export "
            "--format gguf (an adapter must come from the same export as its model)"
        ) from None


def _check_file(path: Path, what: str) -> None:
    """Refuse a missing, truncated or foreign file before llama.cpp reads it."""
    import gguf

    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; export it first")
    try:
        reader = gguf.GGUFReader(path)
        for tensor in reader.tensors:
            if tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} is cut short")
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ConfigError(
            f"{what} file {path} is not a complete GGUF file ({exc}); export it again "
            "(a partial copy or download is a common cause)"
        ) from None
