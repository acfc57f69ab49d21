"""Gaussian diffusion: linear schedule, q_sample, training loss, DDPM and DDIM samplers.

The model is only a callable ``model(x, t, y) -> out`` with ``out`` (N, C, H, W)
(epsilon) or (N, 2C, H, W) (epsilon and the variance interpolation of
Improved DDPM, when the variance is learned). As in DiT (which follows
Improved DDPM): linear betas 1e-4..0.02 over 1000 steps, epsilon MSE plus the
variational bound term for a learned variance, and samplers over a respaced
subset of the timesteps. The arithmetic is DiT's (diffusion/gaussian_diffusion.py,
respace.py): float64 coefficient tables, indexed and then cast to float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Diffusion", "ModelFn", "space_timesteps", "guided"]

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


MIN_TIMESTEPS = 21  # linear_betas: the last beta is 0.02 * 1000 / T < 1


def linear_betas(num_timesteps: int) -> Tensor:
    """DiT's linear schedule, scaled so that 1000 steps give 1e-4..0.02 (at least MIN_TIMESTEPS: fewer
    scale the last beta to 1 or beyond, which no noise schedule survives)."""
    if num_timesteps < MIN_TIMESTEPS:
        raise ValueError(
            f"num_timesteps must be at least {MIN_TIMESTEPS} (the linear schedule's last beta, 20/T, must stay "
            f"below 1), got {num_timesteps}"
        )
    scale = 1000 / num_timesteps
    return torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64))


def _section_steps(size: int, count: int) -> list[int]:
    """DiT's striding of one section: ``count`` indices in [0, size), the stride accumulated as a float."""
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return taken


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """The timesteps of [0, num_timesteps) a respaced process keeps, sorted; DiT's ``space_timesteps``.

    ``steps`` is an int (one evenly strided section), or as in DiT a string: ``"ddimN"`` (the integer
    stride giving N steps) or comma-separated counts, one per equal section (``"10,15,20"``).
    """
    if isinstance(steps, str):
        return _space_timesteps_str(num_timesteps, steps)
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    return sorted(set(_section_steps(num_timesteps, steps)))


def _space_timesteps_str(num_timesteps: int, spec: str) -> list[int]:
    ddim = spec.startswith("ddim")
    try:
        counts = [int(spec[len("ddim") :])] if ddim else [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"sampling steps must be an integer, 'ddimN' or comma-separated counts, got {spec!r}"
        ) from None
    if ddim:
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == counts[0]:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make exactly {counts[0]} steps of {num_timesteps} with an integer stride ({spec!r})")
    if any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"sampling steps {spec!r}: section counts must be >= 0 and not all 0")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, taken = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"sampling steps {spec!r}: cannot divide a section of {size} steps into {count}")
        taken.update(start + j for j in _section_steps(size, count))
        start += size
    return sorted(taken)


