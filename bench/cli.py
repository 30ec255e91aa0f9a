"""`bench` command line: argument parsing only; the work happens in the modules it calls."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from bench.errors import NonFiniteLoss, UsageError


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def option_flags(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: dict) -> None:
    """One flag per option, grouped; values stay strings here and are typed by the config layer."""
    groups: dict[str, Any] = {}
    for key, opt in options.items():
        group = groups.setdefault(opt.group, parser.add_argument_group(f"{opt.group} options"))
        default = f" (default: {opt.default})"
        if opt.kind is bool:
            group.add_argument(option_flags(key), dest=key, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=opt.help + default)
        else:
            group.add_argument(option_flags(key), dest=key, default=argparse.SUPPRESS, metavar=opt.kind.__name__.upper(),
                               choices=None, help=opt.help + (f" {{{', '.join(map(str, opt.choices))}}}" if opt.choices else "") + default)


def cmd_run(argv: Sequence[str]) -> int:
    from bench.config import all_options, resolve
    from bench.method import get_method, method_names

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: bench run METHOD [options]\n\nMETHOD: {', '.join(method_names())}\n"
              f"`bench run METHOD --help` lists every option of that method.")
        return 0 if argv else 2
    method_cls = get_method(argv[0])
    parser = Parser(prog=f"bench run {method_cls.name}", description=method_cls.description or None)
    parser.add_argument("--preset", default=None, help="smoke, fast, paper, or a preset .yaml file")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue an interrupted run (its id under <results-dir>/runs, or its path)")
    add_options(parser, all_options(method_cls))
    args = vars(parser.parse_args(argv[1:]))
    preset, resume = args.pop("preset"), args.pop("resume")
    cfg = resolve(method_cls, preset=preset, cli=args)

    from bench.runner import execute
    run_id, result = execute(cfg, resume=resume)
    print(f"run {run_id} COMPLETED: test acc {result['test_acc']:.2f} (EMA {result['test_acc_ema']:.2f}, "
          f"selected on validation {result['test_acc_selected']:.2f}) in {result['minutes']:.1f} min")
    return 0


def cmd_list(argv: Sequence[str]) -> int:
    from bench.config import DATASETS, preset_names
    from bench.method import REGISTRY, method_names

    Parser(prog="bench list", description="list methods, datasets and presets").parse_args(argv)
    print("methods:")
    for name in method_names():
        print(f"  {name:14s} {REGISTRY[name].description}")
    print("datasets:\n  " + ", ".join(DATASETS))
    print("presets:\n  " + ", ".join(preset_names()))
    return 0


COMMANDS = {"run": (cmd_run, "train one method as a tracked run"),
            "list": (cmd_list, "list methods, datasets and presets")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bench COMMAND [options]\n\ncommands:")
        for name, (_, help) in COMMANDS.items():
            print(f"  {name:8s} {help}")
        print("\n`bench COMMAND --help` for the options of a command.")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"bench: unknown command '{argv[0]}'; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"run FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume RUN", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
