"""The bad-input corpus (issue 17): every command against every bad input a user can hand it.

Each case is its own test id. For each one: the exit code (2 bad input or usage, 1 a failed check,
0 where the input is now handled and reported), no traceback, one line naming the file or option,
every input file unchanged (sha256 of every file under the corpus's input directory, before and
after, names included: no temporary file left beside an input), and nothing left in the case's
output directory when the command was refused.

The fixtures are KB-sized and made here from tests/models.py and examples/digits. The one tune
search the corpus needs runs once per module (``tune_run``) and is reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corpus import build, fill, run_cli, snapshot

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only directories


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("corpus"))


# ---- the cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    argv: list[str]  # placeholders: corpus keys ({M}, {C}, ...), {OUT} = this case's output directory
    code: int
    says: tuple[str, ...]  # fragments of the one line (a path or an option among them)
    marks: list = field(default_factory=list)
    leaves: bool = False  # the command succeeds and writes into {OUT}
    warns: tuple[str, ...] = ()  # with code 0: what the warning line says


TUNE = ["tune", "{M}", "--calib", "{C}", "--budget", "cosine>=0.9", "--runtimes", "ort", "--max-trials", "1"]
QUICK = {"bench": ["--iterations", "1", "--warmup", "0"], "profile": ["--runs", "1", "--warmup", "0"],
         "explain": ["--runs", "1"]}
# every writer: (name, argv with {O} for the output, the option that names it, directory output?)
WRITERS = [
    ("inspect", ["inspect", "{M}", "-o", "{O}"], "-o", False),
    ("run", ["run", "{M}", "--data", "{C}", "-o", "{O}"], "-o", False),
    ("compare", ["compare", "{M}", "{M}", "--data", "{C}", "-o", "{O}"], "-o", False),
    ("diagnose-preprocess", ["diagnose-preprocess", "{M}", "{IMAGES}", "--spec", "{GOOD}", "--reference-spec",
                             "{GOOD}", "-o", "{O}"], "-o", False),
    ("bench", ["bench", "{M}", *QUICK["bench"], "-o", "{O}"], "-o", False),
    ("bench-save-optimized", ["bench", "{M}", *QUICK["bench"], "--save-optimized", "{O}"], "--save-optimized", False),
    ("profile", ["profile", "{M}", *QUICK["profile"], "-o", "{O}"], "-o", False),
    ("profile-trace", ["profile", "{M}", *QUICK["profile"], "--trace", "{O}"], "--trace", False),
    ("profile-save-optimized", ["profile", "{M}", *QUICK["profile"], "--save-optimized", "{O}"], "--save-optimized",
     False),
    ("explain", ["explain", "{M}", "{M}", *QUICK["explain"], "-o", "{O}"], "-o", False),
    ("sensitivity", ["sensitivity", "{M}", "--data", "{C}", "-o", "{O}"], "-o", False),
    ("quantize", ["quantize", "{M}", "--data", "{C}", "-o", "{O}"], "-o", False),
    ("fp16", ["fp16", "{M}", "-o", "{O}"], "-o", False),
    ("doctor", ["doctor", "-o", "{O}"], "-o", False),
    ("preflight", ["preflight", "{ART}", "-o", "{O}"], "-o", False),
    ("tune", [*TUNE, "-o", "{O}"], "-o", True),
    ("tune-run-dir", [*TUNE, "-o", "{OUT}/art", "--run-dir", "{O}"], "--run-dir", True),
    ("export-triton", ["export", "triton", "{ART}", "--repo", "{O}"], "Triton model directory", True),
]
# where they are asked to write: (name, file output, directory output, words of the one line)
PLACES = [
    ("proc", "/proc/infertune-bad/out.onnx", "/proc/infertune-bad/out", ("cannot write in /proc",)),
    ("under-a-file", "{FILE}/out.onnx", "{FILE}/out", ("under the regular file", "afile.txt")),
    ("read-only-dir", "{RO}/out.onnx", "{RO}/out", ("cannot write in", "readonly")),
    ("sysfs", "/sys/infertune-bad/out.onnx", "/sys/infertune-bad/out", ("cannot write in /sys",)),
]
# the output is an input of the same command (or holds / lies in one)
SAME_AS_INPUT = {"inspect": "{M}", "run": "{C}", "compare": "{M}", "diagnose-preprocess": "{GOOD}", "bench": "{M}",
                 "bench-save-optimized": "{M}", "profile": "{M}", "profile-trace": "{M}",
                 "profile-save-optimized": "{M}", "explain": "{M}", "sensitivity": "{M}", "quantize": "{M}",
                 "fp16": "{M}", "preflight": "{ART}/manifest.json", "tune": "{IN}", "tune-run-dir": "{IN}",
                 "export-triton": "{ART}"}
SAME_WORDS = {"tune": "holds the input", "tune-run-dir": "holds the input", "export-triton": "input directory",
              "preflight": "input directory", "run": "is an input"}

CASES: dict[str, Case] = {}
for _w, _argv, _opt, _is_dir in WRITERS:
    for _place, _file, _dir, _words in PLACES:
        _marks = {"read-only-dir": [pytest.mark.skipif(ROOT_USER, reason="root writes into a read-only directory")],
                  "sysfs": [pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs here")],
                  "proc": [pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no procfs here")],
                  }.get(_place, [])
        _target = _dir if _is_dir else _file
        CASES[f"{_w}/{_place}"] = Case([a.replace("{O}", _target) for a in _argv], 2, (_opt, *_words), _marks)
    if _w in SAME_AS_INPUT:
        CASES[f"{_w}/output-is-its-input"] = Case([a.replace("{O}", SAME_AS_INPUT[_w]) for a in _argv], 2,
                                                  (_opt, SAME_WORDS.get(_w, "is an input")))

CASES.update({
    # the same file by another name
    "run/output-is-a-hard-link-to-the-model": Case(["run", "{M}", "-o", "{HARD}"], 2, ("hard.onnx", "is an input")),
    "run/model-is-a-symlink-to-the-output": Case(["run", "{SYM}", "-o", "{M}"], 2, ("digits.onnx", "is an input")),
    "run/output-is-the-data": Case(["run", "{M}", "--data", "{C}", "-o", "{C}"], 2, ("c.npz", "is an input")),
    "run/output-inside-the-data-directory": Case(["run", "{M}", "--data", "{DDIR}", "-o", "{DDIR}/ref.npz"], 2,
                                                 ("inside the input directory", "datadir")),
    "quantize/recipe-beside-output-is-the-input-recipe": Case(
        ["quantize", "{M}", "--recipe", "{RECIPE}", "-o", "{Q}"], 2, ("q.recipe.json", "is an input")),
    "bench/two-outputs-one-file": Case(["bench", "{M}", *QUICK["bench"], "-o", "{OUT}/x", "--save-optimized",
                                        "{OUT}/x"], 2, ("--save-optimized", "overlap")),
    # directories infertune did not make, or must never replace
    "tune/foreign-directory": Case([*TUNE, "-o", "{FOREIGN}"], 2, ("foreign", "not an infertune artifact")),
    "tune/working-directory": Case([*TUNE, "-o", "."], 2, ("-o .", "working directory")),
    "tune/filesystem-root": Case([*TUNE, "-o", "/"], 2, ("-o /", "filesystem root")),
    "tune/home-directory": Case([*TUNE, "-o", str(Path.home())], 2, ("home directory",)),
    "tune/literal-tilde": Case([*TUNE, "-o", "~"], 2, ("'~'", "full path")),
    "tune/parent-of-the-inputs": Case([*TUNE, "-o", "{BASE}"], 2, ("holds the input",)),
    "tune/existing-artifact-without-force": Case([*TUNE, "-o", "{ART}"], 2, ("art", "--force")),
    "tune/run-dir-is-foreign": Case([*TUNE, "-o", "{OUT}/a", "--run-dir", "{FOREIGN}"], 2,
                                    ("--run-dir", "foreign", "not an infertune run directory")),
    "tune/run-dir-inside-the-output": Case([*TUNE, "-o", "{OUT}/a", "--run-dir", "{OUT}/a/run"], 2,
                                           ("--run-dir", "overlap")),
    "export/repo-holding-the-artifact": Case(["export", "triton", "{ART}", "--repo", "{IN}"], 2,
                                             ("Triton model directory", "art")),
    "export/foreign-model-directory": Case(["export", "triton", "{ART}", "--repo", "{IN}", "--name", "foreign",
                                            "--force"], 2, ("foreign", "not an infertune Triton export")),
    "export/name-with-a-path": Case(["export", "triton", "{ART}", "--repo", "{OUT}", "--name", "../x"], 2,
                                    ("--name", "'../x'")),
    "export/tampered-artifact": Case(["export", "triton", "{EDITED}", "--repo", "{OUT}"], 2,
                                     ("edited", "digest differs")),
    # integrity: preflight opens what it vouches for (exit 1: the check failed)
    "preflight/edited-manifest": Case(["preflight", "{EDITED}"], 1, ("manifest.json was edited",)),
    "preflight/extra-file": Case(["preflight", "{EXTRA}"], 1, ("not part of the artifact", "notes.txt")),
    "preflight/model-named-report-html": Case(["preflight", "{REPORT_MODEL}"], 1, ("report.html", "not an .onnx")),
    "preflight/external-data-outside": Case(["preflight", "{EXTDATA}"], 1, ("secret.bin", "outside the artifact")),
    "preflight/bad-settings": Case(["preflight", "{BADSETTINGS}"], 1, ("settings are not valid",)),
    "preflight/files-as-a-list": Case(["preflight", "{FILES_LIST}"], 1, ("'files' must be an object", "list")),
    "preflight/files-as-a-string": Case(["preflight", "{FILES_STR}"], 1, ("'files' must be an object", "str")),
    "preflight/100k-deep-manifest": Case(["preflight", "{DEEP}"], 1, ("nested too deeply",)),
    "preflight/20k-file-entries": Case(["preflight", "{MANY}"], 1, ("20000 files", "at most 1000")),
    "preflight/17-mib-manifest": Case(["preflight", "{HUGE}"], 1, ("17 MiB",)),
    "preflight/schema-1-manifest": Case(["preflight", "{SCHEMA1}"], 1,
                                        ("schema_version 1", "without a manifest digest")),
    "preflight/random-bytes-named-engine": Case(["preflight", "{RANDOM_ENGINE}"], 1, ("random.engine",
                                                                                      "no build record")),
    "preflight/engine-record-of-wrong-types": Case(["preflight", "{TYPED_ENGINE}"], 1, ("typed.json", "'gpu'")),
    "preflight/100k-deep-engine-record": Case(["preflight", "{DEEP_ENGINE}"], 1, ("deep.json", "nested too deeply")),
    # labels: checked against the model's classes
    "compare/labels-out-of-range": Case(["compare", "{M}", "{M}", "--data", "{BADLABEL}", "--check",
                                         "top1_drop<=0.5"], 2, ("badlabel.npz", "outside the 10 classes")),
    "compare/string-labels": Case(["compare", "{M}", "{M}", "--data", "{STRLABEL}", "--check", "top1_drop<=0.5"], 2,
                                  ("strlabel.npz", "integer class indices")),
    "compare/float-labels": Case(["compare", "{M}", "{M}", "--data", "{FLOATLABEL}", "--check", "top1_drop<=0.5"],
                                 2, ("floatlabel.npz", "non-integer")),
    "tune/labels-out-of-range": Case(["tune", "{M}", "--calib", "{C}", "--eval", "{BADLABEL}", "--budget",
                                      "top1_drop<=0.5", "-o", "{OUT}/a"], 2, ("badlabel.npz", "outside the 10")),
    "quantize-budget/string-labels": Case(["quantize", "{M}", "--data", "{C}", "--eval", "{STRLABEL}", "--budget",
                                           "top1_drop<=0.5", "-o", "{OUT}/q.onnx"], 2, ("strlabel.npz", "integer")),
    # constant data
    "quantize/all-zero-calibration-data": Case(["quantize", "{M}", "--data", "{ZEROS}", "-o", "{OUT}/q.onnx"], 2,
                                               ("zeros.npz", "every input is constant")),
    "tune/all-zero-calibration-data": Case(["tune", "{M}", "--calib", "{ZEROS}", "--eval", "{T}", "--budget",
                                            "cosine>=0.999", "-o", "{OUT}/a"], 2, ("zeros.npz", "constant")),
    "tune/all-zero-evaluation-data": Case(["tune", "{M}", "--calib", "{C}", "--eval", "{ZEROS}", "--budget",
                                           "cosine>=0.999", "-o", "{OUT}/a"], 2, ("evaluation data", "zeros.npz")),
    # non-finite values: counted, left out, reported
    "quantize/nan-and-inf-in-calibration-data": Case(
        ["quantize", "{M}", "--data", "{NAN}", "-o", "{OUT}/q.onnx"], 0, (), leaves=True,
        warns=("input 'image': 3 NaN/Inf values", "3 sample(s) holding them left out of calibration")),
    # budgets FP32 itself cannot meet, and the machine's bounds
    "tune/budget-cosine-above-1": Case([*TUNE[:4], "--budget", "cosine>=1.5", "-o", "{OUT}/a"], 2,
                                       ("'cosine>=1.5'", "even by the FP32 model")),
    "tune/budget-cosine-inf": Case([*TUNE[:4], "--budget", "cosine>=inf", "-o", "{OUT}/a"], 2, ("'cosine>=inf'",)),
    "tune/budget-top1-drop-wrong-direction": Case(["tune", "{M}", "--calib", "{T}", "--budget", "top1_drop>=0.5",
                                                   "-o", "{OUT}/a"], 2, ("'top1_drop>=0.5'", "FP32")),
    "quantize/budget-cosine-above-1": Case(["quantize", "{M}", "--data", "{C}", "--budget", "cosine>=1.5", "-o",
                                            "{OUT}/q.onnx"], 2, ("'cosine>=1.5'",)),
    "tune/100000-threads": Case([*TUNE, "--threads", "100000", "-o", "{OUT}/a"], 2, ("--threads 100000",)),
    "bench/100000-threads": Case(["bench", "{M}", "--threads", "100000"], 2, ("--threads 100000", "logical core")),
    "bench/sweep-100000-threads": Case(["bench", "{M}", "--sweep", "threads=1,100000"], 2, ("sweep threads",)),
    "run/dims-100000x100000": Case(["run", "{HW}", "--dims", "H=100000,W=100000", "-o", "{OUT}/r.npz"], 2,
                                   ("[1, 3, 100000, 100000]", "--dims")),
    "run/dim-of-size-0": Case(["run", "{HW}", "--dims", "H=0", "-o", "{OUT}/r.npz"], 2, ("'H=0'",)),
    # preprocessing specs and images
    **{f"run/preprocess-spec-{k.lower().replace('_', '-')}": Case(
        ["run", "{M}", "--data", "{IMAGES}", "--preprocess", f"{{{k}}}", "-o", "{OUT}/r.npz"], 2, (w,))
       for k, w in (("SPEC_LIST", "expected a JSON object"), ("SPEC_NULL", "got NoneType"), ("RESIZE0", "resize"),
                    ("RESIZE_NEG", "resize"), ("RESIZE_BIG", "resize"), ("MEAN_STR", "mean"),
                    ("SCALE_NAN", "scale"))},
    "run/decompression-bomb-png": Case(["run", "{M}", "--data", "{BOMB}", "--preprocess", "{GOOD}", "-o",
                                        "{OUT}/r.npz"], 2, ("bomb.png", "refused")),
    "diagnose-preprocess/reference-outputs-missing": Case(
        ["diagnose-preprocess", "{M}", "{IMAGES}", "--spec", "{GOOD}", "--reference-outputs", "{IN}/nope.npz"], 2,
        ("reference outputs not found", "nope.npz")),
    "diagnose-preprocess/reference-outputs-pickled": Case(
        ["diagnose-preprocess", "{M}", "{IMAGES}", "--spec", "{GOOD}", "--reference-outputs", "{PICKLED}"], 2,
        ("pickled.npz", "allow_pickle")),
    "diagnose-preprocess/reference-outputs-empty-file": Case(
        ["diagnose-preprocess", "{M}", "{IMAGES}", "--spec", "{GOOD}", "--reference-outputs", "{EMPTY}"], 2,
        ("empty.npz", "empty")),
    # models
    "quantize/ir3-opset7-conv": Case(["quantize", "{IR3}", "--data", "synthetic", "-o", "{OUT}/q.onnx"], 2,
                                     ("ir3.onnx", "IR version 3")),
    "fp16/ir3-opset7-conv": Case(["fp16", "{IR3}", "-o", "{OUT}/f.onnx"], 2, ("ir3.onnx", "IR version 3")),
    "compare/truncated-model": Case(["compare", "{M}", "{TRUNC}", "--data", "{C}"], 2, ("trunc.onnx",)),
    # options a command would silently ignore
    "quantize/recipe-with-method": Case(["quantize", "{M}", "--recipe", "{RECIPE}", "--method", "minmax", "-o",
                                         "{OUT}/q.onnx"], 2, ("--method", "would be ignored")),
    "quantize/recipe-with-data": Case(["quantize", "{M}", "--recipe", "{RECIPE}", "--data", "{C}", "-o",
                                       "{OUT}/q.onnx"], 2, ("--data", "would be ignored")),
    "quantize/force-without-recipe": Case(["quantize", "{M}", "--data", "{C}", "--force", "-o", "{OUT}/q.onnx"], 2,
                                          ("--force", "only with --recipe")),
    # an extra array of another length is a note, not a refusal
    "compare/extra-array-of-another-length": Case(["compare", "{M}", "{M}", "--data", "{CLASS_NAMES}"], 0, (),
                                                  warns=("ignored array(s) class_names",)),
})


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks, id=n) for n, c in CASES.items()])
def test_bad_input(name: str, corpus, tmp_path, monkeypatch):
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    argv = fill(case.argv, corpus, out)
    before = snapshot(corpus["BASE"])
    code, stdout, err = run_cli(argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in stdout + err, err
    assert code == case.code, err
    assert snapshot(corpus["BASE"]) == before  # every input unchanged, nothing left beside them
    if case.code:
        assert len(lines) == 1, err  # one line
        for words in case.says:
            assert words in lines[0], lines[0]
        assert not list(out.iterdir())  # nothing half-written
    else:
        for words in case.warns:
            assert any(words in x and x.startswith("warning:") for x in lines), err
        if not case.leaves:
            assert not list(out.iterdir())
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".infertune-probe")]


def test_the_corpus_covers_every_writer_and_place():
    writers = {w for w, *_ in WRITERS}
    assert {n.split("/")[0] for n in CASES} >= writers
    for w in writers:
        assert {f"{w}/{p}" for p, *_ in PLACES} <= set(CASES)
