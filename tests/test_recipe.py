"""scripts/recipe_smoke.sh: the paper's recipe (docs/fpdm.md) end to end at tiny scale on a CPU, each stage's
command as at full scale: encode -> 2-rank torchrun training -> 2-rank torchrun sampling decoded with the VAE
-> Inception FID against saved reference statistics."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import launch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "recipe_smoke.sh"


def test_the_recipe_runs_end_to_end(tmp_path):
    """Catches a stage whose output the next one no longer reads (a renamed flag, file or layout). The script
    runs with its output in files (a hung rank holding a pipe cannot block the test); on a timeout its process
    group and every process naming its folder (torchrun's workers, in sessions of their own) are killed."""
    pytest.importorskip("diffusers", reason="diffusers (the `vae` extra: pip install -e '.[vae]') is missing")
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHON": sys.executable}
    result = launch(["bash", str(SCRIPT), str(out)], tmp_path, "smoke", str(out), env=env)
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == 0, f"exit {result.returncode} (-9: killed after 300 s): {stdout[-2000:]}{stderr[-3000:]}"  # noqa: E501
    assert [line.split("] ")[1][:3] for line in stdout.splitlines() if line.startswith("== [")][:6] == [
        "0/5", "1/5", "2/5", "3/5", "4/5", "5/5"]  # fmt: skip

    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] * 2 == sum(n for n in _rows(out / "latents"))  # --flip
    assert "2 process(es)" in stdout
    assert (out / "run" / "checkpoints" / "latest.pt").is_file() and (out / "run" / "metrics.jsonl").is_file()
    with np.load(out / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (4, 32, 32, 3) and samples["arr_0"].dtype == np.uint8  # decoded pixels
    assert json.loads((out / "samples" / "stats.json").read_text())["num_samples"] == 4
    with np.load(out / "ref_stats.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    result = json.loads((out / "evaluate.json").read_text())
    assert math.isfinite(result["inception_fid"]) and math.isfinite(result["inception_score"])
    assert math.isfinite(result["sfid"])  # the reference statistics carry sFID's mu_s, sigma_s


def _rows(latents: Path) -> list[int]:
    rows = []
    for shard in sorted(latents.glob("*.npz")):
        with np.load(shard) as data:
            rows.append(len(data["labels"]))
    return rows
