"""Bad input never gives a traceback or a silent run: a table of what users get wrong.

Each row is a command line (plus the files it reads, written into a temporary folder)
and a regular expression the error message must match. Every row must exit with status
2, print no traceback and name the problem. The commands run in-process through
`edgetune.cli.main` (an exception escaping it is a traceback); two rows also run as a
real subprocess. The real stories260K model and tiny data keep the whole table fast.

`{model}` in a row is the stories260K folder, `{tmp}` the row's temporary folder and
`{other}` an adapter trained on a different (tiny random) model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from edgetune.cli import main
from edgetune.config import resolve_config
from edgetune.errors import ConfigError
from edgetune.recipes.federate import FederateConfig
from edgetune.recipes.finetune import FinetuneConfig

# transformers binds its log handler to sys.stderr on first use; bind it now to the
# session's stream, not to one test's capture (closed after that test, so a later
# warning would print a "Logging error" traceback).
hf_logging.get_logger("transformers")


@dataclass
class Case:
    """One bad input: the argv, the files it reads, what the message must say."""

    id: str
    argv: list[str]
    message: str
    files: dict[str, str | bytes] = field(default_factory=dict)


def ft(*extra: str) -> list[str]:
    """A seconds-long finetune (stories260K, 8 SST-2 rows) with `extra` flags last."""
    return [
        "finetune",
        "--model",
        "{model}",
        "--dataset",
        "sst2",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        "{tmp}/run",
        "data.train_size=8",
        "data.eval_size=2",
        "data.max_length=32",
        "train.progress=false",
        *extra,
    ]


def fed(*extra: str) -> list[str]:
    """A seconds-long federation (2 clients, 1 round) with `extra` flags last."""
    return [
        "federate",
        "--model",
        "{model}",
        "--dataset",
        "sst2",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--batch-size",
        "2",
        "--fleet",
        "uniform",
        "--partition",
        "iid",
        "--out",
        "{tmp}/fed",
        "data.train_size=8",
        "data.eval_size=2",
        "data.max_length=32",
        *extra,
    ]


def ev(*extra: str) -> list[str]:
    """`edgetune eval` of stories260K on 2 SST-2 rows."""
    return ["eval", "--model", "{model}", "--dataset", "sst2", "--eval-size", "2", *extra]


def hs(*extra: str) -> list[str]:
    """`edgetune eval --task hellaswag` of stories260K on 2 tasks."""
    return ["eval", "--model", "{model}", "--task", "hellaswag", "--eval-size", "2", *extra]


def fleet(profile: str) -> dict[str, str]:
    """A fleet YAML holding one device profile written as `profile`."""
    return {"fleet.yaml": f"fleet:\n  - {{{profile}}}\n"}


GOOD = "name: dev, memory_mb: 4000, gflops: 100, up_mbps: 12, down_mbps: 50"
FLEET = ("--fleet", "{tmp}/fleet.yaml")
HEADER = "sentence,label\n"
ROWS = "a fine film,good\na dull film,bad\n" * 6  # verbalizer words stories260K tells apart

CASES = [
    # --- the generated flags and --print-config: the config names the bad value -------
    Case("steps-not-a-number", ft("--steps", "many"), r"train\.steps: expected an integer"),
    Case("print-config-bad-value", ft("--batch-size", "0", "--print-config"), r"train\.batch_size"),
    Case("algorithm-typo", fed("--algorithm", "fedkseeed"), r"fed\.algorithm.*fedkseed"),
    Case("dp-noise-negative", fed("dp.noise=-1"), r"dp\.noise"),
    Case("peft-init-pissa", ft("peft.init=pissa"), r"peft\.init=pissa.*residual"),
    Case(
        "flower-home-special-fs",
        ["flower", "up", "--clients", "1", "--home", "/proc/edgetune-home", "--insecure"],
        r"--home /proc/edgetune-home cannot be created",
    ),
    # --- numbers: NaN, infinity, out of range, wrong type -------------------------
    Case("lr-nan", ft("--lr", "nan"), r"optim\.lr.*(nan|finite)"),
    Case("lr-inf", ft("--lr", "inf"), r"optim\.lr.*(inf|finite)"),
    Case("lr-negative", ft("--lr", "-0.1"), r"optim\.lr.*> 0"),
    Case("zo-eps-nan", ft("--method", "zo", "zo.eps=.nan"), r"zo\.eps.*(nan|finite)"),
    Case("zo-eps-inf", ft("--method", "zo", "zo.eps=inf"), r"zo\.eps.*(inf|finite)"),
    Case("max-update-norm-nan", fed("fed.max_update_norm=.nan"), r"fed\.max_update_norm.*nan"),
    Case("max-abs-scalar-inf", fed("fed.max_abs_scalar=.inf"), r"fed\.max_abs_scalar.*inf"),
    Case("participation-nan", fed("--participation", "nan"), r"fed\.participation.*nan"),
    Case("proj-k-zero", fed("--algorithm", "fedproj", "fed.proj_k=0"), r"fed\.proj_k.*> 0"),
    Case("proj-k-fedit", fed("fed.proj_k=64"), r"fed\.proj_k=64 is not read by .*fedproj"),
    Case(
        "proj-k-above-adapter",
        fed("--algorithm", "fedproj", "fed.proj_k=100000"),
        r"fed\.proj_k=100000: the adapter has \d+ trainable values",
    ),
    Case("steps-zero", ft("--steps", "0"), r"train\.steps.*> 0"),
    Case("steps-negative", ft("--steps", "-3"), r"train\.steps.*> 0"),
    Case("steps-word", ft("train.steps=ten"), r"train\.steps.*integer"),
    Case("steps-float", ft("train.steps=2.5"), r"train\.steps.*integer"),
    Case("batch-size-zero", ft("--batch-size", "0"), r"train\.batch_size.*> 0"),
    Case("seed-word", ft("seed=abc"), r"seed.*integer"),
    Case("peft-rank-zero", ft("peft.rank=0"), r"peft\.rank.*> 0"),
    Case("peft-dropout", ft("peft.dropout=1.5"), r"peft\.dropout"),
    Case("max-length-tiny", ft("data.max_length=2"), r"data\.max_length.*>= 4"),
    Case("max-length-beyond-context", ft("data.max_length=100000"), r"max_length.*512"),
    Case("eval-size-negative", ft("data.eval_size=-1"), r"data\.eval_size"),
    Case("train-size-zero", ft("data.train_size=0"), r"data\.train_size"),
    Case(
        "eval-size-too-big",
        ft("--dataset", "{tmp}/d.csv", "data.eval_size=50"),
        r"12 rows.*eval_size=50",
        {"d.csv": HEADER + ROWS},
    ),
    Case("bool-word", ft("train.progress=maybe"), r"train\.progress.*true or false"),
    Case("list-for-int", ft("train.steps=[1,2]"), r"train\.steps.*integer"),
    # --- names: unknown keys, choices, misspelt flags ----------------------------
    Case("unknown-key", ft("train.stpes=3"), r"unknown config key.*did you mean 'train.steps'"),
    Case(
        "unknown-section",
        ft("trian.steps=3"),
        r"unknown config key 'trian.steps'.*did you mean 'train.steps'",
    ),
    Case("method-choice", ft("--method", "sgd"), r"train\.method.*not one of"),
    Case("peft-choice", ft("--peft", "lorra"), r"peft\.method.*did you mean 'lora'"),
    Case("task-choice", ft("--task", "regression"), r"data\.task.*not one of"),
    Case("misspelt-flag", ft("--stpes", "5"), r"did you mean --steps\?"),
    Case(
        "abbreviated-flag",
        ft("--step", "5"),
        r"unrecognized arguments: --step.*did you mean --steps",
    ),
    Case("sectionless-key", ft("steps=5"), r"'steps' \(did you mean 'train.steps'\?\)"),
    Case("misspelt-flag-eval", ev("--adaptr", "x"), r"did you mean --adapter\?"),
    Case("override-without-equals", ft("steps"), r"override 'steps' is not of the form key=value"),
    Case("section-as-value", ft("train=5"), r"train.*mapping"),
    # --- files: config, model, dataset, run directory ----------------------------
    Case("config-missing", ft("--config", "{tmp}/nope.yaml"), r"nope\.yaml does not exist"),
    Case(
        "config-syntax",
        ft("--config", "{tmp}/c.yaml"),
        r"not valid YAML",
        {"c.yaml": "train: {steps: 3\n"},
    ),
    Case("config-list", ft("--config", "{tmp}/c.yaml"), r"mapping", {"c.yaml": "- 1\n- 2\n"}),
    Case(
        "config-unknown-key",
        ft("--config", "{tmp}/c.yaml"),
        r"did you mean 'optim.lr'",
        {"c.yaml": "optim:\n  lrr: 0.1\n"},
    ),
    Case("config-is-folder", ft("--config", "{tmp}"), r"is a folder; pass a YAML file"),
    Case(
        "config-not-utf8",
        ft("--config", "{tmp}/c.yaml"),
        r"c\.yaml is not UTF-8",
        {"c.yaml": b"train: {steps: \xff}\n"},
    ),
    Case("model-unknown", ft("--model", "no-such-model"), r"cannot find model 'no-such-model'"),
    Case(
        "model-truncated-gguf",
        ft("--model", "{tmp}/m.gguf"),
        r"cannot read GGUF file .*m\.gguf",
        {"m.gguf": b"GGUF\x03\x00"},
    ),
    Case(
        "model-config-not-json",
        ft("--model", "{tmp}"),
        r"config\.json.*not a valid JSON",
        {"config.json": "{oops"},
    ),
    Case("model-empty-folder", ft("--model", "{tmp}"), r"no config\.json"),
    Case("dataset-unknown", ft("--dataset", "no-such-data"), r"unknown dataset 'no-such-data'"),
    Case("dataset-missing-file", ft("--dataset", "{tmp}/x.csv"), r"x\.csv does not exist"),
    Case("dataset-folder", ft("--dataset", "{tmp}"), r"is a folder"),
    Case(
        "dataset-extension",
        ft("--dataset", "{tmp}/d.parquet"),
        r"unknown data file extension",
        {"d.parquet": "x"},
    ),
    Case("resume-missing", ["finetune", "--resume", "{tmp}/none"], r"cannot resume"),
    Case(
        "out-is-file",
        ft("--out", "{tmp}/f.txt"),
        r"f\.txt.*(is a file|not a folder)",
        {"f.txt": "x"},
    ),
    Case(
        "out-under-file",
        ft("--out", "{tmp}/f.txt/run"),
        r"f\.txt/run.*Not a directory",
        {"f.txt": "x"},
    ),
    Case("out-unwritable", ft("--out", "/proc/edgetune-run"), r"cannot (create|write)"),
    Case("eval-out-is-file", ev("--out", "{tmp}/f.txt"), r"f\.txt", {"f.txt": "x"}),
    # --- data files --------------------------------------------------------------
    Case(
        "csv-semicolons",
        ft("--dataset", "{tmp}/d.csv"),
        r"semicolon|';'",
        {"d.csv": "sentence;label\n" + "good film;1\nbad film;0\n" * 6},
    ),
    Case(
        "tsv-with-commas",
        ft("--dataset", "{tmp}/d.tsv"),
        r"comma",
        {"d.tsv": HEADER + "good film,1\nbad film,0\n" * 6},
    ),
    Case(
        "csv-no-label-column",
        ft("--dataset", "{tmp}/d.csv"),
        r"--task",
        {"d.csv": "text,sentiment\n" + "good film,pos\nbad film,neg\n" * 6},
    ),
    Case(
        "csv-label-field-missing",
        ft("--dataset", "{tmp}/d.csv", "--label-field", "stars"),
        r"column 'stars' not found",
        {"d.csv": HEADER + ROWS},
    ),
    Case(
        "csv-ragged-row",
        ft("--dataset", "{tmp}/d.csv"),
        r"line 3",
        {"d.csv": HEADER + "good film,1\nbad,film,0\n" * 6},
    ),
    Case(
        "csv-all-text-empty",
        ft("--dataset", "{tmp}/d.csv"),
        r"empty",
        {"d.csv": HEADER + ",good\n,bad\n" * 6},
    ),
    Case(
        "csv-empty-label",
        ft("--dataset", "{tmp}/d.csv"),
        r"row 3.*(no|empty) label",
        {"d.csv": "sentence,label\ngood film,pos\nbad film,neg\nok film,\n" + "a,pos\nb,neg\n" * 4},
    ),
    Case(
        "csv-one-class",
        ft("--dataset", "{tmp}/d.csv"),
        r"single class",
        {"d.csv": HEADER + "good film,1\n" * 8},
    ),
    Case("csv-header-only", ft("--dataset", "{tmp}/d.csv"), r"is empty", {"d.csv": HEADER}),
    Case(
        "csv-not-utf8",
        ft("--dataset", "{tmp}/d.csv"),
        r"not UTF-8",
        {"d.csv": HEADER.encode() + b"caf\xe9 film,1\nbad,0\n" * 6},
    ),
    Case(
        "jsonl-bad-line",
        ft("--dataset", "{tmp}/d.jsonl"),
        r"line 2 is not valid JSON",
        {"d.jsonl": '{"text": "a"}\n{"text": \n'},
    ),
    Case(
        "jsonl-list-line",
        ft("--dataset", "{tmp}/d.jsonl"),
        r"line 1 is a list",
        {"d.jsonl": '["a", 1]\n'},
    ),
    Case(
        "jsonl-empty-texts",
        ft("--dataset", "{tmp}/d.jsonl", "--task", "lm"),
        r"empty",
        {"d.jsonl": '{"text": ""}\n{"text": "  "}\n' * 5},
    ),
    Case(
        "jsonl-text-not-string",
        ft("--dataset", "{tmp}/d.jsonl", "--task", "lm"),
        r"row 1.*string",
        {"d.jsonl": '{"text": {"a": 1}}\n' * 6},
    ),
    Case("txt-empty", ft("--dataset", "{tmp}/d.txt"), r"is empty", {"d.txt": "\n\n  \n"}),
    Case(
        "jsonl-lone-surrogate",
        ft("--dataset", "{tmp}/d.jsonl", "--task", "lm"),
        r"d\.jsonl: line 3, column 'text'.*\\ud83d alone.*write the whole pair",
        {"d.jsonl": '{"text": "a fine film"}\n' * 2 + '{"text": "cut \\ud83d"}\n' * 4},
    ),
    Case(
        "json-lone-low-surrogate",
        ft("--dataset", "{tmp}/d.json", "--task", "lm"),
        r"d\.json: item 1, column 'text'.*\\ude00 alone",
        {"d.json": '[{"text": "ok \\ud83d\\ude00"}, {"text": "cut \\ude00 here"}]'},
    ),
    Case(
        "csv-bom-label-field-missing",  # the BOM is not part of the column names shown
        ft("--dataset", "{tmp}/d.csv", "--label-field", "stars"),
        r"column 'stars' not found.*columns are: sentence, label",
        {"d.csv": b"\xef\xbb\xbf" + (HEADER + ROWS).encode()},
    ),
    Case(
        "instruction-empty-response",
        ft("--dataset", "{tmp}/d.jsonl", "--task", "instruction"),
        r"empty",
        {"d.jsonl": '{"prompt": "hi", "response": ""}\n' * 8},
    ),
    Case(
        "template-unknown-field",
        ft("--template", "Review: {review}\\nAnswer:"),
        r"'review' not found",
    ),
    Case("template-no-field", ft("--template", "Answer:"), r"no \{field\} placeholder"),
    Case("labels-duplicate", ft("--labels", "a,a"), r"unique"),
    Case("verbalizer-count", ft("--verbalizer", "yes"), r"verbalizer has 1 words"),
    Case("eval-split-unknown", ft("data.eval_split=validation"), r"eval_split 'validation'"),
    # --- federation settings and fleet files -------------------------------------
    Case("min-clients-above-clients", fed("fed.min_clients=3"), r"min_clients"),
    Case(
        "min-clients-above-selected",
        fed("--clients", "4", "--participation", "0.5", "fed.min_clients=3"),
        r"min_clients.*2",
    ),
    Case("clients-zero", fed("--clients", "0"), r"fed\.clients.*> 0"),
    Case("participation-above-one", fed("--participation", "2"), r"fed\.participation"),
    Case("partition-unknown", fed("--partition", "random"), r"partition"),
    Case("partition-bad-alpha", fed("--partition", "dirichlet:-1"), r"dirichlet"),
    Case("fleet-unknown", fed("--fleet", "laptops"), r"fleet 'laptops'"),
    Case("algorithm-unknown", fed("--algorithm", "fedprox"), r"fed\.algorithm"),
    Case(
        "fleet-up-zero",
        fed(*FLEET),
        r"up_mbps.*> 0",
        fleet(GOOD.replace("up_mbps: 12", "up_mbps: 0")),
    ),
    Case(
        "fleet-memory-word",
        fed(*FLEET),
        r"memory_mb.*number.*'lots'",
        fleet(GOOD.replace("4000", "lots")),
    ),
    Case("fleet-syntax", fed(*FLEET), r"fleet\.yaml.*not valid YAML", {"fleet.yaml": "fleet: [\n"}),
    Case(
        "fleet-gflops-negative",
        fed(*FLEET),
        r"gflops.*> 0",
        fleet(GOOD.replace("gflops: 100", "gflops: -5")),
    ),
    Case(
        "fleet-availability",
        fed(*FLEET),
        r"availability.*2\.5",
        fleet(GOOD + ", availability: 2.5"),
    ),
    Case("fleet-dropout", fed(*FLEET), r"dropout.*-1", fleet(GOOD + ", dropout: -1")),
    Case(
        "fleet-nan", fed(*FLEET), r"gflops.*nan", fleet(GOOD.replace("gflops: 100", "gflops: .nan"))
    ),
    Case("fleet-rank", fed(*FLEET), r"lora_rank.*integer", fleet(GOOD + ", lora_rank: 2.5")),
    Case("fleet-unknown-field", fed(*FLEET), r"memory_gb", fleet(GOOD + ", memory_gb: 4")),
    Case("fleet-missing-field", fed(*FLEET), r"gflops", fleet("name: dev, memory_mb: 4000")),
    Case(
        "fleet-empty",
        fed(*FLEET),
        r"fleet\.yaml is empty; list device profiles",
        {"fleet.yaml": ""},
    ),
    Case("fleet-not-utf8", fed(*FLEET), r"fleet\.yaml", {"fleet.yaml": b"fleet: [\xff]\n"}),
    # --- eval, generate, report, flower --------------------------------------------
    Case("eval-adapter-not-folder", ev("--adapter", "{tmp}"), r"not a PEFT adapter folder"),
    Case(
        "eval-adapter-other-model",
        ev("--adapter", "{other}"),
        r"adapter.*(other|different) model|these differ: model=",
    ),
    Case("eval-batch-size-zero", ev("--batch-size", "0"), r"batch.size.*(> 0|>= 1)"),
    Case("eval-size-zero", ev("--eval-size", "0"), r"eval.size"),
    Case(
        "generate-adapter-other-model",
        ["generate", "--model", "{model}", "--adapter", "{other}", "--prompt", "Once"],
        r"adapter.*(other|different) model",
    ),
    Case(
        "generate-negative-tokens",
        ["generate", "--model", "{model}", "--prompt", "Once", "--max-new-tokens", "-5"],
        r"max.new.tokens.*-5",
    ),
    Case(
        "generate-zero-tokens",
        ["generate", "--model", "{model}", "--prompt", "Once", "--max-new-tokens", "0"],
        r"max.new.tokens",
    ),
    Case("generate-empty-prompt", ["generate", "--model", "{model}", "--prompt", ""], r"prompt"),
    Case(
        "generate-encoder",
        ["generate", "--model", "minilm-l6", "--prompt", "a", "--max-new-tokens", "2"],
        r"cannot generate",
    ),
    Case(
        "eval-adapter-config-damaged",
        ev("--adapter", "{tmp}"),
        r"adapter_config\.json is not a JSON object",
        {"adapter_config.json": "{oops"},
    ),
    Case("generate-unknown-model", ["generate", "--model", "nope", "--prompt", "a"], r"'nope'"),
    Case(  # refused by the config, before the model loads and ExecuTorch starts
        "export-max-seq-zero",
        ["export", "--model", "{model}", "--format", "executorch", "--max-seq", "0"],
        r"export\.max_seq: expected an integer >= 1, got 0; e\.g\. --max-seq 128",
    ),
    Case("eval-adapter-missing", ev("--adapter", "{tmp}/nope"), r"nope is not a PEFT adapter"),
    Case(
        "eval-split-without-label",
        ft("--dataset", "{tmp}/d.csv", "data.eval_split={tmp}/e.csv"),
        r"column 'label' not found in .*e\.csv",
        {"d.csv": HEADER + ROWS, "e.csv": "sentence,stars\na,1\n"},
    ),
    Case("federate-resume-missing", ["federate", "--resume", "{tmp}/none"], r"cannot resume"),
    Case("report-missing", ["report", "{tmp}/none"], r"none"),
    Case("report-a-file", ["report", "{tmp}/f.txt"], r"is a file.*--out folder", {"f.txt": "x"}),
    Case("models-extra-argument", ["models", "x"], r"unrecognized arguments: x"),
    Case("demo-zo-choice", ["demo", "--zo", "adam"], r"invalid choice: 'adam'"),
    Case("bench-misspelt-flag", ["bench", "zo", "--stpes", "3"], r"did you mean --steps\?"),
    Case(
        "flower-run-resume-missing", ["flower", "run", "--resume", "{tmp}/none"], r"cannot resume"
    ),
    Case(
        "flower-up-auth-folder-without-keys",
        ["flower", "up", "--clients", "1", "--auth", "{tmp}"],
        r"lacks node-0.*flower certs DIR --nodes 1",
    ),
    Case("bench-unknown", ["bench", "speed"], r"invalid choice: 'speed'"),
    Case("command-unknown", ["fine-tune"], r"invalid choice: 'fine-tune'"),
    Case("flower-up-no-nodes", ["flower", "up", "--clients", "0"], r"at least one SuperNode"),
    Case(
        "flower-up-missing-tls",
        ["flower", "up", "--clients", "1", "--tls", "{tmp}/tls"],
        r"lacks ca\.crt",
    ),
    # --- numbers refused by the parser, before a benchmark or Flower starts ----------
    Case("bench-rounds-zero", ["bench", "fed", "--rounds", "0"], r"--rounds.*>= 1, got 0"),
    Case("bench-rounds-word", ["bench", "fed", "--rounds", "ten"], r"--rounds.*>= 1.*'ten'"),
    Case("bench-clients-negative", ["bench", "flower", "--clients", "-2"], r"--clients.*-2"),
    Case("bench-steps-zero", ["bench", "memory", "--steps", "0"], r"--steps.*>= 1, got 0"),
    Case("bench-batch-size-zero", ["bench", "memory", "--batch-size", "0"], r"--batch-size.*0"),
    Case("bench-seq-len-negative", ["bench", "memory", "--seq-len", "-8"], r"--seq-len.*-8"),
    Case("bench-tta-steps-negative", ["bench", "zo", "--tta-steps", "-1"], r"--tta-steps.*>= 0"),
    Case("bench-seeds-word", ["bench", "compress", "--seeds", "a,b"], r"--seeds.*'a,b'"),
    Case(
        "bench-compress-adapter-two-seeds",
        ["bench", "compress", "--quick", "--adapter", "{tmp}", "--work", "{tmp}/w"],
        r"--seeds gives 2.*Give --seeds S .*or drop --adapter",
        {"adapter_config.json": "{}"},
    ),
    Case(
        "bench-compress-adapter-missing",
        [
            "bench",
            "compress",
            "--quick",
            "--adapter",
            "{tmp}/nope",
            "--seeds",
            "0",
            "--work",
            "{tmp}/w",
        ],
        r"nope is not a PEFT adapter folder.*drop --adapter",
    ),
    Case(
        "bench-compress-flag-it-ignores",
        ["bench", "memory", "--quick", "--seeds", "3"],
        r"bench memory does not use --quick, --seeds; drop it",
    ),
    Case(
        "bench-flag-it-ignores",
        ["bench", "memory", "--rounds", "3", "--peft", "lora-fa"],
        r"bench memory does not use --peft, --rounds; drop it",
    ),
    Case(
        "flower-up-port-too-big",
        ["flower", "up", "--clients", "1", "--port", "70000"],
        r"port: .*0\.\.65535.*70000; pass --port 0",
    ),
    Case("flower-up-port-negative", ["flower", "up", "--clients", "1", "--port", "-1"], r"--port"),
    Case("flower-run-local-zero", ["flower", "run", "--local", "0"], r"--local.*>= 1, got 0"),
    Case(
        "flower-certs-nodes-negative", ["flower", "certs", "{tmp}/c", "--nodes", "-1"], r"--nodes"
    ),
    Case(
        "flower-certs-dir-is-file",
        ["flower", "certs", "{tmp}/f.txt"],
        r"f\.txt: File exists.*not a file",
        {"f.txt": "x"},
    ),
    Case(
        "flower-certs-under-file",
        ["flower", "certs", "{tmp}/f.txt/certs"],
        r"f\.txt/certs.*not inside one",
        {"f.txt": "x"},
    ),
    # --- settings the chosen method would never read --------------------------------
    Case(
        "prge-fwdgrad",
        ft("--method", "prge", "zo.estimator=fwdgrad"),
        r"zo\.estimator='fwdgrad'.*prge.*--method zo",
    ),
    Case(
        "prge-one-sided",
        ft("--method", "prge", "zo.estimator=one-sided"),
        r"zo\.estimator='one-sided'.*prge",
    ),
    Case("fo-zo-queries", ft("--method", "fo", "--queries", "8"), r"zo\.queries=8.*'fo'"),
    Case("fo-zo-optimizer", ft("--method", "fo", "zo.optimizer=adam"), r"zo\.optimizer.*'fo'"),
    Case("zo-parallel-inner", ft("zo.parallel_inner=false"), r"zo\.parallel_inner.*'zo'"),
    Case("zo-max-queries-central", ft("zo.max_queries=4"), r"zo\.max_queries.*fwdgrad"),
    Case("prge-exact-restore", ft("--method", "prge", "zo.exact_restore=true"), r"exact_restore"),
    Case("zo-optim-name", ft("optim.name=sgd"), r"optim\.name='sgd'.*'zo'.*zo\.optimizer"),
    Case("prge-grad-clip", ft("--method", "prge", "optim.grad_clip=0.5"), r"optim\.grad_clip"),
    Case("fo-adamw-momentum", ft("--method", "fo", "optim.momentum=0.9"), r"optim\.name=sgd"),
    # HellaSwag: a malformed file names itself and the line; settings it would ignore
    Case(
        "hellaswag-bad-gold",
        hs("--dataset", "{tmp}/hs.txt"),
        r"hs\.txt, line 2: '7' is not a gold ending index",
        {"hs.txt": "Cat: a cat sits. it\n7\nsleeps.\nruns.\neats.\nflies.\n"},
    ),
    Case(
        "hellaswag-truncated",
        hs("--dataset", "{tmp}/hs.txt"),
        r"hs\.txt, line 7: the last task has 2 of its 6 lines",
        {"hs.txt": "Cat: a cat sits. it\n1\nsleeps.\nruns.\neats.\nflies.\nDog: x\n0\n"},
    ),
    Case("hellaswag-max-length", hs("--max-length", "64"), r"data\.max_length=64.*not act"),
    Case("hellaswag-builtin-dataset", hs("--dataset", "sst2"), r"sst2 is a built-in dataset"),
    Case("finetune-hellaswag", ft("--task", "hellaswag"), r"benchmark.*edgetune eval --task"),
]


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory, stories260k_path: Path) -> Path:
    """A LoRA adapter trained (one step) on a tiny random Llama of another width."""
    from transformers import AutoTokenizer

    from edgetune.models.tiny import tiny_llama

    root = tmp_path_factory.mktemp("other")
    tiny_llama(vocab_size=512, hidden_size=32).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(stories260k_path).save_pretrained(root / "model")
    argv = ft("--model", str(root / "model"), "--out", str(root / "run"))
    argv = [a.replace("{tmp}", str(root)) for a in argv]
    assert main(argv) == 0
    return root / "run" / "adapter"


def _write_files(tmp: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _run_in_process(argv: list[str], capfd) -> tuple[int | str | None, str]:
    """(exit status, everything printed); an escaping exception fails as a traceback."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse exits with 2 on a bad command line
        status = exc.code
    except Exception:  # noqa: BLE001 - classify, then fail with the traceback shown
        pytest.fail(f"TRACEBACK: {traceback.format_exc()[-3000:]}")
    captured = capfd.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_message(case, tmp_path, capfd, stories260k_path, request):
    # Prepare
    _write_files(tmp_path, case.files)
    other = request.getfixturevalue("other_adapter") if "{other}" in str(case.argv) else ""
    argv = [
        a.replace("{model}", str(stories260k_path))
        .replace("{tmp}", str(tmp_path))
        .replace("{other}", str(other))
        for a in case.argv
    ]
    # Execute
    status, output = _run_in_process(argv, capfd)
    # Assert
    if status == 0:
        pytest.fail(f"SILENT: exit 0\n{output[-1000:]}")
    assert status == 2, f"WRONG STATUS {status}: {output[-1000:]}"
    assert "Traceback" not in output
    assert re.search(case.message, output, re.IGNORECASE | re.DOTALL), (
        f"WRONG MESSAGE: {output[-600:]}"
    )


