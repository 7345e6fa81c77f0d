"""FID / IS / KID / precision-recall through torch-fidelity, offline, from features and reference stats.

One code path for every scale: images (uint8 N×3×H×W) → a torch-fidelity feature extractor loaded from
a local weights file → metrics against a reference-statistics `.npz`.

Extractors (`evaluate.extractor`):
  - 'inception': torch-fidelity's `inception-v3-compat` (the FID standard). Weights file:
    `evaluate.feature_weights_path` or $DECM_INCEPTION_WEIGHTS (torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth`); never downloaded.
  - 'digits': the CPU-scale digits classifier (decm.eval.digits_features), trained and cached on
    first use at `evaluate.feature_weights_path` / $DECM_DIGITS_WEIGHTS.

Reference statistics `.npz` (ADM-compatible: `mu`, `sigma` are what ADM's
`VIRTUAL_imagenet256_labeled.npz` holds, so those files work for FID as they are):
    mu [D], sigma [D, D]      — FID statistics of the reference features
    features [M, D] (opt.)    — reference features, needed for KID and precision/recall
    arr_0 [M, H, W, 3] (opt.) — ADM's reference images (uint8); features are computed from them if needed
    extractor (opt.)          — extractor name the stats were made with (checked when present)
    n (opt.)                  — number of reference images behind mu/sigma
Make them with `python -m decm.eval.ref_stats`.
"""

from __future__ import annotations

import functools

import os

import numpy as np
import torch

EXTRACTORS = {"inception": ("inception-v3-compat", "DECM_INCEPTION_WEIGHTS"),
              "digits": ("decm-digits", "DECM_DIGITS_WEIGHTS")}
DEFAULT_DIGITS_WEIGHTS = "runs/cache/digits_classifier.pt"
METRICS = ("fid", "isc", "kid", "prc")


class EvaluationSetupError(FileNotFoundError):
    """Missing weights or reference statistics; the message names the setting."""


def fidelity_name(extractor: str) -> str:
    if extractor in EXTRACTORS:
        return EXTRACTORS[extractor][0]
    return extractor  # any extractor registered with torch-fidelity under its own name


def resolve_weights(extractor: str, weights_path: str | None) -> str:
    """The local weights file of `extractor` (setting, else env var); digits weights are trained if absent."""
    env = EXTRACTORS.get(extractor, (None, None))[1]
    path = weights_path or (os.environ.get(env) if env else None)
    if extractor == "digits":
        from decm.eval.digits_features import ensure_classifier

        return ensure_classifier(path or DEFAULT_DIGITS_WEIGHTS)
    if not path or not os.path.isfile(path):
        raise EvaluationSetupError(
            f"{extractor} feature extractor weights not found: {path!r} (set evaluate.feature_weights_path"
            + (f" or ${env}" if env else "") + "; torch-fidelity would otherwise download them)")
    return path


def layers(extractor: str) -> dict:
    """Feature layer per metric, from the extractor's own defaults."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[fidelity_name(extractor)]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in METRICS}


class _Images(torch.utils.data.Dataset):
    def __init__(self, images_uint8: torch.Tensor):
        self.images = images_uint8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] N×C×H×W (C = 1 or 3) → uint8 N×3×H×W (torch-fidelity's input)."""
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.expand(-1, 3, -1, -1).contiguous() if img.shape[1] == 1 else img.contiguous()


@functools.lru_cache(maxsize=4)
def _extractor(name: str, need: tuple, cuda: bool, weights: str):
    """One torch-fidelity feature extractor per (name, layers, device, weights) per process: an
    evaluation builds it once, not once per (sampler, NFE) cell."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(name, list(need), cuda=cuda, feature_extractor_weights_path=weights)


def features(images_uint8: torch.Tensor, extractor: str, weights: str, batch_size: int = 64) -> dict:
    """{layer: float64 features} for every layer the metrics need."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    need = tuple(sorted(set(layers(extractor).values())))
    cuda = torch.cuda.is_available()
    fe = _extractor(fidelity_name(extractor), need, cuda, weights)
    # save_cpu_ram=True: no DataLoader worker processes (the images are already an in-memory tensor)
    fd = get_featuresdict_from_dataset(_Images(images_uint8), fe, batch_size, cuda, True, False)
    return {k: v.double().cpu() for k, v in fd.items()}


