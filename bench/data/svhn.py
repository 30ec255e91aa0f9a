"""SVHN (Netzer et al., 2011) from its official MATLAB files: `train_32x32.mat` (73,257),
`test_32x32.mat` (26,032) and, for `--dataset svhn_extra`, `extra_32x32.mat` (531,131 more
labeled training images). Each holds X (32, 32, 3, N) uint8 and y (N, 1) with digits 1..10, 10
standing for 0. Digits are not mirror-symmetric: the views never flip them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import UsageError

URL = "http://ufldl.stanford.edu/housenumbers/"
FILES = {"train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
         "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
         "extra": ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")}


def parts_of(name: str) -> tuple[str, ...]:
    return ("train", "test", "extra") if name == "svhn_extra" else ("train", "test")


def decode(folder: Path, name: str) -> dict[str, Any]:
    """The folder's official files as the suite's arrays (extra joins training for svhn_extra)."""
    arrays = {}
    for part in parts_of(name):
        filename = FILES[part][0]
        path = folder / filename
        if not path.is_file():
            raise UsageError(f"--data {folder}: {filename} is missing; put SVHN's official .mat files there "
                             f"(or leave --data out to download them)")
        arrays[part] = _read(path)
    train = [arrays["train"]] + ([arrays["extra"]] if "extra" in arrays else [])
    return {"classes": [str(d) for d in range(10)],
            "train_x": np.concatenate([x for x, _ in train]), "train_y": np.concatenate([y for _, y in train]),
            "test_x": arrays["test"][0], "test_y": arrays["test"][1]}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat
    try:
        mat = loadmat(path)
        x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # 10 is the digit 0
    except Exception as e:
        raise UsageError(f"{path}: not SVHN's MATLAB format ({type(e).__name__}); download it again") from None
    if x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise UsageError(f"{path}: expected X of 32 x 32 x 3 x N images and N labels; download it again")
    return x, y
