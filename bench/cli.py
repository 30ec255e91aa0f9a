"""`bench` command line: argument parsing only; the work happens in the modules it calls."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from bench.errors import NonFiniteLoss, PeerLost, RunStopped, UsageError
from bench.options import strip_flag


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def option_flags(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: dict, shown: dict[str, Any],
                sources: dict[str, str]) -> None:
    """One flag per option, grouped; values stay strings here and are typed by the config layer.
    The help shows the value the run would get (`shown`) and where it comes from."""
    groups: dict[str, Any] = {}
    for key, opt in options.items():
        group = groups.setdefault(opt.group, parser.add_argument_group(f"{opt.group} options"))
        origin = sources.get(key, "default")
        value = shown.get(key, opt.default)
        default = "" if value is None else f" (default: {value}{'' if origin == 'default' else ', ' + origin})"
        if opt.kind is bool:
            group.add_argument(option_flags(key), dest=key, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=opt.help + default)
        else:
            group.add_argument(option_flags(key), dest=key, default=argparse.SUPPRESS, metavar=opt.kind.__name__.upper(),
                               choices=None, help=opt.help + (f" {{{', '.join(map(str, opt.choices))}}}" if opt.choices else "") + default)


def cmd_run(argv: Sequence[str]) -> int:
    from bench.config import all_options, resolve
    from bench.method.base import get_method, method_names

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: bench run METHOD [options]\n\nMETHOD: {', '.join(method_names())}\n"
              f"`bench run METHOD --help` lists every option of that method.")
        return 0 if argv else 2
    method_cls = get_method(argv[0])
    from bench.config import preset_names, render
    parser = Parser(prog=f"bench run {method_cls.name}", description=method_cls.description or None,
                    epilog="Defaults shown are those of the chosen --preset (give it before --help to see them); "
                           "the resolved config is saved with the run (config.json).")
    parser.add_argument("--preset", default=None, help=f"{', '.join(preset_names())}, or a preset .yaml file "
                        f"(default: none, the built-in defaults)")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue an interrupted run (its id under <results-dir>/runs, or its path)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (defaults < "
                        "preset < study < flags, each value with its source) and exit without running")
    parser.add_argument("--nproc", type=int, default=1, metavar="K", help="run on K ranks of this machine (one "
                        "GPU each, or K CPU processes), started as torchrun would; the batch stays global "
                        "(default 1)")
    add_set_argument(parser)
    add_plugin_argument(parser)
    parser.add_argument("--study-layer", default=None, help=argparse.SUPPRESS)  # set by `bench study`
    shown, sources = {}, {}
    try:  # the help shows the values of the preset named on the command line
        shown = resolve(method_cls, preset=_peek(argv, "--preset"), sources=sources)
    except UsageError:
        pass  # a bad preset is reported by the real parse below
    add_options(parser, all_options(method_cls), shown, sources)
    args = vars(parser.parse_args(argv[1:]))
    preset, resume, print_config = args.pop("preset"), args.pop("resume"), args.pop("print_config")
    nproc = args.pop("nproc")
    args.pop("plugin")  # loaded before the parse (main), so the method could be named
    study = parse_json(args.pop("study_layer"))
    sources = {}
    cfg = resolve(method_cls, preset=preset, study=study, cli={**parse_sets(args.pop("set")), **args},
                  sources=sources)
    if print_config:
        print(render(cfg, sources), end="")
        return 0

    if nproc != 1:
        return launch_ranks(cfg, resume, nproc, argv)
    from bench.distributed import world
    run_id, result = train_config(cfg, resume)
    if world().is_main:
        print(f"run {run_id} COMPLETED: test acc {result['test_acc']:.2f} (EMA {result['test_acc_ema']:.2f}, "
              f"selected on validation {result['test_acc_selected']:.2f}) in {result['minutes']:.1f} min")
    return 0


def train_config(cfg: dict[str, Any], resume: str | None = None) -> tuple[str, dict]:
    """Train a resolved config as this process's rank (joining the launch it belongs to, if
    any): (run id, result)."""
    from bench import distributed
    from bench.run.link import StudyLink
    from bench.run.runner import execute
    w = distributed.join(cfg["device"], cfg["dist_timeout"])
    cfg = {**cfg, "device": distributed.world_device(w, cfg["device"])}
    try:
        with distributed.stop_on_sigterm():
            return execute(cfg, resume=resume, link=StudyLink.from_env())  # a study worker's, if any
    finally:
        distributed.leave()


def launch_ranks(cfg: dict[str, Any], resume: str | None, nproc: int, argv: Sequence[str]) -> int:
    """`--nproc K`: check everything a rank would (nothing written), then start the K ranks."""
    import torch

    from bench.distributed.launch import launch
    from bench.distributed.world import check_devices, from_env
    from bench.run.prepare import prepare
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: give a number of ranks >= 1")
    if from_env() is not None:
        raise UsageError("--nproc inside a launched run (torchrun or srun already started the ranks); drop --nproc")
    if cfg["device"] != "cpu" and torch.cuda.is_available():
        check_devices(nproc, "cuda", torch.cuda.device_count())
    prepare(cfg, resume, nproc)
    import dataclasses
    import tempfile
    from pathlib import Path

    from bench.run.link import StudyLink
    link = StudyLink.from_env()  # a study worker's, if it started this launch
    with tempfile.TemporaryDirectory() as tmp:
        if link.run_id_file is None:  # the launcher names the run in its messages
            link = dataclasses.replace(link, run_id_file=Path(tmp) / "run_id")
        return launch(nproc, strip_flag(list(argv), "--nproc"), link.to_env(), link.run_id_file)


PLUGIN_COMMANDS = ("run", "study", "tune", "report")


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                        help="a .py file or importable module registering methods of your own with "
                        "@register(\"name\") (repeatable); a study hands it on to every cell")


def _peek(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in raw argv (`--flag V` or `--flag=V`), before parsing."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def finite_float(text: str) -> float:
    """argparse type: a finite float (inf and nan are rejected)."""
    import math
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any option as in a preset file, e.g. --set steps=200 (repeatable)")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a layer; `--set METHOD.KEY=VALUE` sets KEY for that method only
    (as a preset's `methods:` section does), e.g. --set semi_vit.finetune_steps=100."""
    import yaml
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=200")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        method, dot, name = key.strip().replace("-", "_").rpartition(".")
        if dot:
            out.setdefault("methods", {}).setdefault(method, {})[name] = parsed
        else:
            out[name] = parsed
    return out


