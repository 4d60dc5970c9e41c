"""The `edgetune` command: one entry point, a subcommand per recipe.

Config comes from defaults < `--config FILE` (YAML) < named flags < `key=value`
overrides. `--help` on a subcommand lists every config key with its default and help
text, generated from the same dataclasses that validate it. User errors print one clear
message (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgetune import __version__
from edgetune.console import quiet_third_party
from edgetune.errors import ConfigError, EdgetuneError

CFG = "cfg:"  # argparse dest prefix of a flag that sets a config key (the rest is the key)


def _config_epilog(cls: type) -> str:
    from edgetune.config import describe

    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set with key=value, or in --config FILE as YAML sections):"]
    lines += [f"  {k:<{width}}  {h} [default: {d}]" for k, d, h in rows]
    return "\n".join(lines)


def _add_config_flags(p: argparse.ArgumentParser, cls: type, keep: Any = None) -> dict[str, Any]:
    """A flag for every config field of `cls` that declares one (`option(..., flag=)`),
    with the field's key, help and default; returns the argument groups by section.

    The first field to claim a flag owns it (sections in the order `cls` declares them,
    so `federate --method` is fed.method, not the refused train.method). `keep(key)`
    limits the keys (eval: the model, the data and the seed).
    """
    from edgetune.config import flag_fields

    groups: dict[str, Any] = {}
    taken: set[str] = set()
    for key, field, flags, kind in flag_fields(cls):
        flags = tuple(f for f in flags if f not in taken)
        if not flags or (keep is not None and not keep(key)):
            continue
        taken.update(flags)
        section = key.rpartition(".")[0] or "run"
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} settings")
        default = field.default_factory() if callable(field.default_factory) else field.default
        text = f"{key}: {field.metadata['help']}"
        if "default" not in text and default != "":  # the help may say it better
            text += f" (default {default})"
        text = text.replace("%", "%%")
        if kind is bool:
            groups[section].add_argument(
                *flags, dest=CFG + key, action="store_true", default=None, help=text
            )
        else:
            metavar = flags[0].lstrip("-").upper().replace("-", "_")
            groups[section].add_argument(*flags, dest=CFG + key, metavar=metavar, help=text)
    return groups


def _add_file_flags(p: argparse.ArgumentParser) -> None:
    """--config FILE and the trailing key=value overrides."""
    p.add_argument("--config", help="YAML config file (defaults < file < flags < key=value)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (default: OMP_NUM_THREADS if set, else the cores other "
        "processes leave free, 1 for tiny models; local SuperNodes share them; child "
        "processes inherit them; see edgetune.threads)",
    )


def _add_run_flags(p: argparse.ArgumentParser, resume: str) -> None:
    """--out's companions: --overwrite, --resume DIR (a non-empty `resume` help)."""
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    if resume:
        p.add_argument("--resume", metavar="DIR", help=resume)


def _add_print_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML (ready for --config FILE) and exit",
    )


def _printed(args: argparse.Namespace, cfg: Any) -> bool:
    """With --print-config: print `cfg` as the YAML `--config` reads back, and say so."""
    if not args.print_config:
        return False
    import yaml

    from edgetune.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return True


def _seed_list(text: str) -> list[int]:
    """`--seeds 0,1` as a list of integers (argparse type)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed like 0,1, got {text!r}")
    return seeds


def _name_list(text: str) -> list[str]:
    """`--tasks sst2,ag-news` as a list of names (argparse type)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names like a,b, got {text!r}")
    return names


