"""Small randomly initialised stand-ins for the outside weights fpdm loads (a VAE, the FID Inception), for tests
and scripts/recipe_smoke.sh: nothing is downloaded, and the networks have the real architectures."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_random_fid_inception", "save_tiny_vae"]


def save_random_fid_inception(path: str | Path, seed: int = 0) -> Path:
    """The FID Inception-v3 with random weights in pytorch-fid's file layout, at ``path``. Its batch-norm
    statistics are those of one batch of random images (one forward in training mode), so that features vary
    with the image at O(1) rather than collapsing to a constant, and its fc bias is nonzero."""
    from .inception import FIDInceptionV3

    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics become this batch's
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 8, 8) * 2 - 1)
    torch.nn.init.normal_(net.fc.bias, std=1.0)
    torch.save(net.state_dict(), path)
    return Path(path)


def save_tiny_vae(path: str | Path, sample_size: int = 16, seed: int = 0):
    """A tiny random diffusers AutoencoderKL (2 blocks of 8 channels: images to 4-channel latents at half the
    size) saved at ``path`` (a folder, as ``--vae`` reads); returns it. Needs the ``vae`` extra (diffusers)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=sample_size,
    )  # fmt: skip
    vae.save_pretrained(path)
    return vae