def parse_json(text: str | None) -> dict[str, Any]:
    import json
    return json.loads(text) if text else {}


def cmd_study(argv: Sequence[str]) -> int:
    from bench.study.spec import study_names
    parser = Parser(prog="bench study", description="run a study's grid of cells as Optuna trials, "
                    "one Sacred run each, then write its report")
    parser.add_argument("study", help=f"one of {', '.join(study_names())}, or a study .yaml file")
    add_study_arguments(parser)
    parser.add_argument("--data", default=None, help="dataset archive or folder, as `bench run --data` "
                        "(default: CIFAR is downloaded, synthetic generated)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the study's)")
    parser.add_argument("--plan", action="store_true", help="print the study's plan (cells, shared stages, what is "
                        "recorded, the estimated time on this device, cuts) and exit, writing nothing")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once on this machine, one "
                        "`bench run` process each (default 1)")
    parser.add_argument("--heartbeat", type=finite_float, default=30.0, help="seconds between trial heartbeats; "
                        "a trial silent for 4 heartbeats is retried")
    parser.add_argument("--gpus-per-trial", type=int, default=1, metavar="K", help="run each cell on K ranks "
                        "(`bench run --nproc K`): K GPUs of the worker's own, or K CPU processes (default 1)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local", help="local: the workers "
                        "are processes of this command; slurm: each worker is a SLURM job (submitit), requeued "
                        "on preemption, and this command waits for them (default local)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="a submitit "
                        "SlurmExecutor parameter for --launcher slurm, e.g. --slurm partition=gpu --slurm time=240 "
                        "--slurm gpus_per_node=8 (repeatable)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a bar over cells and the step, accuracy and ETA of running cells")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    from bench.study.commands import run_study
    return run_study(args, parse_sets(args.set), list(argv))


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, help="dataset (default: the study's datasets)")
    parser.add_argument("--preset", default=None, help="a shipped preset (see `bench list`) or a preset .yaml "
                        "file (default: the study's, else the one this device can finish: cpu on a CPU, fast on "
                        "a GPU)")
    parser.add_argument("--storage", default=None, help="Optuna storage: an RDB URL such as "
                        "postgresql://user@host/db to share a study between machines (default: a journal "
                        "file under <results-dir>/studies)")
    parser.add_argument("--results-dir", default="results", help="output root holding runs/, studies/ and "
                        "reports/ (default: results)")
    parser.add_argument("--report-dir", default=None, type=Path, help="write the report to REPORT_DIR/<study>/"
                        "<dataset>-<preset>/ (e.g. results/published) instead of "
                        "<results-dir>/reports/<study>/<dataset>-<preset>/")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="only these methods: the study's (a sub-grid; its cells are the study's own) or any "
                        "other registered method, a plugin's included (its cells join the study's)")
    add_plugin_argument(parser)
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help="only these of the study's variants (a sub-grid, as --methods)")
    parser.add_argument("--values", action="append", default=[], metavar="AXIS=V1,V2",
                        help="only these values of an axis, e.g. --values label_fraction=0.01,0.1; a value the "
                        "study does not list becomes a new cell of that axis (repeatable); --values seed=1 runs "
                        "only those seeds")


