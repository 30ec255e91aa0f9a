"""Bad input through the real CLI entry point: every option of every method given an invalid
value, and broken datasets, study files and directories. Each gets one line on stderr naming the
problem, exit code 2, no traceback, and nothing written under the results directory."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from bench.config import CORE_OPTIONS, all_options
from bench.method.base import get_method, method_names
from builders import build_cifar10, write_image_folder
from helpers import assert_rejected, run_cli

# Free-text options: a bad value and the words the error must contain.
FREE_TEXT = {
    "encoder": ("vit_nope", "unknown timm ViT 'vit_nope'"),
    "device": ("gpu7", "--device 'gpu7' is not a device"),
    "data": ("{tmp}/nowhere.tar.gz", "nowhere.tar.gz"),
    "cache_dir": ("{tmp}/a_file/cache", "cache directory"),
    "unlabeled_data": ("{tmp}/nowhere", "--unlabeled-data {tmp}/nowhere: no such file or directory"),
    "results_dir": ("{tmp}/a_file/results", "results directory"),
    "mongo": ("mongodb://127.0.0.1:1/x", "mongo"),
    "split_file": ("{tmp}/nowhere.txt", "--split-file {tmp}/nowhere.txt: cannot read it"),
    "init_from": ("{tmp}/nowhere.pth", "--init-from {tmp}/nowhere.pth: no such file"),
}


def invalid_values(key, opt):
    """(value, expected words) pairs that the option must reject."""
    flag = "--" + key.replace("_", "-")
    if key in FREE_TEXT:
        return [FREE_TEXT[key]]
    if opt.choices is not None:
        return [("nope", f"{flag}: 'nope' is not one of")]
    if opt.kind is bool:
        return [("maybe", f"{flag}: 'maybe' is not a valid bool")]
    cases = [("abc", f"{flag}: 'abc' is not a valid {opt.kind.__name__}")]
    if opt.kind is float:
        cases += [("inf", f"{flag}: inf is not a finite number"), ("nan", f"{flag}: nan is not a finite number")]
    if opt.check is not None:
        cases.append(("-1", f"{flag}: -1"))
    return cases


def option_cases():
    seen = set()
    for method in method_names():
        for key, opt in all_options(get_method(method)).items():
            if key in CORE_OPTIONS and key in seen:
                continue
            seen.add(key)
            for value, words in invalid_values(key, opt):
                yield pytest.param(method, key, value, words, id=f"{method}-{key}={value}")


@pytest.mark.parametrize("method, key, value, words", list(option_cases()))
def test_every_option_rejects_an_invalid_value(tmp_path, capsys, monkeypatch, method, key, value, words):
    (tmp_path / "a_file").write_text("")
    value, words = value.format(tmp=tmp_path), words.format(tmp=tmp_path)
    dataset = ["--set", "dataset=cifar10"] if key == "data" else []
    results = tmp_path / "results"
    quiet = [] if key == "progress" else ["--no-progress"]  # a flag would override --set
    args = ["run", method, "--preset", "smoke", *quiet, *dataset, "--set", f"{key}={value}"]
    if key != "results_dir":
        args += ["--results-dir", str(results)]
    code, lines, err = run_cli(args, tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, words, results)
    assert not (tmp_path / "results").exists()


def _truncated(tmp_path):
    archive, _ = build_cifar10(tmp_path)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:2000])
    return ["--dataset", "cifar10", "--data", str(cut)], "corrupt or truncated"


def _junk(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive" * 50)
    return ["--dataset", "cifar10", "--data", str(junk)], "not a readable tar archive"


def _incomplete(tmp_path):
    archive, _ = build_cifar10(tmp_path)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (tmp_path / "x" / "cifar-10-batches-py" / "test_batch").unlink()
    return ["--dataset", "cifar10", "--data", str(tmp_path / "x")], "test_batch is missing"


def _missing(tmp_path):
    return ["--dataset", "cifar100", "--data", str(tmp_path / "cifar-100-python.tar.gz")], "no such file"


def _truncated_image(tmp_path):
    write_image_folder(tmp_path / "imgs")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    (tmp_path / "imgs" / "test" / "a_cls" / "bad.jpg").write_bytes(buf.getvalue()[:50])
    return ["--dataset", "imagefolder", "--data", str(tmp_path / "imgs")], "a_cls/bad.jpg: cannot decode"


def _no_classes(tmp_path):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "test").mkdir()
    return ["--dataset", "imagefolder", "--data", str(tmp_path / "imgs")], "no images under train/<class>/"


def _data_with_synthetic(tmp_path):
    return ["--dataset", "synthetic", "--data", str(tmp_path)], "is ignored by --dataset synthetic"


@pytest.mark.parametrize("make", [_truncated, _junk, _incomplete, _missing, _truncated_image, _no_classes,
                                  _data_with_synthetic])
def test_broken_datasets_are_rejected_before_any_write(tmp_path, capsys, monkeypatch, make):
    extra, words = make(tmp_path)
    results = tmp_path / "results"
    code, lines, err = run_cli(["run", "supervised", "--preset", "smoke", "--no-progress", *extra,
                                "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, words, results)
    assert not list((tmp_path / "cache").rglob("*.npz"))  # nothing cached from bad data


STUDY_FILES = {
    "not YAML": ("methods: [supervised\naxes: {", "not valid YAML (line 2)"),
    "not a mapping": ("- just\n- a list\n", "expected a mapping of axes"),
    "unknown method": ("methods: [fixmatc]\naxes: {lr: {values: [0.1]}}\n", "unknown method 'fixmatc'"),
    "unknown option": ("methods: [supervised]\naxes: {lrr: {values: [0.1]}}\n", "unknown option 'lrr'"),
    "bad axis value": ("methods: [supervised]\naxes: {lr: {values: [-1]}}\n", "--lr: -1"),
    "reference off the axis": ("methods: [supervised]\naxes: {lr: {values: [0.1]}}\ncompare_to: {lr: 0.2}\n",
                               "or {AXIS: VALUE} with one of that axis's values"),
}


@pytest.mark.parametrize("case", STUDY_FILES)
def test_malformed_study_files_are_rejected(tmp_path, capsys, monkeypatch, case):
    text, words = STUDY_FILES[case]
    study = tmp_path / "broken.yaml"
    study.write_text(text)
    results = tmp_path / "results"
    code, lines, err = run_cli(["study", str(study), "--dataset", "synthetic", "--preset", "smoke",
                                "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, words, results)


@pytest.mark.parametrize("args, words", [
    (["run", "fixmatc"], "unknown method 'fixmatc'"),
    (["run", "supervised", "--preset", "quick"], "unknown preset 'quick'"),
    (["study", "nope", "--dataset", "synthetic"], "unknown study 'nope'"),
    (["study", "mask_ratio", "--dataset", "imagenet21k"], "unknown dataset 'imagenet21k'"),
    (["speed", "--methods", "fixmatc"], "unknown method 'fixmatc'"),
    (["speed", "--steps", "0"], "--steps"),
    (["tune", "supervised", "--trials", "0"], "--trials"),
    (["tune", "supervised", "--stop-after", "0"], "--stop-after must be > 0"),
])
def test_unknown_names_and_bad_command_flags(tmp_path, capsys, monkeypatch, args, words):
    results = tmp_path / "results"
    code, lines, err = run_cli([*args, "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, words, results)


@pytest.mark.parametrize("command", [["study", "mask_ratio"], ["tune", "supervised"], ["run", "supervised"]])
def test_hints_name_only_options_the_command_has(tmp_path, capsys, monkeypatch, command):
    """An unwritable cache, set as each command sets it: the fix the error names must work there."""
    import re
    from bench.cli import main
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SSVIT_CACHE", str(tmp_path / "a_file" / "cache"))
    results = tmp_path / "results"
    code, lines, err = run_cli([*command, "--dataset", "synthetic", "--preset", "smoke", "--results-dir",
                                str(results)], tmp_path, capsys, monkeypatch, cache=False)
    assert_rejected(code, lines, err, "cache directory", results)
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    known = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    named = set(re.findall(r"(--[a-z][a-z-]*)", lines[0]))
    assert named and named <= known, (named - known, lines[0])
