"""What training a model of the study costs: parameters, memory (computed and measured), time.

- ``computed_memory``: 16 B per parameter (weights, gradients, AdamW's two moments) plus the bytes autograd
  saves for backward in one training forward (counted with saved-tensor hooks): a lower bound of what a
  step needs. FPDM: the mean over the S-JFB draws and the worst draw.
- ``measured_memory``: a fresh process (``python -m fpdm.study_cost CONFIG.json BATCH``) warms torch up,
  resets the kernel's record of its peak resident memory (/proc/self/clear_refs, Linux), builds the model,
  runs three AdamW training steps at the batch size and reads the peak (VmHWM) again; the peak less the
  resident memory before the model is the memory those steps held at their peak:
  weights, gradients, optimiser state, activations, temporaries and the allocator's slack. An FPDM runs its
  worst S-JFB draw (the most iterations with and without gradient), which sets its peak. The data are one
  random batch: the loader is not measured.
- ``training_seconds``: the wall time to a step, from metrics.jsonl's steps/s records (each covers the steps
  since the record before it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .models import ModelConfig, build_model

MEASURED_STEPS = 3


def computed_memory(cfg: ModelConfig, batch: int) -> dict:
    """Parameters and training memory at ``batch`` in MB: 16 B per parameter + the bytes saved for backward."""
    model = build_model(cfg).train()
    params = sum(p.numel() for p in model.parameters())
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    def activations(draw: tuple[int, int] | None = None) -> int:
        saved[0] = 0
        if draw is not None:  # (no-grad, grad) iterations of one S-JFB draw
            model.config.no_grad_iters, model.config.grad_iters = (draw[0], draw[0]), (draw[1], draw[1])
        x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        zeros = torch.zeros(batch, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, zeros, zeros)
        return saved[0]

    weights = 16 * params
    if cfg.kind == "dit":
        return {"params": params, "computed_mb": (weights + activations()) / 2**20}
    (_, ng_hi), (lo, hi) = cfg.no_grad_iters, cfg.grad_iters
    mean = sum(activations((0, n)) for n in range(lo, hi + 1)) / (hi - lo + 1)
    return {"params": params, "computed_mb": (weights + mean) / 2**20,
            "computed_worst_mb": (weights + activations((ng_hi, hi))) / 2**20}  # fmt: skip


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Reset this process's peak resident memory to what it holds now (Linux >= 4.0: clear_refs 5); returns it."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_mb("VmRSS")


def _measure(cfg: ModelConfig, batch: int) -> dict:
    """In this (fresh) process: the peak resident memory that MEASURED_STEPS training steps add, in MB."""
    from .diffusion import Diffusion

    warm = torch.nn.Linear(8, 8)  # torch's own first-use allocations (thread pools, kernels) before the baseline
    warm(torch.zeros(2, 8)).sum().backward()
    if cfg.kind == "fpdm":  # the worst S-JFB draw sets the peak
        cfg.no_grad_iters, cfg.grad_iters = (cfg.no_grad_iters[1],) * 2, (cfg.grad_iters[1],) * 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    y = torch.randint(cfg.num_classes, (batch,), generator=gen)
    t = torch.randint(1000, (batch,), generator=gen)
    diffusion = Diffusion.create(1000, learn_sigma=cfg.learn_sigma)
    base = _reset_peak()  # the peak from here on is the steps' own, not an import's or the warm-up's
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(MEASURED_STEPS):
        loss = diffusion.training_losses(model, x, t, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"measured_mb": _status_mb("VmHWM") - base, "baseline_rss_mb": base}


def measured_memory(config_json: Path, batch: int) -> dict:
    """``_measure`` of the model a run's config.json describes, in a fresh process (in this one, memory that
    sampling or another model freed would be reused without showing as resident growth)."""
    cmd = [sys.executable, "-m", "fpdm.study_cost", str(config_json), str(batch)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_seconds(records: list[dict], step: int) -> float | None:
    """Seconds of training up to ``step`` from metrics records (step, steps_per_s); None before any record."""
    seconds, last = 0.0, 0
    for record in records:
        if "steps_per_s" not in record or not record["steps_per_s"]:
            continue
        seconds += (min(record["step"], step) - last) / record["steps_per_s"]
        last = record["step"]
        if last >= step:
            break
    return seconds if last >= step else None


if __name__ == "__main__":  # python -m fpdm.study_cost CONFIG.json BATCH: one measurement, as one JSON line
    saved = json.loads(Path(sys.argv[1]).read_text())["model"]
    print(json.dumps(_measure(ModelConfig.from_dict(saved), int(sys.argv[2]))))
