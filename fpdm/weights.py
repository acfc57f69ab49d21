"""Model weights in the formats the field publishes, read without running code, and written back out.

Formats ``read_weights`` recognises (by content, not by file name):

- ``fpdm``: this project's training checkpoints (``python -m fpdm.train``): config, weights, EMA, run settings;
- ``export``: ``model.safetensors`` + ``config.json`` (``python -m fpdm.export``), a folder or the file;
- ``dit``: the official DiT checkpoints (``DiT-XL-2-256x256.pt``: a bare state_dict with timm-style names
  ``x_embedder.proj.*``, ``y_embedder.embedding_table.weight``, ``pos_embed``), and DiT's ``train.py``
  checkpoints (``{"model", "ema", "opt", "args"}``);
- ``fpdm-release``: the FPDM release's ``train.py`` checkpoints (``{"model", "ema", "opt", "args",
  "train_steps"}``, names ``blocks_pre``, ``block_pre_projection``, ``block_fixed_point_projection_fc1/_fc2``,
  ``block_fixed_point``, ``blocks_post``), or their bare state_dict.

Every file is read with ``torch.load(weights_only=True)`` or safetensors: tensors, containers and numbers
only (and ``argparse.Namespace``, which DiT's training script stores). A file that needs anything else is
refused as "not a plain weights file" and nothing in it runs. The architecture of an outside file is read
from its tensors; what tensors cannot say (FPDM's iteration counts) comes from its saved arguments or the
release's defaults, and ``overrides`` replace any of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import first_line, read_file
from .checks import InputError
from .files import json_writer, write_set
from .models import FPDM, MODEL_SIZES, DiT, ModelConfig, build_model, sincos_pos_embed_2d

__all__ = ["LoadedWeights", "read_weights", "load_model", "load_state", "export_weights",
           "initialise_from", "FORMATS"]  # fmt: skip

FORMATS = ("fpdm", "export", "dit", "fpdm-release")
EXPORT_FORMAT = "fpdm-export/1"
RELEASE_DEFAULTS = {  # the FPDM release's train.py (iteration ranges, conditioning) and sample.py (iterations)
    "fixed_point_no_grad_min_iters": 0, "fixed_point_no_grad_max_iters": 10,
    "fixed_point_with_grad_min_iters": 1, "fixed_point_with_grad_max_iters": 12,
    "fixed_point_pre_post_timestep_conditioning": False,
}  # fmt: skip
RELEASE_SAMPLE_BLOCKS = 28  # the release samples with 28 - pre - post iterations (DiT-XL's depth)
# what the field's own sample.py scripts default to (DiT and the FPDM release: DDPM, 250 steps, cfg 4 on 3 channels)
FIELD_SAMPLING = {"method": "ddpm", "steps": 250, "guidance": 4.0, "guidance_channels": 3}
# what this project's training grid used before checkpoints recorded it (python -m fpdm.train's defaults)
LEGACY_SAMPLING = {"method": "ddim", "steps": 50, "guidance": 3.0, "guidance_channels": None}

# outside names -> ours (applied in order to each key; the rest are the same in both)
RENAMES = {
    "dit": [(r"^x_embedder\.proj\.", "x_embedder."), (r"^y_embedder\.embedding_table\.", "y_embedder.embedding.")],
    "fpdm-release": [
        (r"^x_embedder\.proj\.", "x_embedder."), (r"^y_embedder\.embedding_table\.", "y_embedder.embedding."),
        (r"^block_pre_projection\.", "injection."), (r"^block_fixed_point_projection_fc1\.", "projection.0."),
        (r"^block_fixed_point_projection_fc2\.", "projection.2."),
    ],
}  # fmt: skip
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrap a model's names


@dataclass
class LoadedWeights:
    """What a weights file holds, in this project's terms."""

    config: ModelConfig
    state_dict: dict[str, Tensor]  # our parameter names
    source: str  # one of FORMATS
    run: dict = field(default_factory=dict)  # training settings where known (num_timesteps, dataset, ...)
    sampling: dict = field(default_factory=dict)  # sampling defaults: method, steps, guidance, guidance_channels
    path: str = ""  # the file read

    def build(self, device: str | torch.device = "cpu") -> DiT | FPDM:
        """The model, weights loaded, in eval mode."""
        model = build_model(self.config)
        load_state(model, self.state_dict, f"{self.path} ({self.source} format)")
        return model.to(device).eval()


# ----------------------------------------------------------------------------- recognising formats


