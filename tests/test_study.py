"""The study command end to end at a toy size: trains both models, sweeps budgets, writes the report."""

import json
import os
import subprocess
import sys


def test_study_command_at_toy_size(tmp_path, feature_cache):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "fpdm.study", "--dataset", "digits", "--patch", "2", "--dit-depth", "4",
           "--steps", "3", "--batch-size", "16", "--dit-steps", "2,3", "--num-samples", "20",
           "--variants", "uniform,smoothing,reuse", "--grid-steps", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "FPDM_CACHE": str(feature_cache)}  # the session's: its feature network trained once
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    training = json.loads((out / "training.json").read_text())
    assert training["DiT"]["params"] > training["FPDM"]["params"]
    assert training["DiT"]["memory_checkpointed_mb"] < training["DiT"]["memory_mb"]
    assert training["FPDM"]["memory_worst_mb"] >= training["FPDM"]["memory_mb"]
    rows = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["variant"]) for r in rows} == {("dit", "dit"), ("fpdm", "uniform"),
                                                          ("fpdm", "smoothing"), ("fpdm", "reuse")}  # fmt: skip
    assert {r["budget"] for r in rows} == {8, 12}
    report = (out / "report.md").read_text()
    assert "| parameters |" in report and "quality_vs_compute.png" in report
    assert (out / "grids_smallest_budget.png").is_file()
    assert (out / "dit" / "samples.png").is_file() and (out / "fpdm" / "samples.png").is_file()  # --grid-steps 2


def test_study_bad_input_is_one_line(tmp_path, cli):
    """A bad list value, and a training run that refuses its input: one line each (the training command's own,
    not repeated with the command line), exit non-zero."""
    for args, match in ((["--dit-steps", "a"], "expected comma-separated integers, got 'a'"),
                        (["--grid-steps", "-1"], "--grid-steps must be >= 0 (0: no grid), got -1"),
                        (["--dataset", "nope", "--steps", "1"], "unknown dataset 'nope'")):  # fmt: skip
        code, _, err = cli("fpdm.study", ["--out", tmp_path / "study", *args])
        errors = [line for line in err.strip().splitlines() if "error" in line]
        assert code == 2 and "Traceback" not in err, err
        assert len(errors) == 1 and match in errors[0], err
