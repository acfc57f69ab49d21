"""python -m fpdm.sample: generate images from a checkpoint, with FPDM's compute controls.

Compute is counted in block evaluations per sample: a DiT step costs its
depth; an FPDM step costs pre_depth + post_depth + the calls of its
fixed-point block. For FPDM any two of (steps, iterations per step, total
budget) fix the third:

- ``--steps 20 --iters 26``: 20 steps of 26 calls (budget 20 x 28 = 560);
- ``--budget 560 --steps 40``: 40 steps sharing 560 - 40 x 2 calls: the
  paper's "timestep smoothing" (more steps, fewer iterations each);
- ``--budget 560 --iters 12``: as many steps of ~12 calls as 560 allows.

``--schedule`` spreads the calls over the steps: ``uniform``, ``high-noise``
(more where the noise is high), ``low-noise``, or ``adaptive`` (stop each step
at ``--tol``, never exceeding the budget). ``--solver`` is any fixedpoint
solver run for that many calls; ``--reuse`` starts each step's solve at the
previous step's fixed point. ``--graph solver`` (CUDA) replays the solver's
own work from CUDA graphs (f runs eagerly); ``--graph on`` (the block captured
with the loop) was removed with fixedpoint's graph=True.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import fixedpoint

from . import checks
from .checks import InputError
from .diffusion import Diffusion, guided
from .encode import decode, load_vae
from .files import atomic_write, json_writer, write_set
from .images import from_uint8, grid_image, to_uint8
from .models import FPDM, DiT, ModelConfig, fixed_iterations
from .train import process_group
from .weights import read_weights

__all__ = [
    "ComputePlan",
    "plan_compute",
    "generate",
    "sample_batches",
    "batch_seed",
    "combine_stats",
    "ShardJob",
    "check_graph",
    "SampleStats",
    "SCHEDULES",
    "SOLVERS",
]

SCHEDULES = ("uniform", "high-noise", "low-noise", "adaptive")
SOLVERS = {"picard": fixedpoint.picard, "anderson": fixedpoint.anderson, "broyden": fixedpoint.broyden}
GRAPH_FLAGS = {"off": False, "solver": "solver"}  # --graph: fixedpoint's graph option


SampleError = InputError  # the old name (before 0.2 its own class)


@dataclass
class ComputePlan:
    """How many sampling steps and how many fixed-point calls each (FPDM), and the budget that makes."""

    steps: int
    calls: list[int] | None  # FPDM: calls of the fixed-point block per step, first step first; None for DiT
    budget: int  # block evaluations per sample, the plan's total (adaptive: its cap)
    schedule: str = "uniform"
    tol: float | None = None  # adaptive only


def _step_cost(config: ModelConfig) -> int:
    """Blocks a step costs besides the fixed-point calls (FPDM) or in all (DiT)."""
    return config.pre_depth + config.post_depth if config.kind == "fpdm" else config.depth


def _weights(steps: int, schedule: str) -> list[float]:
    """Relative share of the calls per step, sampling order (high noise first)."""
    noise = [1.0 - i / max(steps - 1, 1) for i in range(steps)]  # 1 at the first (noisiest) step, 0 at the last
    if schedule == "high-noise":
        return [0.5 + n for n in noise]
    if schedule == "low-noise":
        return [1.5 - n for n in noise]
    return [1.0] * steps


def _allocate(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` calls over the steps: 1 each, the rest by weight (largest remainder): sums to ``total``."""
    steps, weight_sum = len(weights), sum(weights)
    extra = total - steps
    shares = [extra * w / weight_sum for w in weights]
    calls = [1 + math.floor(s) for s in shares]
    order = sorted(range(steps), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    for i in order[: total - sum(calls)]:
        calls[i] += 1
    return calls


def plan_compute(
    config: ModelConfig,
    *,
    steps: int | None = None,
    iters: int | None = None,
    budget: int | None = None,
    schedule: str = "uniform",
    tol: float | None = None,
) -> ComputePlan:
    """The sampling plan for a model from any two of steps / iters / budget (DiT: steps or budget)."""
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    for name, value in (("steps", steps), ("iters", iters), ("budget", budget)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"--{name} must be a positive integer, got {value!r}")
    cost = _step_cost(config)
    if config.kind == "dit":
        if iters is not None or schedule != "uniform":
            raise InputError("--iters and --schedule apply to FPDM; a DiT step always costs its depth")
        if steps is None and budget is None:
            raise InputError("give --steps or --budget")
        if steps is None:
            steps = budget // cost
            if steps < 1:
                raise InputError(f"--budget {budget} is less than one DiT step ({cost} blocks)")
        elif budget is not None and budget != steps * cost:
            raise InputError(f"a DiT with {steps} steps spends {steps * cost} blocks, not --budget {budget}")
        return ComputePlan(steps, None, steps * cost)

    given = sum(v is not None for v in (steps, iters, budget))
    if given != 2 and not (given == 1 and steps is not None):
        raise InputError("give two of --steps, --iters, --budget (or --steps alone for the model's default)")
    if budget is None:
        iters = iters if iters is not None else config.eval_iters
        budget = steps * (cost + iters)
    elif steps is None:
        steps = budget // (cost + iters)
        if steps < 1:
            raise InputError(f"--budget {budget} is less than one step of {iters} calls ({cost + iters} blocks)")
    total_calls = budget - steps * cost
    if total_calls < steps:
        raise InputError(
            f"--budget {budget} cannot give {steps} steps a call each: it needs at least {steps * (cost + 1)} blocks"
        )
    if schedule == "adaptive":
        if tol is None or not (tol > 0 and math.isfinite(tol)):
            raise InputError(f"--schedule adaptive needs a positive finite --tol, got {tol}")
        return ComputePlan(steps, None, budget, schedule, tol)
    return ComputePlan(steps, _allocate(total_calls, _weights(steps, schedule)), budget, schedule)


@dataclass
class SampleStats:
    block_evaluations: float = 0.0  # per sample, summed over the steps
    calls_per_step: list[float] = field(default_factory=list)  # FPDM: fixed-point calls each step used (mean)
    seconds: float = 0.0
    steps: int = 0


class _FixedPointDriver:
    """The model as the sampler sees it: sets each step's solver, threads the warm start, counts blocks."""

    def __init__(self, model: FPDM, plan: ComputePlan, solver: Callable, reuse: bool, stats: SampleStats):
        self.model, self.plan, self.solver, self.reuse, self.stats = model, plan, solver, reuse, stats
        self.step, self.z = 0, None

    def _solver_for_step(self) -> Callable:
        if self.plan.calls is not None:
            if self.solver is fixedpoint.picard:  # plain iteration as the model defines it (the release: the last)
                return fixed_iterations(self.plan.calls[self.step], self.model.picard_solver)
            return fixed_iterations(self.plan.calls[self.step], self.solver)
        # adaptive: stop at tol, but leave every later step at least one call
        spent = sum(self.stats.calls_per_step)
        later = self.plan.steps - self.step - 1
        cap = self.plan.budget - self.plan.steps * _step_cost(self.model.config) - spent - later
        return fixed_iterations(1) if cap <= 1 else partial(self.solver, tol=self.plan.tol, max_iter=cap - 1)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = self.model(x, t, y, z0=self.z if self.reuse else None, solver=self._solver_for_step())
        state = self.model.last_fixed_point
        self.z = state.z
        self.stats.calls_per_step.append(state.calls)
        self.stats.block_evaluations += self.model.block_evaluations
        self.step += 1
        return out


def batch_seed(seed: int, index: int) -> int:
    """The generator seed of batch ``index`` of a run seeded ``seed``: murmur3's 32-bit finaliser (a bijection) of
    ``seed`` XOR the finalised ``index + 1``. A batch's noise so depends on (seed, index) alone, never on which
    process samples it or which batches came before; for one seed every batch below 2^32 gets its own seed.
    32 bits because a CPU ``torch.Generator`` keeps only a seed's low 32 bits."""
    return _fmix32(seed ^ _fmix32(index + 1))


def _fmix32(x: int) -> int:
    x &= 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@torch.no_grad()
def sample_batches(
    model: DiT | FPDM,
    labels: Tensor,
    plan: ComputePlan,
    *,
    image_shape: tuple[int, int, int],
    indices: Iterable[int] | None = None,
    method: str = "ddim",
    eta: float = 0.0,
    guidance: float = 1.0,
    guidance_channels: int | None = None,
    solver: str = "picard",
    reuse: bool = False,
    graph: bool | str = False,
    clip: bool = True,
    seed: int = 0,
    batch_size: int = 100,
    num_timesteps: int = 1000,
    progress: bool = True,
) -> Iterator[tuple[int, Tensor, SampleStats]]:
    """Sample batches ``indices`` (default: all) of ``labels``, batch i being samples i*batch_size.. of it, one at
    a time: yields (i, its images (n, C, H, W) on the CPU, its SampleStats). Batch i draws its noise (and DDPM's
    or DDIM-eta's) from a generator of its own, ``batch_seed(seed, i)``: any split of the batches over processes
    samples the same images.

    ``guidance_channels``: guide only the first k channels of epsilon (DiT's published protocol: 3; None: all).
    ``solver``: "picard" is the release's plain iteration for a fixed number of calls (fixedpoint's picard, with
    its best iterate, only under the adaptive schedule), the others are fixedpoint's solvers.
    ``graph``: the fixed-point solves' CUDA-graph mode (fixedpoint's ``graph``: False or "solver"; picard and
    anderson; see ``check_graph``); the graphs stay kept after sampling (``fixedpoint.clear_graph_cache()``
    frees them).
    """
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)} (a budget bounds their calls)")
    check_graph(graph, solver, plan, model.config)
    step_solver = partial(SOLVERS[solver], graph=graph) if graph else SOLVERS[solver]
    model.eval()
    device = next(model.parameters()).device
    diffusion = Diffusion.create(num_timesteps, learn_sigma=model.config.learn_sigma, steps=plan.steps)
    indices = list(range(math.ceil(len(labels) / batch_size)) if indices is None else indices)
    from rich.progress import track

    for index in track(indices, description="sampling", disable=not progress or len(indices) < 2):
        start = time.perf_counter()
        first = index * batch_size
        y = labels[first : first + batch_size].to(device)
        gen = torch.Generator().manual_seed(batch_seed(seed, index))
        noise = torch.randn(len(y), *image_shape, generator=gen).to(device)
        stats = SampleStats(steps=plan.steps)
        if isinstance(model, FPDM):
            fn = _FixedPointDriver(model, plan, step_solver, reuse, stats)
        else:
            fn = model
            stats.block_evaluations = plan.steps * model.config.depth
        fn = guided(fn, guidance, model.config.num_classes, channels=guidance_channels)
        out = diffusion.sample(fn, noise, y, method=method, eta=eta, clip=clip, generator=gen)
        if not torch.isfinite(out).all():
            raise InputError(f"sampling gave non-finite values (NaN/Inf) in the batch of samples {first}.."
                             f"{first + len(y) - 1}: the weights or this plan diverge")  # fmt: skip
        out = out.cpu()
        stats.seconds = time.perf_counter() - start
        yield index, out, stats