def test_the_table_is_broad():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Excel and Notepad write first


@pytest.mark.parametrize(
    "files",
    [
        {"d.csv": BOM + (HEADER + ROWS).encode()},
        {"d.tsv": BOM + (HEADER + ROWS).replace(",", "\t").encode()},
    ],
    ids=["csv-bom", "tsv-bom"],
)
def test_a_byte_order_mark_trains_like_the_plain_file(files, tmp_path, capfd, stories260k_path):
    # Prepare: the same rows with and without the mark
    name, body = next(iter(files.items()))
    for kind, content in (("bom", body), ("plain", body[len(BOM) :])):
        (tmp_path / kind).mkdir()
        _write_files(tmp_path / kind, {name: content})
    summaries = {}
    for kind in ("bom", "plain"):
        argv = [
            a.replace("{model}", str(stories260k_path)).replace("{tmp}", str(tmp_path / kind))
            for a in ft("--dataset", "{tmp}/" + name, "--threads", "1")
        ]
        # Execute
        status, output = _run_in_process(argv, capfd)
        assert status == 0, output[-1000:]
        summaries[kind] = json.loads((tmp_path / kind / "run" / "summary.json").read_text())
    # Assert: the "sentence" column was found, and the runs are the same
    assert summaries["bom"]["train_examples"] == summaries["plain"]["train_examples"] == 8
    assert summaries["bom"]["final_loss"] == summaries["plain"]["final_loss"]


