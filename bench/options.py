"""Option declarations: every knob has a default, a type, a help line and a check."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from bench.errors import UsageError

# Option groups: how `--help` groups the flags, and what an earlier stage takes from the run
# (bench.method.stage.Stage.inherits). Named once, here.
DATA, SPLIT, MODEL, OPTIM, VIEWS, RUN, START, PSEUDO = ("data", "split", "model", "optim", "views", "run", "start",
                                                        "pseudo-labels")


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    type: type | None = None          # inferred from the default when None
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    check_msg: str = ""
    group: str = "method"

    @property
    def kind(self) -> type:
        if self.type is not None:
            return self.type
        if self.default is None:
            return str
        return type(self.default)

    def convert(self, key: str, value: Any, flag: str | None = None) -> Any:
        """Coerce `value` (from YAML or the CLI) to this option's type; raise UsageError if
        invalid, naming `flag` (default: the key's own)."""
        flag = "--" + (flag or key).replace("_", "-")
        if value is None:
            if self.default is None:
                return None
            raise UsageError(f"{flag} needs a value; give a {self.kind.__name__}")
        kind = self.kind
        try:
            if kind is bool:
                value = _to_bool(value)
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise UsageError(f"{flag}: {value!r} is not a finite number; give a finite float "
                                     f"(default {self.default!r})")
            else:
                value = kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: {value!r} is not a valid {kind.__name__}; "
                             f"give a {kind.__name__} (default {self.default!r})") from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{flag}: {value!r} is not one of {', '.join(map(str, self.choices))}; "
                             f"pick one of those")
        if self.check is not None and not self.check(value):
            raise UsageError(f"{flag}: {value!r} is out of range; it must be {self.check_msg}")
        return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


# Small reusable range checks, so option declarations read like the spec.
def positive(msg: str = "> 0") -> dict:
    return {"check": lambda v: v > 0, "check_msg": msg}


def non_negative() -> dict:
    return {"check": lambda v: v >= 0, "check_msg": ">= 0"}


def unit_open_closed() -> dict:
    return {"check": lambda v: 0 < v <= 1, "check_msg": "in (0, 1]"}


def unit_closed() -> dict:
    return {"check": lambda v: 0 <= v <= 1, "check_msg": "in [0, 1]"}


def unit_open() -> dict:
    return {"check": lambda v: 0 <= v < 1, "check_msg": "in [0, 1)"}


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag V` / `flag=V`."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out