def combine_stats(batches: Iterable[tuple[int, SampleStats]], steps: int) -> SampleStats:
    """The per-sample statistics of a run from its batches' (size, SampleStats), first batch first: averages
    weighted by the batch sizes (they differ only when adaptive), summed in batch order whichever processes
    sampled them, so that the result is the same to the bit; seconds: the batches' sum."""
    batches = list(batches)
    total = sum(n for n, _ in batches)
    stats = SampleStats(steps=steps)
    for n, batch in batches:
        share = n / total
        stats.block_evaluations += share * batch.block_evaluations
        stats.seconds += batch.seconds
        if batch.calls_per_step:
            calls = torch.tensor(batch.calls_per_step, dtype=torch.float64) * share
            so_far = torch.tensor(stats.calls_per_step or [0.0] * len(calls), dtype=torch.float64)
            stats.calls_per_step = (so_far + calls).tolist()
    return stats


def generate(model: DiT | FPDM, labels: Tensor, plan: ComputePlan, **options) -> tuple[Tensor, SampleStats]:
    """Sample ``len(labels)`` images (N, C, H, W) in batches, all in memory; returns them and the compute used
    (``combine_stats``). ``options``: those of ``sample_batches`` (image_shape, method, eta, guidance,
    guidance_channels, solver, reuse, graph, clip, seed, batch_size, num_timesteps, progress)."""
    images, parts = [], []
    for _, out, stats in sample_batches(model, labels, plan, **options):
        images.append(out)
        parts.append((len(out), stats))
    return torch.cat(images), combine_stats(parts, plan.steps)