@pytest.mark.parametrize(
    ("argv", "message", "files"),
    [
        (ft("--stpes", "5"), r"did you mean --steps\?", {}),
        (fed(*FLEET), r"up_mbps", fleet(GOOD.replace("up_mbps: 12", "up_mbps: 0"))),
    ],
    ids=["misspelt-flag", "fleet-up-zero"],
)
def test_bad_input_in_a_real_process(argv, message, files, tmp_path, stories260k_path):
    # Prepare
    _write_files(tmp_path, files)
    argv = [
        a.replace("{model}", str(stories260k_path)).replace("{tmp}", str(tmp_path)) for a in argv
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "edgetune.cli", *argv], capture_output=True, text=True, env=env
    )
    # Assert
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr[-2000:]


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every float (or optional float) field of config class `cls`."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _float_keys(hint, f"{prefix}{f.name}.")
        elif hint is float or float in typing.get_args(hint):
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("cls", [FinetuneConfig, FederateConfig])
def test_every_float_setting_rejects_nan_and_infinity(cls):
    keys = _float_keys(cls)
    assert {"optim.lr", "zo.eps"} <= set(keys)
    for key in keys:
        for value in (".nan", "nan", ".inf", "-inf"):
            with pytest.raises(ConfigError, match=rf"{re.escape(key)}: expected a finite number"):
                resolve_config(cls, None, [f"{key}={value}"])