def read_weights(path: str | Path, *, weights: str = "ema", **overrides) -> LoadedWeights:
    """The config, weights (our names) and settings of any known format; ``weights``: "ema" or "model".

    ``overrides`` are ModelConfig fields that replace what the file says or implies (e.g. ``eval_iters``,
    ``num_heads`` of a width that is not a named size)."""
    if weights not in ("ema", "model"):
        raise InputError(f"weights must be 'ema' or 'model', got {weights!r}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown model config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        loaded = _read_export(path, overrides)
    else:
        content = read_file(path)
        if isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT and "config" in content:
            loaded = _read_ours(path, content, weights, overrides)
        else:
            loaded = _read_outside(path, content, weights, overrides)
    loaded.path = str(path)
    _check(loaded)
    return loaded


def _check(loaded: LoadedWeights) -> None:
    """An InputError for non-finite weights or damaged settings (a file's fields are data, not trusted)."""
    for key, value in loaded.state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{loaded.path}: its weights hold NaN or Inf ({key}); refused, since every "
                             "sample would be too")  # fmt: skip
    rules = {
        "run.num_timesteps": (loaded.run.get("num_timesteps", 1000), lambda v: type(v) is int and v >= 21),
        "run.dataset": (loaded.run.get("dataset", ""), lambda v: isinstance(v, str)),
        "sampling.method": (loaded.sampling.get("method"), lambda v: v in ("ddim", "ddpm")),
        "sampling.steps": (loaded.sampling.get("steps"), lambda v: type(v) is int and v >= 1),
        "sampling.guidance": (loaded.sampling.get("guidance"),
                              lambda v: type(v) in (int, float) and math.isfinite(v)),  # fmt: skip
        "sampling.guidance_channels": (loaded.sampling.get("guidance_channels"),
                                       lambda v: v is None or (type(v) is int and v >= 1)),  # fmt: skip
    }
    for name, (value, ok) in rules.items():
        if not ok(value):
            raise InputError(f"{loaded.path}: {name}={value!r} is damaged; refused")


def _read_outside(path: Path, content: object, weights: str, overrides: dict) -> LoadedWeights:
    state, args = _outside_state(path, content, weights)
    kind = "fpdm-release" if any(k.startswith("block_fixed_point.") for k in state) else "dit"
    config = _infer_config(path, state, args, kind, overrides)
    latent = config.in_channels == 4  # the field's models generate SD-VAE latents
    run = {"num_timesteps": 1000, "dataset": "latents:" if latent else ""}
    return LoadedWeights(config, _convert(state, kind), kind, run, dict(FIELD_SAMPLING, latent=latent))


def _read_ours(path: Path, ckpt: dict, weights: str, overrides: dict) -> LoadedWeights:
    try:
        config = ModelConfig.from_dict({**ckpt["config"], **overrides})
        state = dict(ckpt[weights])
        if not all(isinstance(v, Tensor) for v in state.values()):
            raise TypeError("they are not all tensors")
    except (KeyError, TypeError, ValueError) as err:
        reason = f"no usable model config or {weights!r} weights ({first_line(err)})"
        raise InputError(f"checkpoint {path} has {reason}") from None
    run, sampling = _section(path, ckpt, "run"), {**LEGACY_SAMPLING, **_section(path, ckpt, "sampling")}
    return LoadedWeights(config, state, "fpdm", run, sampling)


def _read_export(path: Path, overrides: dict) -> LoadedWeights:
    folder = path if path.is_dir() else path.parent
    tensors = folder / "model.safetensors" if path.is_dir() else path
    meta_path = folder / "config.json"
    if not meta_path.is_file():
        raise InputError(f"{folder} has no config.json beside its safetensors weights (python -m fpdm.export)")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
        config = ModelConfig.from_dict({**meta["model"], **overrides})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{meta_path} is not an export's config ({first_line(err)})") from None
    sampling = {**LEGACY_SAMPLING, **_section(meta_path, meta, "sampling")}
    return LoadedWeights(config, read_file(tensors), "export", _section(meta_path, meta, "run"), sampling)


def _section(path: Path, saved: dict, name: str) -> dict:
    """``saved[name]``, a dict (empty when absent), or an InputError naming the damage."""
    value = saved.get(name, {})
    if not isinstance(value, dict):
        raise InputError(f"{path}: its {name} is {type(value).__name__}, not a dict; it is damaged")
    return value


