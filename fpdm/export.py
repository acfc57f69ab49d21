"""python -m fpdm.export CKPT --out DIR: any loadable weights as model.safetensors + config.json.

The folder holds the EMA weights (``--weights model`` for the raw ones) in this project's names, the model
config, and the sampling defaults and run settings the file carried; ``load_model(DIR)``, ``python -m
fpdm.sample --ckpt DIR`` and ``--init DIR`` read it back without unpickling anything.
"""

from __future__ import annotations

import argparse
import sys

from . import checks
from .weights import export_weights, read_weights


def _run(args: argparse.Namespace) -> None:
    loaded = read_weights(args.ckpt, weights=args.weights)
    loaded.build()  # the weights fit their config before anything is written
    out = checks.output_dir(args.out)
    with checks.run_lock(out):
        export_weights(loaded, out)
    params = sum(t.numel() for t in loaded.state_dict.values())
    print(f"{loaded.source} weights of a {loaded.config.kind.upper()} ({params / 1e6:.2f}M parameters) -> "
          f"{out / 'model.safetensors'}, {out / 'config.json'}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = checks.Parser(prog="python -m fpdm.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="weights in any format load_model reads")
    p.add_argument("--out", required=True, help="folder for model.safetensors and config.json")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA or raw training weights")
    return p


def cli(argv: list[str] | None = None) -> int:
    return checks.run_cli(build_parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(cli())
