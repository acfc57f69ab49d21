"""Plot the GPU check's kernel bandwidth table: python benchmarks/plot_gpu.py bench.json out.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    data = json.loads(Path(source).read_text())
    table = next(rows for name, rows in data["tables"].items() if name.startswith("kernel bandwidth"))
    note = next(text for name, text in data["notes"].items() if name.startswith("kernel bandwidth"))
    kernels = list(dict.fromkeys(row["kernel"] for row in table))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, dtype in zip(axes, ("bfloat16", "float32")):
        for i, kernel in enumerate(kernels):
            rows = [r for r in table if r["kernel"] == kernel and r["dtype"] == dtype]
            sizes = [float(r["B*D"]) for r in rows]
            color = f"C{i}"
            ax.plot(sizes, [float(r["triton_of_spec"].rstrip("%")) for r in rows], "o-", color=color, label=kernel)
            ax.plot(sizes, [float(r["torch_of_spec"].rstrip("%")) for r in rows], "x--", color=color, alpha=0.5)
        ax.axhline(70, color="gray", lw=0.8, ls=":")
        ax.set(xscale="log", xlabel="B x D (B = 32)", title=f"{dtype}: Triton (solid) vs PyTorch twin (dashed)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of datasheet memory bandwidth")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(note.split(";")[0], fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
