"""A cross-check of our Inception numbers with torch-fidelity's (the ``fid`` extra): its own feature extractor and
metric functions on the same images and the same local weights file. Our path (``fpdm.fid``) stays the default
and needs neither torch-fidelity nor torchvision; this is how a user confirms, on real weights, that our features
and FID are its values (``python -m fpdm.evaluate ... --cross-check``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checks import InputError

__all__ = ["torch_fidelity_check"]


def _torch_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_prc import calculate_precision_recall_full
    except (ImportError, RuntimeError) as err:  # torchvision not matching torch fails at import with a RuntimeError
        raise InputError(f"--cross-check needs torch-fidelity (pip install 'fpdm[fid]'): {err}") from None
    metrics = fid_features_to_statistics, fid_statistics_to_metric, calculate_precision_recall_full
    return FeatureExtractorInceptionV3, *metrics


@torch.no_grad()
def torch_fidelity_check(
    weights: str | Path, samples: np.ndarray, reference: np.ndarray, ours: np.ndarray, ours_reference: np.ndarray,
    *, batch_size: int = 50,
) -> dict:  # fmt: skip
    """torch-fidelity's pool features, FID, precision and recall of uint8 ``samples`` against uint8 ``reference``
    images (N, H, W, C), beside the largest difference from ours (``ours``, ``ours_reference``: our pool
    features (N, 2048) of the same images). Its extractor takes (N, 3, H, W) uint8 and resizes as TF1 (our
    ``input="tf1"``)."""
    extractor_cls, to_stats, to_fid, precision_recall = _torch_fidelity()
    extractor = extractor_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))

    def features(images: np.ndarray) -> torch.Tensor:
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        batches = range(0, len(images), batch_size)
        return torch.cat([extractor(torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2))[0]
                          for i in batches]).double()  # (N, 2048)  # fmt: skip

    fake, real = features(samples), features(reference)
    fid = to_fid(to_stats(fake), to_stats(real), verbose=False)["frechet_inception_distance"]
    precision, recall = precision_recall(fake.float(), real.float(), neighborhood=3)
    difference = max(float(np.abs(fake.numpy() - ours).max()), float(np.abs(real.numpy() - ours_reference).max()))
    return {"inception_fid": fid, "precision": precision, "recall": recall, "max_feature_difference": difference}