def check_graph(graph: bool | str, solver: str, plan: ComputePlan, config: ModelConfig) -> None:
    """An InputError unless the fixed-point solves can run in CUDA-graph mode ``graph`` (False: always). The
    graphs replay fixedpoint's picard (its best iterate), not the release's plain iteration (the last)."""
    kind = config.kind
    if graph is True:
        raise InputError("graph=True (--graph on) was removed with fixedpoint's graph=True: use graph='solver' "
                         "(--graph solver), and torch.compile for the block")  # fmt: skip
    if graph is not False and graph != "solver":
        raise InputError(f"graph must be False or 'solver', got {graph!r}")
    if not graph:
        return
    if kind != "fpdm":
        raise InputError(f"graph={graph!r} (--graph) applies to FPDM; a DiT has no fixed-point layer")
    if solver == "broyden":
        raise InputError(f"graph={graph!r} (--graph) works with the picard and anderson solvers, not broyden")
    if solver == "picard" and plan.calls is not None and config.eval_iterate == "last":
        raise InputError(f"graph={graph!r} (--graph) replays fixedpoint's picard, whose output is its best iterate; "
                         "this model's fixed-point layer is the release's plain iteration (its last iterate): sample "
                         "without --graph, or with --solver anderson")  # fmt: skip


def _labels(classes: str | list[int], num: int, num_classes: int, seed: int) -> Tensor:
    """(num,) labels: --classes (``checks.classes``: "random" or class labels, repeated) for this model."""
    if classes == "random":
        return torch.randint(num_classes, (num,), generator=torch.Generator().manual_seed(seed + 1))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise InputError(f"--classes {bad} outside 0..{num_classes - 1}")
    return torch.tensor(classes).repeat(math.ceil(num / len(classes)))[:num]


