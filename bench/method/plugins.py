"""Methods from the user's own code: a file or module named with `--plugin`, or an installed
package's entry point in the group `ssvit_bench.methods`. Either registers its methods the way the
shipped ones do (`@register("name")` on a `Method` subclass); loading checks the method contract,
so a plugin that breaks it is one line of bad input, not a traceback in a study's cell."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.errors import UsageError

ENTRY_POINT_GROUP = "ssvit_bench.methods"
LOADED: dict[str, dict[str, Any]] = {}   # spec -> {"plugin", "sha256", "methods"}, in load order


def load_plugin(spec: str) -> dict[str, Any]:
    """Import `spec` (a .py file or an importable module) once and check what it registered;
    returns its record: the spec, the sha256 of its source file, the method names it added."""
    if spec in LOADED:
        return LOADED[spec]
    from bench.method.base import REGISTRY, method_names
    method_names()  # the shipped methods first: a plugin cannot take their names
    before = set(REGISTRY)
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UsageError(f"--plugin {spec}: no such file; give a .py file or an importable module")
            name = f"ssvit_plugin_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            source = path
        else:
            module = importlib.import_module(spec)
            source = Path(module.__file__) if getattr(module, "__file__", None) else None
    except UsageError as e:
        _forget(before)
        raise UsageError(f"--plugin {spec}: {e}" if not str(e).startswith("--plugin") else str(e)) from None
    except ModuleNotFoundError as e:
        raise UsageError(f"--plugin {spec}: cannot import it ({e}); give a .py file or an importable module") from None
    except Exception as e:
        _forget(before)
        raise UsageError(f"--plugin {spec}: importing it failed ({type(e).__name__}: {e}); fix the file") from None
    added = sorted(set(REGISTRY) - before)
    if not added:
        raise UsageError(f"--plugin {spec}: it registers no method; decorate a Method subclass with "
                         f"@register(\"name\") (from bench.method import Method, register)")
    sha = hashlib.sha256(source.read_bytes()).hexdigest() if source is not None and source.is_file() else None
    try:
        for name in added:
            check_contract(REGISTRY[name], f"--plugin {spec}")
    except UsageError:
        for name in added:  # a plugin that breaks the contract leaves nothing registered
            REGISTRY.pop(name)
        raise
    for name in added:
        REGISTRY[name].plugin = {"plugin": spec, "sha256": sha}
    LOADED[spec] = {"plugin": spec, "sha256": sha, "methods": added}
    return LOADED[spec]


def _forget(before: set[str]) -> None:
    from bench.method.base import REGISTRY
    for name in set(REGISTRY) - before:
        REGISTRY.pop(name)


def load_entry_points() -> None:
    """Register the methods of every installed package that declares the entry-point group."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name} ({ep.value}) of group {ENTRY_POINT_GROUP}"
        from bench.method.base import REGISTRY
        before = set(REGISTRY)
        try:
            ep.load()
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        except Exception as e:
            raise UsageError(f"{where}: importing it failed ({type(e).__name__}: {e}); fix or uninstall "
                             f"the package") from None
        for name in sorted(set(REGISTRY) - before):
            check_contract(REGISTRY[name], where)
            REGISTRY[name].plugin = {"plugin": f"entry point {ep.value}", "sha256": None}


def check_contract(cls: type, where: str) -> None:
    """A user's method must be a Method that writes its own train step."""
    from bench.method.base import Method
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UsageError(f"{where}: {cls!r} registered as a method is not a subclass of bench.method.Method")
    if cls.own_training and cls.train_step is Method.train_step:
        raise UsageError(f"{where}: method '{cls.name}' has no train_step; define "
                         f"train_step(self, batch) -> (loss, logs)")


def plugin_args(argv: list[str]) -> list[str]:
    """The `--plugin X` / `--plugin=X` values of a command line, in order."""
    out = []
    for i, a in enumerate(argv):
        if a == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--plugin="):
            out.append(a.split("=", 1)[1])
    return out
