"""python -m fpdm.train: train a DiT or an FPDM, on a laptop or on many GPUs.

With no flags: a tiny FPDM on scikit-learn's built-in 8x8 digits, a few
minutes on 2 CPU cores, ending with a grid of EMA samples and a loss curve.
Many processes: ``torchrun --nproc_per_node N -m fpdm.train ...`` (gloo on
CPU, nccl on GPU). Running the same command with the same ``--out`` resumes
from the last checkpoint.

Outputs in --out: checkpoints/latest.pt (atomic), metrics.jsonl, samples.png,
loss.png, config.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from . import checks
from .board import check_tensorboard, open_board, write_grid, write_record
from .checkpoint import check_settings, load_checkpoint, save_checkpoint
from .checks import InputError, int_range, positive_int
from .data import ImageData, StepIndices, batch_loader, check_dataset, open_dataset, step_flips, step_indices
from .diffusion import MIN_TIMESTEPS, Diffusion, guided
from .files import write_json, write_text
from .images import plot_loss_curve, save_grid
from .models import FPDM, LEGACY_FIELDS, ModelConfig, create_model, model_config, model_names
from .weights import initialise_from, read_weights

UsageError = InputError  # the old name (before 0.2 its own class)


# Arguments that define a run: resuming with any of them changed is refused (it would not be the same run).
RUN_DEFINING = (
    "dataset", "model", "batch_size", "lr", "warmup", "weight_decay", "ema_decay", "seed", "learn_sigma",
    "no_grad_iters", "grad_iters", "image_size", "num_timesteps", "depth", "pre_depth", "post_depth",
)  # fmt: skip


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but CUDA is not available")
    device = torch.device("cuda", local_rank) if device_arg == "cuda" else torch.device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def close_distributed() -> None:
    """End the process group without gloo's teardown deadlock. A gloo worker thread releases each finished
    collective itself, and one that holds Python tensors (all_gather_object's) needs the GIL to do it; the
    group's destructor joins those threads. Destroyed while the main thread holds the GIL (in the dealloc of
    DDP's reducer, its last holder once the group is unregistered) the two wait for each other forever: a
    rank hung after training, now and then. So the caller drops its DDP wrapper first; then a barrier (every
    rank's collectives done, released while the main thread waits without the GIL), the reducer collected
    while the group is still registered, and the group destroyed."""
    dist.barrier()
    gc.collect()  # DDP's reducer, through any reference cycle, while the group is registered
    dist.destroy_process_group()


@contextmanager
def process_group(device_arg: str) -> Iterator[tuple[int, int, torch.device]]:
    """``setup_distributed`` for a command's work under torchrun: (rank, world, device) inside; closed after
    it with ``close_distributed``, or on an error destroyed at once (no barrier: the other ranks may not get
    there)."""
    rank, world, device = setup_distributed(device_arg)
    try:
        yield rank, world, device
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        close_distributed()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics JSON-lines file; a line torn by a crash mid-write, or one that is not a record
    with an integer step, is dropped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:  # anything else is damage: skipped
            records.append(record)
    return records


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warmup, min(decay, (1 + step) / (10 + step)): early weights fade out of short runs."""
    return min(decay, (1 + step) / (10 + step))


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def gather_rng_states(generators: dict[str, torch.Generator], world: int) -> list[dict]:
    """Every rank's RNG states (generators and torch's global CPU/CUDA state), for rank 0 to save."""
    state = {name: g.get_state() for name, g in generators.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(state: dict, generators: dict[str, torch.Generator], shared: dict | None = None) -> None:
    """A rank's saved states into ``generators``; the generators every rank shares (the data's) from ``shared``
    (rank 0's states: a run saved before they were shared resumes with one global batch too)."""
    for name, g in generators.items():
        g.set_state((shared if shared is not None and name in SHARED_GENERATORS else state)[name])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def sample_grid(model: nn.Module, data: ImageData | Dataset, args, device: torch.device, path: Path) -> Path:
    """A grid of EMA samples: one row per class (up to 10), DDIM with guidance."""
    classes = min(data.num_classes, 10)
    per_class = 10
    y = torch.arange(classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(y), data.channels, data.image_size, data.image_size, generator=gen).to(device)
    diffusion = Diffusion.create(args.num_timesteps, learn_sigma=args.learn_sigma, steps=args.sample_steps)
    fn = guided(model, args.guidance, null_class=data.num_classes)  # every channel (images or latents of ours)
    images = diffusion.sample(fn, noise, y, method="ddim", clip=not data.is_latent, generator=gen)
    return save_grid(images, path, nrow=per_class, scale=max(1, 64 // data.image_size))


def out_dir(args: argparse.Namespace) -> Path:
    """The run's folder: --out, or runs/DATASET-MODEL."""
    return Path(args.out or f"runs/{args.dataset.split(':')[0]}-{args.model.replace('/', '-')}")


# generators seeded alike in every process: the step's global batch and its flips are one draw, each rank takes its
# slice (runs of any world size see the same global batch); the others differ by rank
SHARED_GENERATORS = ("data", "flip")


def default_workers(device: torch.device) -> int:
    """--workers' default: none on a CPU (the training process reads; tests stay cheap), on a GPU the CPUs shared
    among the node's processes, at most 8."""
    if device.type != "cuda":
        return 0
    return min(8, max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# float32 values a training step keeps per token and width for each block it runs (forward activations for the
# backward): a bound for the memory check, not a measurement
ACTIVATIONS_PER_TOKEN = 24


def check_memory(args: argparse.Namespace, cfg: ModelConfig, local_batch: int, device: torch.device) -> None:
    """One line naming the option when the model (weights, gradients, EMA, AdamW: 20 bytes a parameter), the
    activations of a step or the diffusion tables cannot fit, instead of an allocator's traceback."""
    params = cfg.num_parameters
    flag = "--pre-depth/--post-depth" if cfg.kind == "fpdm" else "--model/--depth"
    checks.memory(flag, f"({params / 1e6:.0f}M parameters)", params * 20, device)
    blocks = cfg.pre_depth + cfg.post_depth + cfg.grad_iters[1] if cfg.kind == "fpdm" else cfg.depth
    per_sample = cfg.num_tokens * cfg.hidden_size * 4 * ACTIVATIONS_PER_TOKEN * blocks
    checks.memory("--batch-size", args.batch_size, local_batch * per_sample, device)
    checks.memory("--num-timesteps", args.num_timesteps, args.num_timesteps * 8 * 16)


def main(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:  # before any process group: every process says it and stops
        raise InputError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    check_dataset(args.dataset, args.data_dir)  # before --out and its lock exist
    rank, world, device = setup_distributed(args.device)
    if args.tf32:
        if device.type != "cuda":
            raise InputError(f"--tf32 applies to CUDA matmuls and convolutions; the device is {device}")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = checks.output_dir(out_dir(args))
    with checks.run_lock(out) if rank == 0 else nullcontext():  # one run per folder: its files are the run's
        train(args, rank, world, device, out)


def _recorded_init(out: Path) -> str | None:
    """The --init a run in ``out`` started from (its config.json), None if none or unreadable."""
    try:
        return json.loads((out / "config.json").read_text()).get("init")
    except (OSError, ValueError, AttributeError):
        return None


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device, out: Path) -> None:
    """The run in ``out``: data, model, resume, the training loop, then the pictures (rank 0 writes)."""
    is_main = rank == 0
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    local_batch = args.batch_size // world
    ckpt_path = out / "checkpoints" / "latest.pt"

    # ---------------------------------------------------------------- data
    data = open_dataset(args.dataset, data_dir=args.data_dir, image_size=args.image_size)  # read as it is used
    if args.flip and data.is_latent:
        raise InputError(f"--flip flips images; {data.name} holds latents (encode flipped copies with "
                         "`python -m fpdm.encode --flip`)")  # fmt: skip
    workers = default_workers(device) if args.workers is None else args.workers
    log(f"data: {data.name}, {len(data)} images {data.channels}x{data.image_size}x{data.image_size}, "
        f"{data.num_classes} classes; {workers} loader worker(s)")  # fmt: skip

    # ---------------------------------------------------------------- a run to resume, or weights to start from
    run = {k: getattr(args, k) for k in RUN_DEFINING}
    run["world_size"] = world
    run["flip"] = args.flip
    ckpt, init_path = None, args.init
    if ckpt_path.exists():
        if init_path is not None and init_path != _recorded_init(out):
            raise InputError(f"--init {args.init}, but {out} holds a run to resume ({ckpt_path}) that did not start "
                             "from it: resume comes first (drop --init), or use another --out")  # fmt: skip
        init_path = None  # the same command again resumes: its --init was applied at the start
        # depth is compared through the model's config: --depth 4 and a named size of depth 4 are one run
        ckpt = load_checkpoint(ckpt_path, run={k: v for k, v in run.items() if k not in ("depth", "flip")})
        saved_run = ckpt.get("run") if isinstance(ckpt.get("run"), dict) else {}
        saved_flip = bool(saved_run.get("flip", False))  # a run from before --flip had none
        if saved_flip != args.flip:
            raise InputError(f"checkpoint {ckpt_path} was made with flip={saved_flip} (now {args.flip}); use the "
                             "same settings to resume, or another --out")  # fmt: skip
        try:  # fields the checkpoint predates read as what it was trained with
            saved_config = ModelConfig.from_dict(ckpt.get("config"))
        except (TypeError, ValueError) as err:
            raise InputError(f"checkpoint {ckpt_path} has a damaged model config ({err}); move it away to start "
                             "over, or use another --out") from None  # fmt: skip
    init = read_weights(init_path) if init_path else None  # before any weights are built: a bad file is one line

    # ---------------------------------------------------------------- model, EMA, optimiser
    overrides = dict(input_size=data.image_size, in_channels=data.channels, num_classes=data.num_classes)
    if ckpt is not None:  # a run from before a field existed resumes with the behaviour it had
        overrides.update({k: getattr(saved_config, k) for k in LEGACY_FIELDS})
    overrides["learn_sigma"] = args.learn_sigma
    if args.depth is not None:
        if not args.model.startswith("DiT"):
            raise InputError("--depth applies to DiT models (FPDM has --pre-depth and --post-depth)")
        overrides["depth"] = args.depth
    if args.model.startswith("FPDM"):
        overrides.update(pre_depth=args.pre_depth, post_depth=args.post_depth)
    if args.model.startswith("FPDM"):
        overrides.update(no_grad_iters=args.no_grad_iters, grad_iters=args.grad_iters)
    try:
        check_memory(args, model_config(args.model, **overrides), local_batch, device)
        torch.manual_seed(args.seed)  # the same initial weights in every process and every run
        model = create_model(args.model, **overrides).to(device)
    except ValueError as err:
        raise InputError(str(err)) from None
    model.grad_checkpointing = args.grad_checkpointing
    if init is not None:
        initialise_from(model, init)
        log(f"initialised from {args.init} ({init.source} weights of a {init.config.kind.upper()})")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    diffusion = Diffusion.create(args.num_timesteps, learn_sigma=args.learn_sigma)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {args.model}, {params / 1e6:.2f}M parameters, {model.config.num_tokens} tokens; "
        f"{world} process(es) on {device}, {local_batch} images each per step")  # fmt: skip

    # every random draw comes from a generator saved in checkpoints, so a resumed run is the same run
    names = ("data", "noise", "sjfb", "flip") if args.flip else ("data", "noise", "sjfb")
    generators = {name: torch.Generator().manual_seed(args.seed * 7919 + rank * 104729 * (name not in
                  SHARED_GENERATORS) + i) for i, name in enumerate(names)}  # fmt: skip
    torch.manual_seed(args.seed * 7919 + rank)  # label dropout draws from the global generator

    start_step, window = 0, (0.0, 0)  # window: the loss sum and steps since the last metrics record
    sampling = {"method": "ddim", "steps": args.sample_steps or 50, "guidance": args.guidance,
                "guidance_channels": None}  # what the grid uses: fpdm.sample's defaults for this run  # fmt: skip
    if ckpt is not None:
        check_settings(ckpt_path, {"config": dataclasses.asdict(saved_config)}, config=dataclasses.asdict(model.config))
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            restore_rng_states(ckpt["rng"][rank], generators, shared=ckpt["rng"][0])
            start_step = ckpt["step"]
            if not isinstance(start_step, int) or start_step < 0:
                raise ValueError(f"its step is {start_step!r}")
            window = tuple(ckpt.get("log_window", window))  # a record spanning the resume averages the same steps
            if len(window) != 2 or type(window[0]) is not float or type(window[1]) is not int:
                raise ValueError(f"its log_window is {ckpt.get('log_window')!r}")
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(
                f"checkpoint {ckpt_path} is incomplete or damaged ({type(err).__name__}: {reason}); move it away "
                "to start over, or use another --out"
            ) from None
        log(f"resuming from {ckpt_path} at step {start_step}")
        if start_step >= args.steps:
            log(f"already trained to step {start_step} (--steps {args.steps}): nothing to train")
    elif is_main:
        write_json(out / "config.json", {"run": run, "model": dataclasses.asdict(model.config), "init": args.init})

    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.compile != "off":  # the forward only: checkpoints, the EMA and the grids use the model itself
        net = torch.compile(net, mode=None if args.compile == "on" else args.compile)
    net = partial(net, generator=generators["sjfb"])  # FPDM's S-JFB draws (a DiT ignores the keyword)
    metrics_path = out / "metrics.jsonl"
    seen: list[dict] = []  # the records the checkpoint we start from had seen
    if is_main and metrics_path.exists():  # keep only those
        seen = [r for r in read_metrics(metrics_path) if r["step"] <= start_step]
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in seen))  # atomic: a kill keeps the old file
    last_loss = seen[-1].get("loss", float("nan")) if seen else float("nan")  # the bar's loss until the next log
    metrics = open(metrics_path, "a") if is_main else None  # noqa: SIM115 (kept open for the loop)
    board = open_board(out, start_step) if is_main and args.tensorboard else None

    # ---------------------------------------------------------------- training loop
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.2f} it/s"),
        TextColumn("fp iters {task.fields[fp]}"), TimeRemainingColumn(), disable=not is_main or args.quiet,
    )  # fmt: skip
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    tic, (window_loss, window_steps) = time.perf_counter(), window
    saved_step = start_step  # the step the checkpoint on disk holds (0: none)
    batches = batch_loader(
        data, StepIndices(generators["data"], len(data), args.batch_size, args.steps - start_step, rank, world),
        workers=workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    with progress:
        task = progress.add_task("train", total=args.steps, completed=start_step, loss=last_loss, speed=0.0, fp="-")
        for step in range(start_step, args.steps):
            idx = step_indices(generators["data"], len(data), args.batch_size, rank, world)  # the checkpointed draw
            x, y, read = next(batches)  # the loader's, read ahead from the same draws
            if not torch.equal(read, idx):
                raise RuntimeError(f"the loader read other indices than step {step + 1} drew")
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.flip:
                flips = step_flips(generators["flip"], args.batch_size, rank, world).to(device)
                x = torch.where(flips[:, None, None, None], x.flip(-1), x)
            t = torch.randint(diffusion.num_timesteps, (local_batch,), generator=generators["noise"]).to(device)
            noise = torch.randn(x.shape, generator=generators["noise"]).to(device)
            lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                loss = diffusion.training_losses(net, x, t, y, noise).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update_ema(ema, model, ema_decay_at(step, args.ema_decay))

            loss_value = loss.item()  # the step's one host sync, after its work is queued
            if not math.isfinite(loss_value):  # stop before this step's weights reach a checkpoint
                kept = (f"the last checkpoint, {ckpt_path}, holds step {saved_step} (its weights may already be "
                        "diverging)" if saved_step else "no checkpoint was written")  # fmt: skip
                raise InputError(
                    f"the loss is {loss_value} at step {step + 1}: training diverged (lower --lr or raise --warmup); "
                    f"{kept}"
                )
            window_loss += loss_value
            window_steps += 1
            fp_state = model.last_fixed_point if isinstance(model, FPDM) else None
            fp_iters = f"{fp_state.info.no_grad_steps}+{fp_state.info.grad_steps}" if fp_state else "-"
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                speed = window_steps / (time.perf_counter() - tic)
                record = {"step": step + 1, "loss": window_loss / window_steps, "lr": lr, "steps_per_s": speed}
                if fp_state:
                    record.update(no_grad_iters=fp_state.info.no_grad_steps, grad_iters=fp_state.info.grad_steps)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if board:
                    write_record(board, record)
                progress.update(task, loss=record["loss"], speed=speed, fp=fp_iters)
                tic, window_loss, window_steps = time.perf_counter(), 0.0, 0
            progress.update(task, completed=step + 1)

            if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
                rng = gather_rng_states(generators, world)
                if is_main:
                    save_checkpoint(ckpt_path, {
                        "step": step + 1, "model": model.state_dict(), "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(), "rng": rng, "run": run,
                        "log_window": [window_loss, window_steps],
                        "config": dataclasses.asdict(model.config), "sampling": sampling,
                    })  # fmt: skip
                saved_step = step + 1
            if is_main and args.sample_every and (step + 1) % args.sample_every == 0 and not data.is_latent:
                # its own generator (args.seed): the training draws are untouched, so a run is the same run
                grid = sample_grid(ema, data, args, device, out / "grids" / f"step-{step + 1:07d}.png")
                if board:
                    write_grid(board, grid, step + 1)
                plot_loss_curve(read_metrics(metrics_path), out / "loss.png", title=f"{args.model} on {data.name}")
    batches.close()  # its workers end
    if metrics:
        metrics.close()
    if board:
        board.close()

    # ---------------------------------------------------------------- pictures
    if is_main:
        if start_step < args.steps or not (out / "loss.png").exists():
            plot_loss_curve(read_metrics(metrics_path), out / "loss.png", title=f"{args.model} on {data.name}")
        if args.sample_steps and data.is_latent:
            log("samples: skipped (latent data; decode with python -m fpdm.sample --vae PATH)")
        elif args.sample_steps:
            grid = sample_grid(ema, data, args, device, out / "samples.png")
            log(f"samples: {grid} (EMA weights, DDIM {args.sample_steps} steps, guidance {args.guidance})")
        log(f"loss curve: {out / 'loss.png'}; metrics: {metrics_path}; checkpoint: {ckpt_path}")
    if world > 1:
        net = None  # the DDP wrapper and its reducer: released before the group (close_distributed)
        close_distributed()


def build_parser() -> argparse.ArgumentParser:
    p = checks.Parser(prog="python -m fpdm.train", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--dataset", default="digits", help="digits | fashion-mnist | folder:PATH | latents:PATH")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST idx files")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize folder:PATH images to this")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader processes (default: 0 on a CPU; on a GPU the node's CPUs per process, <= 8)")
    p.add_argument("--flip", action="store_true",
                   help="random horizontal flips of the images (drawn from a checkpointed generator)")
    p.add_argument("--model", default="FPDM-T/2", help="a named size: " + ", ".join(model_names()))
    p.add_argument("--depth", type=positive_int, default=None, help="DiT blocks (default: the named size's)")
    p.add_argument("--pre-depth", type=int, default=1, help="FPDM explicit blocks before the fixed-point layer")
    p.add_argument("--post-depth", type=int, default=1, help="FPDM explicit blocks after it")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimisation steps in total")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch (split over processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (the paper: 1e-4 at 256px)")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-grad-iters", type=int_range, default=(0, 10), help="FPDM S-JFB: LOW,HIGH iterations no grad")
    p.add_argument("--grad-iters", type=int_range, default=(1, 12), help="FPDM S-JFB: LOW,HIGH iterations with grad")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--num-timesteps", type=positive_int, default=1000, help="diffusion steps in training")
    p.add_argument("--out", default=None, help="output directory (default runs/DATASET-MODEL)")
    p.add_argument("--init", default=None, help="start from these weights (any format load_model reads; an FPDM "
                   "from a DiT: see docs/fpdm.md); optimiser state starts fresh")
    p.add_argument("--seed", type=checks.seed, default=0, help="an integer in [0, 2^32)")
    p.add_argument("--ckpt-every", type=positive_int, default=250, help="checkpoint interval in steps")
    p.add_argument("--log-every", type=positive_int, default=10, help="metrics interval in steps")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the final grid (0: no grid)")
    p.add_argument("--sample-every", type=int, default=0,
                   help="also an EMA grid every K steps (grids/step-K.png, loss.png redrawn): a long run can be "
                        "watched; 0: only the final grid")  # fmt: skip
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale for the grid")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", default="off", choices=checks.COMPILE_MODES,
                   help="torch.compile the model's forward (on: the default mode; FPDM's fixed-point solve stays "
                        "eager, a graph break); a resumed run must compile as the first did to be the same run")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA (faster, ~1e-3)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics and grids as TensorBoard events in --out/tensorboard (needs tensorboard)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def validate(args: argparse.Namespace) -> None:
    rules = [
        (args.lr > 0 and math.isfinite(args.lr), f"--lr must be a positive finite number, got {args.lr}"),
        (
            args.weight_decay >= 0 and math.isfinite(args.weight_decay),
            f"--weight-decay must be a finite number >= 0, got {args.weight_decay}",
        ),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (args.warmup >= 0, f"--warmup must be >= 0, got {args.warmup}"),
        (args.workers is None or args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.sample_steps >= 0, f"--sample-steps must be >= 0, got {args.sample_steps}"),
        (args.sample_every >= 0, f"--sample-every must be >= 0, got {args.sample_every}"),
        (not args.sample_every or args.sample_steps, "--sample-every needs --sample-steps > 0 (the grids' DDIM steps)"),
        (
            args.num_timesteps >= MIN_TIMESTEPS,
            f"--num-timesteps must be at least {MIN_TIMESTEPS} (the linear noise schedule's last beta, 20/T, must "
            f"stay below 1), got {args.num_timesteps}",
        ),
        (args.sample_steps <= args.num_timesteps, f"--sample-steps {args.sample_steps} > --num-timesteps"),
        (args.model in model_names(), f"unknown --model {args.model!r}; valid: {', '.join(model_names())}"),
        (args.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {args.device!r}"),
    ]
    for ok, message in rules:
        if not ok:
            raise InputError(message)
    checks.number("--guidance", args.guidance)
    checks.device(args.device)  # cuda where there is none: one line now, not a traceback later
    fpdm_only = {"--pre-depth": args.pre_depth != 1, "--post-depth": args.post_depth != 1,
                 "--no-grad-iters": tuple(args.no_grad_iters) != (0, 10),
                 "--grad-iters": tuple(args.grad_iters) != (1, 12)}  # fmt: skip
    given = [flag for flag, changed in fpdm_only.items() if changed]
    if given and not args.model.startswith("FPDM"):
        raise InputError(f"{', '.join(given)} apply to FPDM models, not {args.model}")
    if args.image_size is not None and not args.dataset.startswith("folder:"):
        raise InputError(f"--image-size resizes folder:PATH images; {args.dataset} has its own size")
    if args.tensorboard:
        check_tensorboard()


def _run(args: argparse.Namespace) -> None:
    validate(args)
    main(args)


def _interrupted(args: argparse.Namespace) -> str:
    ckpt = out_dir(args) / "checkpoints" / "latest.pt"
    if ckpt.exists():
        return f"interrupted: run the same command again to resume from {ckpt}"
    return "interrupted before the first checkpoint: the same command starts over"


def cli(argv: list[str] | None = None) -> int:
    return checks.run_cli(build_parser(), argv, _run, interrupted=_interrupted)


if __name__ == "__main__":
    sys.exit(cli())
