"""Where a run came from: package versions, the git commit, the accelerator.

Recorded in Sacred's own fields (dependencies, host info, experiment info), so the file store,
MongoDB and Omniboard all show which code and hardware made a number.
"""
from __future__ import annotations

import shlex
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("ssvit-bench", "torch", "timm", "optuna", "sacred", "numpy")
REPO = Path(__file__).resolve().parents[2]


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# what a study writes into the checkout: its reports under results/ change no code, so a study's
# second cell is not "modified" because its first cell's report was written
NOT_CODE = (":(exclude)results",)


@lru_cache(maxsize=4)
def git_state(repo: Path = REPO) -> dict[str, Any] | None:
    """{"url", "commit", "dirty"} of the checkout this package runs from; None outside git.
    `dirty`: a tracked file outside results/ differs from the commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE))
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        url = git("config", "--get", "remote.origin.url") or str(repo)
    except subprocess.SubprocessError:
        url = str(repo)
    return {"url": url, "commit": commit, "dirty": dirty}


def device_info(device: str) -> dict[str, Any]:
    """The accelerator a run uses and the CUDA / cuDNN it was built against."""
    import torch
    from bench.distributed import pick_device
    dev = pick_device(device)
    info: dict[str, Any] = {"type": dev.type, "torch_threads": torch.get_num_threads(),
                            "cuda_version": torch.version.cuda, "cudnn_version": None}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cudnn_version"] = torch.backends.cudnn.version()
    else:
        info["name"] = "CPU"
    # the kernels torch picked for this CPU: one of the things that must match for two runs of a
    # seed to agree to the bit (the CPU model, thread count and library builds are others)
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def redact(url: str) -> str:
    """The URL without its password, for messages and run records."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def command_line(argv: list[str]) -> str:
    """How this process was started, as `bench ...`, with any URL's password hidden."""
    return shlex.join(["bench", *(redact(arg) if "://" in arg else arg for arg in argv)])