def _outside_state(path: Path, content: object, weights: str) -> tuple[dict[str, Tensor], dict]:
    """The state_dict (wrapper prefixes removed) and saved arguments of a DiT or FPDM-release file."""
    args: object = {}
    state = content
    if isinstance(content, dict) and ("model" in content or "ema" in content):
        state = content.get(weights, content.get("model"))
        args = content.get("args", {})
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    found = _describe(content)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} is no known weights format: found {found}")
    state = {_unwrap(k): v for k, v in state.items()}
    if "x_embedder.proj.weight" not in state or not ("blocks.0.attn.qkv.weight" in state or
                                                      "block_fixed_point.attn.qkv.weight" in state):  # fmt: skip
        raise InputError(f"{path} is no known weights format (DiT, FPDM release, fpdm): found {found}")
    return state, args if isinstance(args, dict) else {}


def _describe(content: object) -> str:
    if isinstance(content, dict):
        keys = list(content)
        more = f", ... ({len(keys)} keys)" if len(keys) > 4 else ""
        return f"a dict with keys {', '.join(map(str, keys[:4]))}{more}"
    return f"a {type(content).__name__}"


def _unwrap(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many numbered submodules ``prefix.N.`` the state holds."""
    numbers = {int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return len(numbers)


def _infer_config(path: Path, state: dict[str, Tensor], args: dict, kind: str, overrides: dict) -> ModelConfig:
    """The architecture the tensors imply, then the saved arguments, the release's defaults, the overrides;
    a missing or misshapen tensor or argument is an InputError naming it."""
    try:
        return _infer(path, state, args, kind, overrides)
    except InputError:
        raise
    except KeyError as err:
        raise InputError(f"{path}: it has no {err.args[0]} tensor or argument; it is damaged or no "
                         "DiT/FPDM") from None  # fmt: skip
    except (IndexError, TypeError, ValueError, AttributeError) as err:
        reason = first_line(err)
        raise InputError(f"{path}: its tensors or arguments are not a DiT's or FPDM's ({reason})") from None


def _infer(path: Path, state: dict[str, Tensor], args: dict, kind: str, overrides: dict) -> ModelConfig:
    patch_weight = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    block = "blocks.0" if kind == "dit" else "block_fixed_point"
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = state["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" in state else 0
    if not rows:
        raise InputError(f"{path}: no y_embedder.embedding_table (continuous labels are not supported)")
    found: dict = dict(
        kind="dit" if kind == "dit" else "fpdm", hidden_size=hidden, in_channels=in_channels, patch_size=patch,
        mlp_ratio=state[f"{block}.mlp.fc1.weight"].shape[0] / hidden, learn_sigma=out == 2 * in_channels,
    )  # fmt: skip
    if "pos_embed" in state:
        found["input_size"] = int(round(state["pos_embed"].shape[1] ** 0.5)) * patch
    elif "image_size" in args:
        found["input_size"] = int(args["image_size"]) // 8
    named = str(args.get("model", ""))  # e.g. "DiT-XL/2"
    size = named.split("-", 1)[1].split("/")[0] if "-" in named else None
    heads = {h: n for h, _, n in MODEL_SIZES.values()}
    if size in MODEL_SIZES:
        found["num_heads"] = MODEL_SIZES[size][2]
    elif hidden in heads:
        found["num_heads"] = heads[hidden]
    classes = overrides.get("num_classes", args.get("num_classes"))
    null = rows == classes + 1 if classes is not None else True  # the field trains with label dropout: a null row
    found.update(num_classes=rows - int(null), null_class=null, class_dropout_prob=0.1 if null else 0.0)
    if classes is not None and rows not in (classes, classes + 1):
        raise InputError(f"{path}: its class embedding has {rows} rows, which fits neither {classes} classes "
                         "nor them and a null class")  # fmt: skip
    if kind == "dit":
        found["depth"] = _count(state, "blocks")
    else:
        a = {**RELEASE_DEFAULTS, **{k: v for k, v in args.items() if k in RELEASE_DEFAULTS}}
        pre, post = _count(state, "blocks_pre"), _count(state, "blocks_post")
        found.update(
            pre_depth=pre, post_depth=post,
            timestep_in_pre_post=bool(a["fixed_point_pre_post_timestep_conditioning"]),
            no_grad_iters=(a["fixed_point_no_grad_min_iters"], a["fixed_point_no_grad_max_iters"]),
            grad_iters=(a["fixed_point_with_grad_min_iters"], a["fixed_point_with_grad_max_iters"]),
            eval_iters=max(RELEASE_SAMPLE_BLOCKS - pre - post, 1),
            projection_gelu="tanh", final_conditioning="outer",
        )  # fmt: skip
    merged = {**found, **overrides}
    for name in ("input_size", "num_heads"):
        if name not in merged:
            raise InputError(f"{path}: its tensors do not say the model's {name}; give it (load_model(..., "
                             f"{name}=...))")  # fmt: skip
    try:
        config = ModelConfig(**merged)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: {first_line(err)}") from None
    if "pos_embed" in state:
        expected = torch.from_numpy(sincos_pos_embed_2d(hidden, config.input_size // patch)).float()
        if state["pos_embed"].shape[1:] != expected.shape or not torch.allclose(
            state["pos_embed"][0].float(), expected, atol=1e-5
        ):
            raise InputError(f"{path}: its pos_embed is not the fixed 2-D sin-cos embedding this model uses")
    return config


def _convert(state: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """An outside state_dict in our names (its fixed pos_embed dropped: ours is computed)."""
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        for pattern, repl in RENAMES[kind]:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# ----------------------------------------------------------------------------- loading into a model


def load_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "the file") -> None:
    """``model.load_state_dict(state)`` (strict), or an InputError naming the tensors that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]  # fmt: skip
    problems = [f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("shape of", shapes))
                if names]  # fmt: skip
    if problems:
        raise InputError(f"the weights of {source} do not match its model config: {'; '.join(problems)}")
    model.load_state_dict(dict(state))