def main(args: argparse.Namespace) -> dict:
    """The command: under torchrun (WORLD_SIZE > 1) each of the processes samples its share of the batches (gloo
    on a CPU, nccl on CUDA) and rank 0 writes the set; returns stats.json's content (rank 0; {} elsewhere)."""
    dev = checks.device(args.device)  # a bad --device is one line in every process, before a group forms
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return run_job(prepare(args, dev))
    with process_group(args.device) as (rank, world, dev):
        return run_job(prepare(args, dev, rank), rank, world)


def prepare(args: argparse.Namespace, dev: torch.device, rank: int = 0) -> ShardJob:
    """Every check on the arguments and the checkpoint, then the model: the run as a ShardJob (nothing written)."""
    checks.number("--eta", args.eta, 0.0, 1.0)
    if args.tol is not None and args.schedule != "adaptive":
        raise InputError("--tol applies to --schedule adaptive")
    if args.graph != "off" and dev.type != "cuda":
        raise InputError(f"--graph {args.graph} replays CUDA graphs and needs a CUDA device, got {dev}")
    loaded = read_weights(args.ckpt, weights=args.weights)
    run, cfg = loaded.run, loaded.config  # the model is built once every flag is checked
    defaults = loaded.sampling  # the training run's grid, or the field's sample.py for outside weights
    args.method = args.method or defaults["method"]
    args.guidance = defaults["guidance"] if args.guidance is None else args.guidance
    if args.guidance_channels is None:
        args.guidance_channels = defaults["guidance_channels"]
    if args.steps is None and args.budget is None:
        args.steps = defaults["steps"]
    checks.number("--guidance", args.guidance)
    if args.eta and args.method != "ddim":
        raise InputError("--eta applies to --method ddim (DDPM has no eta)")
    if args.guidance != 1 and not cfg.null_class:
        raise InputError(f"--guidance {args.guidance} needs a null class, and this model has none (use 1)")
    if args.guidance_channels is not None and not 1 <= args.guidance_channels <= cfg.in_channels:
        raise InputError(f"--guidance-channels must be in 1..{cfg.in_channels}, got {args.guidance_channels}")
    if not args.quiet and rank == 0:
        channels = "all" if args.guidance_channels is None else f"the first {args.guidance_channels}"
        print(f"{loaded.source} weights: {args.method.upper()}, {args.steps or 'budgeted'} steps, guidance "
              f"{args.guidance:g} on {channels} channels", flush=True)  # fmt: skip
    if cfg.kind == "dit" and (args.reuse or args.solver != "picard" or args.graph != "off"):
        raise InputError("--reuse, --solver and --graph apply to FPDM checkpoints; a DiT has no fixed-point layer")
    plan = plan_compute(cfg, steps=args.steps, iters=args.iters, budget=args.budget, schedule=args.schedule,
                        tol=args.tol)  # fmt: skip
    check_graph(GRAPH_FLAGS[args.graph], args.solver, plan, cfg)
    num_timesteps = int(run.get("num_timesteps", 1000))  # the schedule the checkpoint was trained with
    if plan.steps > num_timesteps:
        raise InputError(f"{plan.steps} sampling steps > the {num_timesteps} diffusion timesteps of this checkpoint")
    checks.memory("--num-samples", args.num_samples, args.num_samples * 16)  # the labels (a batch at a time else)
    batch = min(args.batch_size, args.num_samples) * (1 if args.guidance == 1 else 2)
    checks.memory("--batch-size", args.batch_size, batch * cfg.num_tokens * cfg.hidden_size * 4 * ACTIVATIONS_PER_TOKEN,
                  dev)  # fmt: skip
    labels = _labels(args.classes, args.num_samples, cfg.num_classes, args.seed)
    is_latent = str(run.get("dataset", "")).startswith("latents:")
    vae = None
    if is_latent:  # before sampling, which may take hours
        if not args.vae:
            raise InputError("this checkpoint generates VAE latents: pass --vae PATH to decode them")
        vae = load_vae(args.vae, dev)
    model = loaded.build(dev)  # weights that do not fit their config: one line, before --out is made
    if args.compile != "off":
        compile_for_sampling(model, args.compile)
    options = dict(image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), method=args.method, eta=args.eta,
                   guidance=args.guidance, guidance_channels=args.guidance_channels, solver=args.solver,
                   reuse=args.reuse, graph=GRAPH_FLAGS[args.graph], clip=not is_latent, seed=args.seed,
                   batch_size=args.batch_size, num_timesteps=num_timesteps)  # fmt: skip
    summary = {
        "checkpoint": str(args.ckpt), "num_samples": len(labels), "method": args.method, "steps": plan.steps,
        "schedule": plan.schedule, "solver": args.solver if cfg.kind == "fpdm" else None, "reuse": args.reuse,
        "graph": args.graph, "guidance": args.guidance, "guidance_channels": args.guidance_channels,
        "budget": plan.budget, "num_timesteps": num_timesteps,
    }  # fmt: skip
    settings = {  # all that makes a batch's images what they are (not the number of processes, nor paths)
        **{k: v for k, v in summary.items() if k != "checkpoint"}, "seed": args.seed, "batch_size": args.batch_size,
        "eta": args.eta, "calls": plan.calls, "tol": plan.tol, "weights": args.weights, "compile": args.compile,
        "vae": str(args.vae) if vae else None, "device": dev.type,
        "weights_hash": _digest(loaded.state_dict.items()), "labels_hash": _digest([("labels", labels)]),
    }  # fmt: skip
    return ShardJob(Path(args.out), model, labels, plan, options, json.loads(json.dumps(settings)), summary, vae,
                    progress=not args.quiet and rank == 0, quiet=args.quiet or rank > 0)  # fmt: skip


