"""The Inception-v3 network of Inception FID (TensorFlow's 2015 weights, in pytorch-fid's file format).

The architecture of torchvision's Inception3 with the changes pytorch-fid
makes for FID (1008 classes, no auxiliary head, TensorFlow's pooling
quirks), written out here so that no torchvision is needed. Module names
match pytorch-fid's weights file (``pt_inception-2015-12-05-6726825d.pth``;
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same
keys), which loads with ``strict=True``. Nothing is downloaded: pass the
file's path.

Two ways into the network (``input``): "tf1", what ADM's evaluator (TF's
2015 graph) and torch-fidelity do -- TF1's bilinear resize to 299 without
half-pixel centres, then (p - 128) / 128 -- and "pytorch-fid", PyTorch's
half-pixel bilinear resize of p / 127.5 - 1.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDInceptionV3", "INPUTS", "load_fid_inception", "resize_bilinear_tf1"]

INPUTS = ("tf1", "pytorch-fid")  # how pixels enter the network (module docstring)
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of TF's mixed_6/conv (Mixed_6d.branch1x1)
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS  # 2023


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """TensorFlow's 3x3 average pool, which does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)

    def branches(self, x: Tensor) -> list[Tensor]:
        """The four branches' outputs, 1x1 first (sFID reads Mixed_6d's)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))]


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pool="avg": FID's first E block (TF average pool); pool="max": its second (a max pool, as in TF's graph)."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """Images (N, C, H, W) resized to (size, size) as TensorFlow 1's ``ResizeBilinear`` with
    ``align_corners=False`` (the op in ADM's Inception graph): output pixel i samples the input at
    i * H / size, no half-pixel centres, the last row and column repeated past the edge. The operations
    (and their order) of torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x`` (its exact "slow"
    method): the same values to the bit (tested where torch-fidelity is installed)."""

    def taps(n: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n - 1), pos - lo.float()

    y_lo, y_hi, dy = taps(x.shape[2])
    x_lo, x_hi, dx = taps(x.shape[3])
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]  # (N, C, size, W)
    dx = dx.view(1, 1, 1, size)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx  # (N, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy.view(1, 1, size, 1)


class FIDInceptionV3(nn.Module):
    """Pixels -> the 2048 pool features of FID (and the 2023 spatial features of sFID).

    ``input`` (``INPUTS``): "tf1" (default) resizes to 299 x 299 with TF1's bilinear and scales by
    (p - 128) / 128, as TF's graph does in ADM's evaluator and as torch-fidelity does; "pytorch-fid" maps
    p / 127.5 - 1 and resizes with ``F.interpolate(..., mode="bilinear", align_corners=False)``, as
    pytorch-fid does (on [0, 1] there: the same up to rounding, bilinear weights summing to 1)."""

    def __init__(self, input: str = "tf1") -> None:
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
        self.input = input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # in the weights file; its weight gives the Inception Score's logits

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] -> pool features (N, 2048)."""
        return self.pixel_features((x + 1) * 127.5)[0]

    def pixel_features(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Float pixel values in [0, 255] (N, C, H, W), C = 1 or 3 -> (pool features (N, 2048), spatial
        features (N, 2023)): ``trunk(prepare(pixels))``."""
        return self.trunk(self.prepare(pixels))

    def prepare(self, pixels: Tensor) -> Tensor:
        """Pixel values in [0, 255] (N, C, H, W) -> the network's input (N, 3, 299, 299), as ``input`` says."""
        x = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
        if self.input == "tf1":
            return (resize_bilinear_tf1(x, 299) - 128) / 128
        return F.interpolate(x / 127.5 - 1, size=(299, 299), mode="bilinear", align_corners=False)

    def trunk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The network on its input (N, 3, 299, 299) -> (pool features (N, 2048), spatial features (N, 2023)).
        Spatial: the first 7 channels of Mixed_6d's 1x1 branch (TF's ``mixed_6/conv``, after its ReLU),
        flattened in TF's (H, W, C) order as ADM's evaluator does, so that their means and covariances pair
        with an ADM reference batch's ``mu_s``, ``sigma_s``."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        spatial = None
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            block = getattr(self, f"Mixed_{name}")
            if name == "6d":
                parts = block.branches(x)
                spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7)
                x = torch.cat(parts, 1)
            else:
                x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1), spatial  # (N, 2048), (N, 2023)

    def logits(self, features: Tensor) -> Tensor:
        """The 1008 class logits of pool features (N, 2048), without the bias, as the Inception Score takes
        them: ADM's evaluator multiplies by the weight of TF's ``softmax/logits/MatMul``, torch-fidelity
        uses its ``logits_unbiased``."""
        return features @ self.fc.weight.T.to(features.dtype)  # (N, 1008)


def load_fid_inception(path: str | Path, input: str = "tf1") -> FIDInceptionV3:
    """The FID Inception with the weights of a local pytorch-fid (or torch-fidelity) file, strictly loaded;
    ``input``: how pixels enter it (``INPUTS``)."""
    net = FIDInceptionV3(input)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot load Inception FID weights from {path}: {reason}") from None
    return net.eval().requires_grad_(False)