def at_least(low: int) -> Any:
    """An argparse `type=` for integers >= `low`: a bad value exits 2 with a message
    naming it and the range, before the command starts anything."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from edgetune.recipes.finetune import FinetuneConfig

    parser = argparse.ArgumentParser(
        prog="edgetune",
        description="Fine-tune, compress and deploy small language models on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show third-party output (library progress bars, warnings, logs)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    from edgetune.fed.config import FederateConfig
    from edgetune.recipes.compress import CompressConfig
    from edgetune.recipes.export import ExportConfig
    from edgetune.recipes.generate import GenerateConfig
    from edgetune.recipes.ondevice import OnDeviceConfig

    def config_command(
        where: Any,
        name: str,
        text: str,
        cls: type,
        description: str | None = None,
        run_arg: bool = False,
    ) -> argparse.ArgumentParser:
        """A command run from a typed config: its flags, --config, key=value, --threads,
        --print-config (and with `run_arg`, an optional RUN that sets the config's `run`)."""
        cmd = where.add_parser(
            name,
            help=text,
            description=description,
            epilog=_config_epilog(cls),
            formatter_class=fmt,
        )
        if run_arg:  # before the key=value list, which would take it otherwise
            cmd.add_argument("run", nargs="?", metavar="RUN", help="a run directory (sets run)")
        _add_config_flags(cmd, cls)
        _add_file_flags(cmd)
        _add_threads_flag(cmd)
        _add_print_config(cmd)
        return cmd

    ft = config_command(sub, "finetune", "fine-tune on one device (fo or zo)", FinetuneConfig)
    _add_run_flags(ft, "continue the run in DIR from its checkpoint")
    fd = config_command(
        sub, "federate", "federated fine-tuning over a simulated fleet", FederateConfig
    )
    _add_run_flags(fd, "continue from the last completed round")

    fl = sub.add_parser("flower", help="real federations on Flower (SuperLink / SuperNodes)")
    flsub = fl.add_subparsers(dest="flower_command", required=True)
    from edgetune.recipes.flower import UpConfig

    config_command(flsub, "up", "start a SuperLink and N SuperNodes on 127.0.0.1", UpConfig)
    frun = config_command(
        flsub,
        "run",
        "run `edgetune federate` on a Flower federation (same run directory)",
        FederateConfig,
    )
    _add_run_flags(frun, "continue from the last completed round")
    g = frun.add_argument_group("flower")
    g.add_argument(
        "--local", type=at_least(1), metavar="N", help="start N local SuperNodes for the run"
    )
    g.add_argument("--home", default="runs/flower-home", help="FLWR_HOME (config.toml, logs)")
    g.add_argument("--connection", default=None, help="flwr connection name in HOME/config.toml")
    g.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for replies")
    g.add_argument("--wait-nodes", type=float, default=120.0, help="seconds to wait for nodes")
    g.add_argument("--devices", help="with --local: device profiles of the nodes, cycled")
    _add_security_flags(g, "with --local: ")
    certs = flsub.add_parser(
        "certs", help="write test TLS certificates for 127.0.0.1 (and SuperNode keys)"
    )
    certs.add_argument("dir", metavar="DIR")
    certs.add_argument("--nodes", type=at_least(0), default=0, help="also write N SuperNode keys")

    from edgetune.recipes.evaluate import EvalConfig

    config_command(
        sub,
        "eval",
        "evaluate a finetune run (`eval RUN`) or a model (and adapter) on a task",
        EvalConfig,
        "`edgetune eval RUN` scores a finetune run's adapter on the rows it held out, with the "
        "run's model, data and prompt settings (only --eval-size and --seed may change). "
        "Without RUN, the settings say what to evaluate.",
        run_arg=True,
    )

    cp = config_command(
        sub,
        "compress",
        "prune and/or int8-quantize a model (and its adapter); measure before and after",
        CompressConfig,
    )
    _add_run_flags(cp, "")
    ex = config_command(
        sub,
        "export",
        "export a model (and adapter) to ONNX, ExecuTorch or GGUF (llama.cpp)",
        ExportConfig,
    )
    _add_run_flags(ex, "")
    od = config_command(
        sub,
        "ondevice",
        "ZO / P-RGE fine-tuning through an exported graph (ONNX Runtime, ExecuTorch)",
        OnDeviceConfig,
    )
    _add_run_flags(od, "")

    config_command(sub, "generate", "greedy generation from a prompt", GenerateConfig)

    sub.add_parser("models", help="list built-in models and whether they are available")
    rep = sub.add_parser("report", help="Markdown report + plots of a run (single or federated)")
    rep.add_argument("run_dir", metavar="DIR")

    demo = sub.add_parser("demo", help="the main job: zero-shot vs ZO LoRA vs FO LoRA")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    demo.add_argument(
        "--zo",
        choices=["prge-top6", "mezo", "prge"],
        default="prge-top6",
        help="the demo's zeroth-order run: P-RGE q=4 on the top 6 blocks (the frozen trunk "
        "below runs once per step), sequential MeZO on all blocks, or P-RGE on all blocks",
    )
    _add_threads_flag(demo)

    bench = sub.add_parser("bench", help="benchmarks (not tests); results to docs/BENCHMARKS.md")
    from edgetune.bench.runner import BENCHES

    bench.add_argument("which", choices=list(BENCHES))
    bench.add_argument(
        "--rounds",
        type=at_least(1),
        help="fed / fedspine / flower / robust / privacy: rounds (default 15 / 12 / 3 / 4 / 20)",
    )
    bench.add_argument(
        "--clients", type=at_least(1), help="fed / flower / robust: clients (default 10 / 2 / 10)"
    )
    bench.add_argument("--peft", default="lora", help="zo: lora | lora-fa")
    bench.add_argument(
        "--tta-steps",
        type=at_least(0),
        default=60,
        help="zo: ZO steps of the time-to-accuracy runs, as many as the demo's (0 = skip)",
    )
    bench.add_argument("--plot", default="docs/bench_zo_time_to_accuracy.png")
    bench.add_argument(
        "--model", help="default: smollm2-135m (robust, compress --quick: stories260k)"
    )
    bench.add_argument("--batch-size", type=at_least(1), default=8)
    bench.add_argument("--seq-len", type=at_least(1), default=128)
    bench.add_argument(
        "--steps", type=at_least(1), help="memory / threads / zo: 3; ondevice: 20 (per row)"
    )
    bench.add_argument("--output", default="docs/BENCHMARKS.md")
    bench.add_argument(
        "--quick", action="store_true", help="compress: stories260K + SST-2 in seconds (tests)"
    )
    bench.add_argument(
        "--seeds",
        type=_seed_list,
        default=[0, 1],
        help="compress: seeds of the 30 %% rows; ondevice: seeds of the zo rows; fed, "
        "fedspine, privacy: seeds of every row",
    )
    bench.add_argument("--adapter", help="compress: the task adapter (default: fine-tune one)")
    bench.add_argument(
        "--tasks",
        type=_name_list,
        default=["sst2", "ag-news", "bbc-news", "dolly-openqa", "tinystories"],
        help="tasks: comma-separated datasets",
    )
    bench.add_argument(
        "--rows",
        type=_name_list,
        help="tasks: comma-separated rows (default fo, fo-top6, zo-mezo, zo-prge, "
        "zo-prge-raw; also zo-prge-3x); fed: comma-separated algorithms (default all: fedit, fedit-ranks, "
        "fedkseed, fedkseed-recipe, fedkseed-pro, fwdllm, fedproj-3840, fedproj-1024, "
        "fedproj-mixed)",
    )
    bench.add_argument(
        "--work",
        help="compress / ondevice / fedspine / fed: run folders (default runs/bench-<which>)",
    )
    # fedspine, for tests: smaller held-out and training sets than the benchmark's
    bench.add_argument("--eval-size", type=at_least(1), help=argparse.SUPPRESS)
    bench.add_argument("--train-size", type=at_least(1), help=argparse.SUPPRESS)
    _add_threads_flag(bench)
    for command in sub.choices.values():  # `edgetune COMMAND --verbose` works too
        command.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    _no_prefix_matching(parser)
    return parser


def _no_prefix_matching(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated flags in every (sub)command: `--step 5` must not become --steps
    (nor, after a new --step-size flag, silently something else)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _no_prefix_matching(command)


def _add_security_flags(g: Any, prefix: str) -> None:
    g.add_argument(
        "--tls",
        metavar="DIR",
        help=f"{prefix}certificates from `edgetune flower certs` "
        "(default: generated into HOME/certs)",
    )
    g.add_argument(
        "--auth",
        metavar="DIR",
        help=f"{prefix}SuperNode keys from `flower certs --nodes N` "
        "(default: generated into HOME/certs/keys)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help=f"{prefix}no TLS and no SuperNode authentication (loopback trials only)",
    )


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the command's flags set (dotted key -> value)."""
    return {
        key[len(CFG) :]: value
        for key, value in vars(args).items()
        if key.startswith(CFG) and value is not None
    }


def _start_threads(args: argparse.Namespace, cfg: Any = None) -> int:
    """Set this process's torch threads (and its children's) before torch does any work;
    `--threads` wins over the config's `threads`, which a run records in config.yaml."""
    from edgetune import threads

    configured = cfg.threads if cfg is not None else 0
    source = "--threads" if args.threads else "threads in the config"
    model = getattr(cfg, "model", None)  # (tiny models get one thread)
    chosen = threads.resolve(args.threads or configured or None, model, source)
    threads.apply(chosen.count)
    args.threads = chosen.count
    if cfg is not None:
        cfg.threads = chosen.count
    return chosen.count


def cmd_finetune(args: argparse.Namespace) -> int:
    from edgetune.config import config_from_run, resolve_config
    from edgetune.recipes import finetune

    if args.resume:
        _check_resume_flags(args)
        cfg = config_from_run(
            finetune.FinetuneConfig,
            args.resume,
            args.overrides,
            _flags(args),
            finetune.RESUME_MAY_CHANGE,
        )
        if _printed(args, cfg):
            return 0
        _start_threads(args, cfg)
        summary = finetune.run(cfg, resume=True)
    else:
        cfg = resolve_config(finetune.FinetuneConfig, args.config, args.overrides, _flags(args))
        if _printed(args, cfg):
            return 0
        _start_threads(args, cfg)
        summary = finetune.run(cfg, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from edgetune.recipes import federate

    cfg = _federate_config(args)
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    if args.resume:
        summary = federate.run(cfg, resume=True)
    else:
        summary = federate.run(cfg, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _federate_config(args: argparse.Namespace) -> Any:
    """The FederateConfig of `federate` / `flower run` flags (or of the run to resume)."""
    from edgetune.config import config_from_run, resolve_config
    from edgetune.recipes import federate

    flags = _flags(args)
    if args.resume:
        _check_resume_flags(args)
        return config_from_run(
            federate.FederateConfig,
            args.resume,
            args.overrides,
            flags,
            federate.RESUME_MAY_CHANGE,
        )
    return resolve_config(federate.FederateConfig, args.config, args.overrides, flags)


def _check_resume_flags(args: argparse.Namespace) -> None:
    """--resume continues a run with its own config: a second config or a restart is a
    different command."""

    if args.config:
        raise ConfigError(
            f"--config cannot be combined with --resume {args.resume}: the run's own "
            "config.yaml is used; give the settings that may change as flags or key=value"
        )
    if args.overwrite:
        raise ConfigError(
            f"--overwrite cannot be combined with --resume {args.resume}; to start the run "
            f"over use --config {Path(args.resume) / 'config.yaml'} --out {args.resume} "
            "--overwrite"
        )


def cmd_flower(args: argparse.Namespace) -> int:
    from edgetune.recipes import flower

    if args.flower_command == "certs":
        from edgetune.flower.certs import write_supernode_keys, write_test_certificates

        print(f"wrote {write_test_certificates(Path(args.dir))}/{{ca.crt,server.pem,server.key}}")
        if args.nodes:
            keys = write_supernode_keys(Path(args.dir) / "keys", args.nodes)
            print(f"wrote {len(keys)} SuperNode key pairs in {Path(args.dir) / 'keys'}")
        return 0
    if args.flower_command == "up":
        from edgetune.config import resolve_config

        up = resolve_config(flower.UpConfig, args.config, args.overrides, _flags(args))
        if _printed(args, up):
            return 0
        _start_threads(args, up)
        return flower.up(up)
    cfg = _federate_config(args)
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    summary = flower.run(cfg, args)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgetune.config import build, given_settings
    from edgetune.recipes import evaluate

    if args.run and "=" in args.run and not Path(args.run).exists():
        args.overrides, args.run = [args.run, *args.overrides], None  # `eval key=value`
    flags = {**_flags(args), **({"run": args.run} if args.run else {})}
    given = given_settings(args.config, args.overrides, flags)
    cfg = build(evaluate.EvalConfig, given)
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    print(json.dumps(evaluate.run(cfg, given), indent=2))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from edgetune.config import resolve_config
    from edgetune.recipes import compress

    cfg = resolve_config(compress.CompressConfig, args.config, args.overrides, _flags(args))
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    summary = compress.run(cfg, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgetune.config import resolve_config
    from edgetune.recipes import export

    cfg = resolve_config(export.ExportConfig, args.config, args.overrides, _flags(args))
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    print(json.dumps(export.run(cfg, overwrite=args.overwrite), indent=2))
    return 0


def cmd_ondevice(args: argparse.Namespace) -> int:
    from edgetune.config import resolve_config
    from edgetune.recipes import ondevice

    cfg = resolve_config(ondevice.OnDeviceConfig, args.config, args.overrides, _flags(args))
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    print(json.dumps(ondevice.run(cfg, overwrite=args.overwrite), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from edgetune.config import resolve_config
    from edgetune.recipes import generate

    cfg = resolve_config(generate.GenerateConfig, args.config, args.overrides, _flags(args))
    if _printed(args, cfg):
        return 0
    _start_threads(args, cfg)
    print(generate.run(cfg))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from edgetune.report.render import render

    print(render(args.run_dir))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from edgetune.models import list_models

    for row in list_models():
        status = "available" if row["available"] else "MISSING"
        print(f"{row['name']:<14} {row['kind']:<10} {status:<10} {row['description']}")
        print(f"{'':<14} from {row['source']}\n{'':<14} at   {row['path']}")
        print(f"{'':<14} license: {row['license']}\n{'':<14} install: {row['install']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgetune.recipes import demo

    _start_threads(args)
    demo.run(args.out, model=args.model, quick=args.quick, zo=args.zo)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edgetune.bench.runner import check_flags, prepare

    check_flags(args, build_parser().parse_args(["bench", args.which]))
    bench = prepare(args)
    _start_threads(args)
    bench.run(args)
    return 0


COMMANDS = {
    "finetune": cmd_finetune,
    "federate": cmd_federate,
    "eval": cmd_eval,
    "compress": cmd_compress,
    "export": cmd_export,
    "ondevice": cmd_ondevice,
    "generate": cmd_generate,
    "models": cmd_models,
    "report": cmd_report,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "flower": cmd_flower,
}


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The (sub)parser of the command in `args` (e.g. `flower run`), for its flags."""
    for name in (args.command, getattr(args, "flower_command", None)):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            break
        parser = subs[0].choices[name]
    return parser


def _did_you_mean(parser: argparse.ArgumentParser, flag: str) -> str:
    """ "did you mean --steps?" for a misspelt `--stpes` ("" when nothing is close)."""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag.split("=", 1)[0], options, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    # key=value overrides may sit anywhere among the flags; argparse only collects one
    # contiguous run of positionals, so gather the rest here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        command = _command_parser(parser, args)
        hints = [_did_you_mean(command, u) for u in unknown if u.startswith("--")]
        command.error(
            f"unrecognized arguments: {' '.join(unknown or extra)}"
            + "".join(f" ({h})" for h in hints if h)
        )
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not args.verbose:
        quiet_third_party()
    try:
        return COMMANDS[args.command](args)
    except EdgetuneError as exc:
        print(f"edgetune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