def _digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A hash of named tensors' names, dtypes, shapes and bytes (the weights a run samples, its labels)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def compile_for_sampling(model: DiT | FPDM, mode: str) -> None:
    """torch.compile where sampling spends its time, in place: FPDM's fixed-point block (called at every
    iteration of every step; the solver's loop stays eager), a DiT's whole forward. ``mode``: "on"
    (torch.compile's default), "reduce-overhead" (CUDA graph trees: the block's output is cloned, since the
    next call overwrites it and the solver keeps earlier ones) or "max-autotune"."""
    options = {"mode": None if mode == "on" else mode}
    if isinstance(model, FPDM):
        block = torch.compile(model.fixed_point_map, **options)
        model.fixed_point_map = (lambda *a: block(*a).clone()) if mode == "reduce-overhead" else block
    else:
        model.forward = torch.compile(model.forward, **options)


# float32 values a forward keeps per token and width at once (attention, MLP, the fixed-point state): a bound
# for the memory check, not a measurement
ACTIVATIONS_PER_TOKEN = 16


SHARDS = "shards"  # --out's folder of finished batches: removed once the set is written


@dataclass
class ShardJob:
    """A run of the command as its processes share it: what to sample, how, where, and the settings that make a
    batch's images what they are (a shard of other settings is refused, never mixed in)."""

    out: Path
    model: DiT | FPDM
    labels: Tensor  # all N, computed once from the seed (a process samples its batches' slices)
    plan: ComputePlan
    options: dict  # sample_batches' keyword arguments but indices and progress
    settings: dict  # JSON values; a shard records them
    summary: dict  # stats.json's fields besides the statistics
    vae: object = None  # latent checkpoints: decoded batch by batch
    progress: bool = True
    quiet: bool = False

    @property
    def shards(self) -> Path:
        return self.out / SHARDS

    @property
    def batches(self) -> range:
        return range(math.ceil(len(self.labels) / self.options["batch_size"]))

    def span(self, index: int) -> tuple[int, int]:
        """Batch ``index``'s samples, first and stop."""
        first = index * self.options["batch_size"]
        return first, min(first + self.options["batch_size"], len(self.labels))

    def shard(self, index: int) -> Path:
        """Batch ``index``'s file: named by its samples, first to last."""
        first, stop = self.span(index)
        return self.shards / f"samples-{first:09d}-{stop - 1:09d}.npz"