def _extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] (a float64 table) cast to float32 after indexing, shaped (N, 1, 1, ...) to broadcast."""
    out = values.to(t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (Improved DDPM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


@dataclass
class Diffusion:
    """A (possibly respaced) diffusion process.

    ``timesteps[i]`` is the original timestep the model sees at step i of this
    process; ``betas`` are recomputed so that the respaced process has the same
    marginals q(x_t | x_0) at those timesteps.
    """

    betas: Tensor  # (S,) float64
    timesteps: Tensor  # (S,) long: the original timestep index of each step
    learn_sigma: bool = True

    @classmethod
    def create(
        cls, num_timesteps: int = 1000, *, learn_sigma: bool = True, steps: int | str | None = None
    ) -> Diffusion:
        """The linear-schedule process, respaced to ``steps`` (see ``space_timesteps``) if given.

        As DiT's ``create_diffusion``, even the full process has its betas recomputed from alphas_cumprod.
        """
        betas = linear_betas(num_timesteps).numpy()
        keep = list(range(num_timesteps)) if steps is None else space_timesteps(num_timesteps, steps)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        new_betas, last = [], 1.0
        for t in keep:
            new_betas.append(1.0 - alphas_cumprod[t] / last)
            last = alphas_cumprod[t]
        return cls(torch.from_numpy(np.array(new_betas, dtype=np.float64)), torch.tensor(keep), learn_sigma)

    def __post_init__(self) -> None:
        # DiT's float64 tables, computed with numpy as DiT does; _extract casts to float32 after indexing.
        b = self.betas.double().numpy()  # (S,)
        self.num_timesteps = len(b)
        ac = np.cumprod(1.0 - b, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        self.alphas_cumprod = torch.from_numpy(ac)
        self.alphas_cumprod_prev = torch.from_numpy(ac_prev)
        self.sqrt_alphas_cumprod = torch.from_numpy(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 / ac - 1))
        self.posterior_variance = torch.from_numpy(posterior_variance)
        # clipped: the posterior variance is 0 at t = 0
        self.posterior_log_variance_clipped = torch.from_numpy(
            np.log(np.append(posterior_variance[1:2], posterior_variance[1:]))
        )
        self.posterior_mean_coef1 = torch.from_numpy(b * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = torch.from_numpy((1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac))
        self.log_betas = torch.from_numpy(np.log(b))  # the learned range's upper bound
        # fixed large variance (no learned sigma); its first entry the posterior's, for a better decoder NLL
        self.fixed_log_variance = torch.from_numpy(np.log(np.append(posterior_variance[1:2], b[1:])))

    # ------------------------------------------------------------------ forward process and loss

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t indexes this process's steps."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, xt.ndim) * x0 + _extract(self.posterior_mean_coef2, t, xt.ndim) * xt
        )
        return mean, _extract(self.posterior_log_variance_clipped, t, xt.ndim)

    def p_mean_variance(self, out: Tensor, xt: Tensor, t: Tensor, *, clip: bool) -> tuple[Tensor, Tensor, Tensor]:
        """From the model output: predicted x0, and mean and log variance of p(x_{t-1} | x_t)."""
        channels = xt.shape[1]
        if self.learn_sigma:
            frac = (out[:, channels:] + 1) / 2  # interpolate between the two bounds of Improved DDPM
            min_log = _extract(self.posterior_log_variance_clipped, t, xt.ndim)
            max_log = _extract(self.log_betas, t, xt.ndim)
            log_var = frac * max_log + (1 - frac) * min_log
        else:  # fixed large variance (DiT without learned sigma)
            log_var = _extract(self.fixed_log_variance, t, xt.ndim).expand_as(xt)
        x0 = self._pred_x0(out, xt, t, clip)
        mean, _ = self.q_posterior(x0, xt, t)
        return x0, mean, log_var

    def _pred_x0(self, out: Tensor, xt: Tensor, t: Tensor, clip: bool) -> Tensor:
        x0 = self.predict_x0(xt, t, out[:, : xt.shape[1]])
        return x0.clamp(-1, 1) if clip else x0

    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps."""
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps
        )

    def training_losses(self, model: ModelFn, x0: Tensor, t: Tensor, y: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample loss (N,): epsilon MSE, plus the variational bound term when the variance is learned.

        The bound term sees the model's mean through a stop-gradient, so it only
        trains the variance (Improved DDPM's hybrid loss, as DiT uses it).
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.timesteps.to(t.device)[t], y).float()
        channels = x0.shape[1]
        mse = ((noise - out[:, :channels]) ** 2).mean(dim=(1, 2, 3))
        if not self.learn_sigma:
            return mse
        frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)
        return mse + self.vb_terms(frozen, x0, xt, t)

    def vb_terms(self, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; the decoder NLL at t = 0. (N,)"""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        _, mean, log_var = self.p_mean_variance(out, xt, t, clip=False)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ samplers

    def ddpm_steps(
        self, model: ModelFn, noise: Tensor, y: Tensor, *, clip: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """Ancestral sampling; yields x_{t-1} after each step (the last one is the sample)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = model(x, self.timesteps.to(x.device)[t], y).float()
            _, mean, log_var = self.p_mean_variance(out, x, t, clip=clip)
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device if generator is None else "cpu")
                x = mean + torch.exp(0.5 * log_var) * z.to(x.device)
            else:
                x = mean
            yield x

    def ddim_steps(
        self,
        model: ModelFn,
        noise: Tensor,
        y: Tensor,
        *,
        eta: float = 0.0,
        clip: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """DDIM sampling (eta = 0: deterministic); yields x after each step.

        DiT's ``ddim_sample`` operation for operation: eps is re-derived from the
        (possibly clipped) x0, and abar, abar_prev are float32 casts of the tables.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = model(x, self.timesteps.to(x.device)[t], y).float()
            x0 = self._pred_x0(out, x, t, clip)
            eps = (_extract(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x - x0) / _extract(
                self.sqrt_recipm1_alphas_cumprod, t, x.ndim
            )
            ab = _extract(self.alphas_cumprod, t, x.ndim)
            ab_prev = _extract(self.alphas_cumprod_prev, t, x.ndim)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            # clamp: identity wherever DiT's value is finite (fp32 rounding can take it below 0 at eta = 1)
            x = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma**2).clamp_min(0)) * eps
            if i > 0 and eta > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device if generator is None else "cpu")
                x = x + sigma * z.to(x.device)
            yield x

    def sample(
        self,
        model: ModelFn,
        noise: Tensor,
        y: Tensor,
        *,
        method: str = "ddim",
        eta: float = 0.0,
        clip: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run a sampler to the end; returns x_0 (N, C, H, W)."""
        if method == "ddim":
            steps = self.ddim_steps(model, noise, y, eta=eta, clip=clip, generator=generator)
        elif method == "ddpm":
            steps = self.ddpm_steps(model, noise, y, clip=clip, generator=generator)
        else:
            raise ValueError(f"sampling method must be 'ddim' or 'ddpm', got {method!r}")
        x = noise
        for x in steps:  # noqa: B007 (the last step is the sample)
            pass
        return x


def guided(model: ModelFn, scale: float, null_class: int, *, channels: int | None = None) -> ModelFn:
    """Classifier-free guidance: eps = eps(x, null) + scale * (eps(x, y) - eps(x, null)).

    One model call on the doubled batch [conditional; unconditional]. ``channels``
    = k guides only the first k channels of eps; the rest of eps and the variance
    channels come from the conditional half. None (all of the input's channels) is
    standard CFG; 3 on 4-channel latents is DiT's ``forward_with_cfg``, the protocol
    of DiT's and the FPDM release's published FIDs. scale = 1 is plain conditional
    sampling (and skips the doubling).
    """
    if channels is not None and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"guided channels must be a positive integer or None, got {channels!r}")
    if scale == 1.0:
        return model

    def guided_model(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        k = x.shape[1] if channels is None else channels
        if k > x.shape[1]:
            raise ValueError(f"guided channels={channels} exceeds the input's {x.shape[1]} channels")
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)])).float()
        cond, uncond = out[:n], out[n:]
        eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([eps, cond[:, k:]], dim=1)

    return guided_model