class ReferenceStats:
    """Reference statistics (see module docstring for the file layout).

    Args:
      mu: mean of the reference features.
      sigma: covariance of the reference features.
      features: reference features (KID, precision/recall), or None.
      extractor: extractor name, or None (unknown: ADM files).
      n: number of reference images.
      images: ADM `arr_0` reference images (uint8 NHWC), or None.
    """

    def __init__(self, mu, sigma, features=None, extractor=None, n=0, images=None):
        self.mu, self.sigma, self.features = np.asarray(mu, np.float64), np.asarray(sigma, np.float64), features
        self.extractor, self.n, self.images = extractor, int(n), images

    @classmethod
    def from_features(cls, feats: dict, extractor: str, keep_features: int = 10000):
        f = feats[layers(extractor)["fid"]].numpy()
        return cls(f.mean(0), np.cov(f, rowvar=False), f[:keep_features], extractor, len(f))

    def save(self, path: str) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.asarray(self.n)}
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, np.float32)
        if self.extractor:
            arrays["extractor"] = np.asarray(self.extractor)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, extractor: str | None = None):
        if not path or not os.path.isfile(path):
            raise EvaluationSetupError(f"reference statistics not found: {path!r} (set evaluate.ref_stats; "
                                       "make them with python -m decm.eval.ref_stats)")
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise EvaluationSetupError(f"{path}: not a reference-statistics file (needs 'mu' and 'sigma')")
            made_with = str(z["extractor"]) if "extractor" in z else None
            if extractor and made_with and made_with != extractor:
                raise EvaluationSetupError(f"{path} was made with extractor {made_with!r}, evaluation uses "
                                           f"{extractor!r} (set evaluate.extractor or remake the stats)")
            return cls(z["mu"], z["sigma"], z["features"] if "features" in z else None, made_with,
                       int(z["n"]) if "n" in z else 0, z["arr_0"] if "arr_0" in z else None)

    def reference_features(self, extractor: str, weights: str):
        """Reference features for KID / PRC (stored, or computed from ADM's arr_0 images), else None."""
        if self.features is None and self.images is not None and self.images.ndim == 4:
            imgs = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).contiguous()
            self.features = features(imgs, extractor, weights)[layers(extractor)["fid"]].numpy()
        return None if self.features is None else torch.as_tensor(np.asarray(self.features), dtype=torch.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two Gaussians, via torch-fidelity's implementation."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric({"mu": np.asarray(mu1), "sigma": np.asarray(sigma1)},
                                          {"mu": np.asarray(mu2), "sigma": np.asarray(sigma2)}, False)[KEY_METRIC_FID])


def metrics(gen: dict, ref: ReferenceStats, extractor: str, weights: str, which=("fid", "kid"),
            kid_subset_size: int = 1000, isc_splits: int = 10, prc_neighborhood: int = 3) -> dict:
    """Metrics of generated features `gen` ({layer: features}) against `ref`.

    Returns keys among fid, isc (mean) and isc_std, kid (mean) and kid_std, precision, recall, f_score.
    """
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    bad = [m for m in which if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choices: {METRICS}")
    lay = layers(extractor)
    out = {}
    g = gen[lay["fid"]].numpy()
    if "fid" in which:
        out["fid"] = frechet_distance(g.mean(0), np.cov(g, rowvar=False), ref.mu, ref.sigma)
    if "isc" in which:
        r = isc_featuresdict_to_metric(gen, lay["isc"], isc_splits=min(isc_splits, len(g)), verbose=False)
        out["isc"], out["isc_std"] = float(r["inception_score_mean"]), float(r["inception_score_std"])
    if "kid" in which or "prc" in which:
        rf = ref.reference_features(extractor, weights)
        if rf is None:
            raise EvaluationSetupError("KID / precision-recall need reference features: the stats file has no "
                                       "'features' (remake it with python -m decm.eval.ref_stats) — or drop "
                                       "them from evaluate.metrics")
        rd = {lay["fid"]: rf}
        if "kid" in which:
            r = kid_featuresdict_to_metric(gen, rd, lay["kid"], kid_subset_size=min(kid_subset_size, len(g), len(rf)),
                                           verbose=False)
            out["kid"], out["kid_std"] = float(r["kernel_inception_distance_mean"]), float(r["kernel_inception_distance_std"])
        if "prc" in which:
            r = prc_featuresdict_to_metric(gen, rd, lay["prc"], prc_neighborhood=prc_neighborhood, verbose=False)
            out["precision"], out["recall"], out["f_score"] = (float(r["precision"]), float(r["recall"]),
                                                                float(r["f_score"]))
    return out