def run_job(job: ShardJob, rank: int = 0, world: int = 1) -> dict:
    """Rank 0 makes --out, takes its lock and finds the batches its shards lack (refusing shards of other
    settings), every rank samples its share of those, then rank 0 writes the set (``assemble``)."""
    error, todo = None, []
    with ExitStack() as stack:
        if rank == 0:
            try:
                checks.output_dir(job.out)
                stack.enter_context(checks.run_lock(job.out))  # one sampler per folder: its files are one run's
                todo = unfinished(job)
            except InputError as err:
                error = str(err)
        if world > 1:
            shared = [error, todo]
            dist.broadcast_object_list(shared, src=0)  # every rank fails alike, or shares the work
            error, todo = shared
        if error is not None:
            raise InputError(error)
        if not job.quiet and len(todo) < len(job.batches):
            print(f"resuming: {len(job.batches) - len(todo)} of {len(job.batches)} batches were sampled before "
                  f"({job.shards}); sampling the remaining {len(todo)}", flush=True)  # fmt: skip
        sample_shards(job, todo, rank, world)
        if world > 1:
            dist.barrier()
        return assemble(job) if rank == 0 else {}


def unfinished(job: ShardJob) -> list[int]:
    """The batches without a shard in ``job.shards``, first first; an InputError (one line) naming a setting where
    a shard there was sampled with other settings. An unreadable shard (damaged on disk) is removed: sampled again."""
    done = set()
    for path in sorted(job.shards.glob("samples-*.npz")):
        meta = _shard_meta(path)
        if meta is None:
            path.unlink(missing_ok=True)
            continue
        theirs = meta.get("settings", {})
        if theirs != job.settings:
            key = next(k for k in [*job.settings, *theirs] if job.settings.get(k) != theirs.get(k))
            raise InputError(f"{job.shards} holds batches sampled with other settings ({key}: {theirs.get(key)!r} "
                             f"there, {job.settings.get(key)!r} now): rerun with those to resume them, or remove "
                             f"{job.shards}")  # fmt: skip
        done.add(meta["index"])
    return [i for i in job.batches if i not in done]