def cmd_report(argv: Sequence[str]) -> int:
    parser = Parser(prog="bench report", description="rebuild a study's tables and figures from the stores")
    parser.add_argument("study", help="a shipped study (see `bench list`) or a study .yaml file")
    add_study_arguments(parser)
    args = parser.parse_args(argv)
    from bench.study.commands import report_study
    return report_study(args)


def cmd_tune(argv: Sequence[str]) -> int:
    parser = Parser(prog="bench tune", description="TPE search of a method's hyperparameters on "
                    "validation accuracy, with pruning; saves the best as a preset file")
    parser.add_argument("method", help="the method to tune (see `bench list`)")
    parser.add_argument("--dataset", default="synthetic", help="dataset to tune on (default: synthetic)")
    parser.add_argument("--data", default=None, help="dataset archive or folder, as `bench run --data`")
    parser.add_argument("--preset", default=None, help="preset the trials start from; the best parameters "
                        "are written on top of it (default: none)")
    parser.add_argument("--trials", type=int, default=20, help="finished (complete or pruned) trials the "
                        "search should hold (default 20); a rerun runs only the missing ones")
    parser.add_argument("--space", default=None, help="search space YAML: {option: {low, high, log} | "
                        "{choices: [...]}} (default: the method's built-in space)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, e.g. postgresql://user@host/db "
                        "(default: the journal file <results-dir>/studies/optuna.journal)")
    parser.add_argument("--results-dir", default="results", help="output root: the trials' runs/ and the "
                        "best preset in tuned/ (default: results)")
    parser.add_argument("--report-dir", default=None, type=Path, help="keep the search in REPORT_DIR/tune/"
                        "<method>-<dataset>-<preset>/: its journal (the default storage then), trials.csv, "
                        "history, curves and importance figures, best.yaml (how results/published/ is made)")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds between a running trial's "
                        "heartbeats; a trial silent for 4 of them belonged to a dead tuner and is retried "
                        "(default 30)")
    parser.add_argument("--stop-after", type=float, default=None, metavar="MINUTES", help="start no new "
                        "trial after this many minutes (the running one finishes); the same command later "
                        "runs the rest (default: run until --trials are finished)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show each trial's progress bar")
    parser.add_argument("--plan", action="store_true", help="print the search's plan (trials left, the estimated "
                        "time on this device) and exit, writing nothing")
    add_set_argument(parser)
    add_plugin_argument(parser)
    args = parser.parse_args(argv)
    from bench.study.tune import tune
    return tune(args, parse_sets(args.set))