def load_model(path: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu",
               **overrides) -> DiT | FPDM:  # fmt: skip
    """A DiT or FPDM from any known weights file, in eval mode (``from fpdm import load_model``).

    ``weights``: the EMA weights (default) or the raw ones of a training checkpoint. ``overrides``: ModelConfig
    fields (e.g. ``eval_iters=26``). Formats, and what is read from where: the module docstring."""
    return read_weights(path, weights=weights, **overrides).build(device)


def initialise_from(model: DiT | FPDM, loaded: LoadedWeights) -> None:
    """Start ``model`` from another file's weights: the same kind shape for shape, or an FPDM from a DiT.

    An FPDM from a DiT takes its embedders and final layer, its first ``pre_depth`` blocks as the pre blocks,
    its middle block (index pre + (depth - pre - post) // 2) as the fixed-point block and its last
    ``post_depth`` blocks as the post blocks; the injection and projection keep their fresh initialisation."""
    source = loaded.source
    if isinstance(model, FPDM) and loaded.config.kind == "dit":
        pre, post, depth = model.config.pre_depth, model.config.post_depth, loaded.config.depth
        if depth < pre + post + 1:
            raise InputError(f"a DiT of depth {depth} cannot give {pre} pre, 1 fixed-point and {post} post blocks")
        blocks = {"blocks_pre": list(range(pre)), "block_fixed_point": [pre + (depth - pre - post) // 2],
                  "blocks_post": list(range(depth - post, depth))}  # fmt: skip
        state = {k: v for k, v in loaded.state_dict.items() if not k.startswith("blocks.")}
        for name, indices in blocks.items():
            for j, i in enumerate(indices):
                prefix = f"{name}.{j}." if name != "block_fixed_point" else f"{name}."
                state.update({prefix + k[len(f"blocks.{i}."):]: v for k, v in loaded.state_dict.items()
                              if k.startswith(f"blocks.{i}.")})  # fmt: skip
        fresh = model.state_dict()
        state.update({k: v for k, v in fresh.items() if k.startswith(("injection.", "projection."))})
        load_state(model, state, f"{source} (a DiT mapped onto an FPDM)")
    elif model.config.kind != loaded.config.kind:
        raise InputError(f"cannot start a {model.config.kind.upper()} from {source} weights of a "
                         f"{loaded.config.kind.upper()}")  # fmt: skip
    else:
        load_state(model, loaded.state_dict, source)


# ----------------------------------------------------------------------------- writing


def export_weights(loaded: LoadedWeights, out: str | Path) -> Path:
    """Write ``model.safetensors`` (the loaded weights, our names) and ``config.json`` into the folder ``out``.

    Both are staged and renamed as one set, config.json last (``fpdm.files.write_set``): a folder with a
    config.json always holds the weights it describes, and a failure leaves an earlier export as it was."""
    from safetensors.torch import save

    meta = {"format": EXPORT_FORMAT, "model": dataclasses.asdict(loaded.config), "source": loaded.source,
            "run": _plain(loaded.run), "sampling": _plain(loaded.sampling)}  # fmt: skip
    tensors = {k: v.detach().contiguous().cpu() for k, v in loaded.state_dict.items()}
    write_set(out, {
        "model.safetensors": lambda fh: fh.write(save(tensors)),
        "config.json": json_writer(meta),
    })  # fmt: skip
    return Path(out)


def _plain(value: object) -> object:
    """``value`` with what JSON cannot hold made plain (tuples as lists, anything else as its str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
