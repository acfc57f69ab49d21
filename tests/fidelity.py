"""torch-fidelity's own feature extractor and metric functions, importable where it is installed: normally, or,
where its torchvision does not import beside this torch (these CPU machines: torch 2.13.0+cpu, see
ENVIRONMENT.md), with the package's __init__ (which imports its torchvision-based extractors and datasets) and
its ``utils`` (torchvision data loading) left out. The modules compared with ours -- the Inception extractor,
its TF1 resize, its FID and precision/recall functions -- need neither: their code runs unchanged."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _unused(*args, **kwargs):
    raise RuntimeError("torch_fidelity.utils is left out here (it needs torchvision)")


def import_torch_fidelity():
    """Makes ``import torch_fidelity.<module>`` work for the modules above; skips the test where torch-fidelity
    is not installed."""
    try:
        import torch_fidelity  # noqa: F401

        return
    except ImportError as err:  # installed without a working torchvision, or not installed
        if importlib.util.find_spec("torch_fidelity") is None:
            pytest.skip(f"torch-fidelity is not installed ({err})")
    spec = importlib.util.find_spec("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("torch_fidelity.utils")
    names = ("get_cacheable_input_name", "cache_lookup_one_recompute_on_miss", "create_feature_extractor",
             "extract_featuresdict_from_input_id_cached", "resolve_feature_extractor",
             "resolve_feature_layer_for_metric")  # fmt: skip
    for name in names:  # what metric_fid and metric_prc import from it
        setattr(utils, name, _unused)
    for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
        del sys.modules[name]  # a failed import's leftovers
    sys.modules["torch_fidelity"], sys.modules["torch_fidelity.utils"] = package, utils
    importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