def cmd_speed(argv: Sequence[str]) -> int:
    parser = Parser(prog="bench speed", description="steady-state images/s, step time, TFLOP/s, MFU, "
                    "peak memory and view share of each method's training step")
    parser.add_argument("--methods", nargs="+", default=None, help="methods to measure (default: all)")
    parser.add_argument("--preset", default=None, help="preset to measure (default: smoke)")
    parser.add_argument("--suite", default=None, help="measure a suite of workloads with reference figures "
                        "and targets instead: 'targets' (the H100 target table) or a suite .yaml file")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps per workload "
                        "with torch.profiler and write the top operators / kernels (default 0: off)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: the preset's)")
    parser.add_argument("--allreduce", action="store_true", help="instead: the time of one gradient all-reduce "
                        "on --nproc local processes for ViT-S/B/L/H and the preset's model (the inputs of the "
                        "scaling figures in docs/PERFORMANCE.md)")
    parser.add_argument("--nproc", type=int, default=2, help="processes for --allreduce (default 2)")
    parser.add_argument("--peak-tflops", type=finite_float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: the suite's, else 989, H100 SXM)")
    parser.add_argument("--results-dir", default="results", help="tables go to <results-dir>/speed/ "
                        "(default: results)")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    from bench.speed import speed
    return speed(args, parse_sets(args.set))


def cmd_list(argv: Sequence[str]) -> int:
    from bench.config import preset_names
    from bench.data.dataset import DATASETS
    from bench.method.base import REGISTRY, method_names

    Parser(prog="bench list", description="list methods, datasets and presets").parse_args(argv)
    print("methods:")
    for name in method_names():
        print(f"  {name:14s} {REGISTRY[name].description}")
    print("datasets:\n  " + ", ".join(DATASETS))
    print("presets:\n  " + ", ".join(preset_names()))
    from bench.study.spec import study_names
    print("studies:\n  " + ", ".join(study_names()))
    return 0


def version_line() -> str:
    from bench.run.provenance import git_state, versions
    git = git_state()
    where = f" (git {git['commit'][:12]}{', modified' if git['dirty'] else ''})" if git else ""
    return f"ssvit-bench {versions()['ssvit-bench']}{where}"


def cmd_export(argv: Sequence[str]) -> int:
    parser = Parser(prog="bench export", description="write a run's classifier as a folder timm loads offline: "
                    "timm.create_model('local-dir:DIR', pretrained=True)")
    parser.add_argument("run", help="a run id under <results-dir>/runs, or a run folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (new or empty)")
    parser.add_argument("--final", action="store_true", help="the run's last model instead of the one "
                        "selected on validation")
    parser.add_argument("--results-dir", default="results", help="where run ids are looked up (default: results)")
    args = parser.parse_args(argv)
    from bench.run.export import export_run
    from bench.run.prepare import find_run_dir
    done = export_run(find_run_dir(args.results_dir, args.run), args.out, final=args.final)
    print(f"exported {done['architecture']} ({done['num_classes']} classes; {done['weights']}) to {done['out']}: "
          f"timm.create_model('local-dir:{done['out']}', pretrained=True)")
    return 0


COMMANDS = {"run": (cmd_run, "train one method as a tracked run"),
            "study": (cmd_study, "run a study (grid x seeds) and write its report"),
            "report": (cmd_report, "rebuild a study's tables and figures"),
            "tune": (cmd_tune, "search hyperparameters with Optuna TPE"),
            "speed": (cmd_speed, "measure each method's training-step throughput"),
            "export": (cmd_export, "write a run's classifier as a folder timm loads"),
            "list": (cmd_list, "list methods, datasets, presets and studies")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bench [--version] COMMAND [options]\n\ncommands:")
        for name, (_, help) in COMMANDS.items():
            print(f"  {name:8s} {help}")
        print("\n`bench COMMAND --help` for the options of a command.")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"bench: unknown command '{argv[0]}'; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from bench.distributed import world
    try:
        if argv[0] in PLUGIN_COMMANDS:  # before any parse: a plugin's methods are names the parse accepts
            from bench.method.plugins import load_plugin, plugin_args
            for spec in plugin_args(argv[1:]):
                load_plugin(spec)
        return COMMANDS[argv[0]][0](argv[1:])
    except UsageError as e:
        if world().is_main:  # every rank meets the same bad input; one says so
            print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"run FAILED: {e}", file=sys.stderr)
        return 1
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PeerLost as e:
        print(f"run FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted: {str(e) or 'stopped before a run started; nothing to resume'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