def sample_shards(job: ShardJob, batches: list[int], rank: int = 0, world: int = 1) -> None:
    """Process ``rank`` of ``world``: sample its share of ``batches`` (every world-th, from its rank on) and write
    each as a shard, atomically, as it is done (uint8 NHWC pixels, labels, and its settings and statistics)."""
    mine = batches[rank::world]
    for index, images, stats in sample_batches(job.model, job.labels, job.plan, indices=mine,
                                               progress=job.progress, **job.options):  # fmt: skip
        if job.vae is not None:
            images = decode(job.vae, images)
        first, stop = job.span(index)
        meta = {"settings": job.settings, "index": index, "first": first, "stop": stop,
                "block_evaluations": stats.block_evaluations, "calls_per_step": stats.calls_per_step,
                "seconds": stats.seconds}  # fmt: skip
        pixels, labels = to_uint8(images), job.labels[first:stop].numpy()
        atomic_write(job.shard(index), partial(_write_shard, pixels=pixels, labels=labels, meta=json.dumps(meta)))


def _write_shard(fh: BinaryIO, pixels: np.ndarray, labels: np.ndarray, meta: str) -> None:
    np.savez(fh, arr_0=pixels, labels=labels, meta=np.array(meta))


def _shard_meta(path: Path) -> dict | None:
    """A shard's metadata; None when it cannot be read."""
    try:
        with np.load(path) as shard:
            return json.loads(shard["meta"].item())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def assemble(job: ShardJob) -> dict:
    """Rank 0, every shard written: samples.npz (streamed from the shards: one in memory at a time), samples.png
    (the first 100), and last stats.json (the manifest of a complete set, with the statistics combined as one
    process combines them); then the shards are removed."""
    paths = [job.shard(i) for i in job.batches]
    metas = [_shard_meta(p) for p in paths]
    lost = [str(p) for p, m in zip(paths, metas, strict=True) if m is None]
    if lost:
        raise InputError(f"{len(lost)} shard(s) are missing or unreadable after sampling, e.g. {lost[0]}: rerun")
    stats = combine_stats([(m["stop"] - m["first"], SampleStats(m["block_evaluations"], m["calls_per_step"],
                                                                m["seconds"], job.plan.steps)) for m in metas],
                          job.plan.steps)  # fmt: skip
    first = []
    for path in paths:
        with np.load(path) as shard:
            first.append(shard["arr_0"][: 100 - sum(len(p) for p in first)])
        if sum(len(p) for p in first) == min(100, len(job.labels)):
            break
    shown = from_uint8(np.concatenate(first))
    grid = grid_image(shown, nrow=10, scale=max(1, 64 // shown.shape[-1]))
    summary = {
        **job.summary, "block_evaluations_per_sample": round(stats.block_evaluations, 6),
        "calls_per_step": [round(c, 6) for c in stats.calls_per_step], "seconds": stats.seconds,
        "files": ["samples.npz", "samples.png"],
    }  # fmt: skip
    write_set(job.out, {  # all written before any replaces the last run's; stats.json, the manifest, last
        "samples.npz": partial(_write_npz, shards=paths, labels=job.labels.numpy()),
        "samples.png": lambda fh: grid.save(fh, format="PNG"),
        "stats.json": json_writer(summary),
    })  # fmt: skip
    shutil.rmtree(job.shards, ignore_errors=True)
    print(f"{len(job.labels)} samples in {stats.seconds:.1f} s, {job.plan.steps} steps, {stats.block_evaluations:g} "
          f"block evaluations per sample; wrote {job.out}/samples.png, samples.npz")  # fmt: skip
    return summary


def _write_npz(fh: BinaryIO, shards: list[Path], labels: np.ndarray) -> None:
    """np.savez(fh, arr_0=<the shards' pixels, in order>, labels=labels), streamed: arr_0.npy's header, then each
    shard's bytes in turn (an npz is a zip of .npy files, stored uncompressed as np.savez stores them)."""
    with np.load(shards[0]) as shard:
        shape = (len(labels), *shard["arr_0"].shape[1:])
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as npz:
        with npz.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for path in shards:
                with np.load(path) as shard:
                    member.write(np.ascontiguousarray(shard["arr_0"], dtype=np.uint8).data)
        with npz.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, labels)


def build_parser() -> argparse.ArgumentParser:
    p = checks.Parser(prog="python -m fpdm.sample", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt", required=True, help="weights: an fpdm.train checkpoint, an fpdm.export folder, an "
                   "official DiT checkpoint or an FPDM-release checkpoint (read without running code)")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--out", required=True, help="directory for samples.png, samples.npz, stats.json")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA or raw training weights")
    p.add_argument("--method", default=None, choices=["ddim", "ddpm"], help="default: the training run's (ddim)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the training run's grid's)")
    p.add_argument("--iters", type=int, default=None, help="FPDM: fixed-point calls per step")
    p.add_argument("--budget", type=int, default=None, help="block evaluations per sample in total")
    p.add_argument("--schedule", default="uniform", help="|".join(SCHEDULES))
    p.add_argument("--tol", type=float, default=None, help="adaptive schedule: residual tolerance per step")
    p.add_argument("--solver", default="picard", help="FPDM: " + " | ".join(SOLVERS))
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=False,
                   help="FPDM: start each step at the previous step's fixed point")  # fmt: skip
    p.add_argument("--graph", default="off", choices=list(GRAPH_FLAGS),
                   help="FPDM on CUDA: 'solver' replays the solver's work from CUDA graphs (the block runs "
                   "eagerly; 'on', the block captured too, was removed)")  # fmt: skip
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                   "training run's grid's; outside weights: 4, as their sample.py)")
    p.add_argument("--guidance-channels", type=int, default=None, help="guide only the first K channels of epsilon "
                   "(DiT's FID protocol on latents: 3; default: all, or 3 for outside weights)")
    p.add_argument("--classes", type=checks.classes, default="random", help="'random' or comma-separated class "
                   "labels")  # fmt: skip
    p.add_argument("--seed", type=checks.seed, default=0, help="an integer in [0, 2^32)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--vae", default=None, help="latent checkpoints: local AutoencoderKL directory to decode")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="off", choices=checks.COMPILE_MODES,
                   help="torch.compile FPDM's fixed-point block (a DiT: its forward) in this mode (on: the default)")
    p.add_argument("--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.num_samples < 1 or args.batch_size < 1:
        raise InputError("--num-samples and --batch-size must be >= 1")
    main(args)


def cli(argv: list[str] | None = None) -> int:
    return checks.run_cli(build_parser(), argv, _run, interrupted=lambda args: f"interrupted; the finished batches "
                          f"are kept in {Path(args.out) / SHARDS}: the same command resumes")  # fmt: skip


if __name__ == "__main__":
    sys.exit(cli())
