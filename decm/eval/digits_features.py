"""A small digits classifier used as the CPU-scale feature extractor for FID/KID through torch-fidelity.

Same code path as Inception at scale: the extractor is registered with torch-fidelity under
`decm-digits`, receives uint8 N×3×H×W images and loads its weights from
`feature_extractor_weights_path`. Train and cache it with
`python -m decm.eval.digits_features --out runs/cache/digits_classifier.pt`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import register_feature_extractor

EXTRACTOR_NAME = "decm-digits"
FEATURE_DIM = 64


class DigitsNet(nn.Module):
    """CNN on 1×16×16 digits in [−1, 1]: two conv blocks → 64-d features → 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) if x.shape[-1] != 16 else x
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(out_path: str, epochs: int = 30, seed: int = 0) -> float:
    """Trains DigitsNet on 80% of the digits, returns held-out accuracy, saves weights atomically."""
    from decm.data.builtin import Digits

    torch.manual_seed(seed)
    data = Digits(image_size=8)
    n = len(data.images)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[: int(0.8 * n)], perm[int(0.8 * n):]
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for chunk in train_idx[torch.randperm(len(train_idx))].split(64):
            x = data.images[chunk] + 0.05 * torch.randn_like(data.images[chunk])
            loss = F.cross_entropy(net(x), data.labels[chunk])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((net(data.images[test_idx]).argmax(1) == data.labels[test_idx]).float().mean())
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    torch.save({"state_dict": net.state_dict(), "test_accuracy": acc}, tmp)
    os.replace(tmp, out_path)
    return acc


def ensure_classifier(path: str) -> str:
    """Returns `path`, training and caching the classifier there first if it does not exist."""
    if not os.path.exists(path):
        acc = train_classifier(path)
        print(f"[decm] trained digits feature classifier: held-out accuracy {acc:.3f} → {path}")
    return path


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: uint8 N×3×H×W → ('features' 64-d, 'logits' 10-d) of DigitsNet."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None or not os.path.exists(feature_extractor_weights_path):
            raise FileNotFoundError(
                f"digits feature extractor weights not found: {feature_extractor_weights_path!r} "
                "(set evaluate.feature_weights_path or run python -m decm.eval.digits_features)")
        self.net = DigitsNet()
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True)["state_dict"])

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        gray = x.float().mean(1, keepdim=True) / 127.5 - 1.0
        feats = self.net.features(gray)
        out = {"features": feats, "logits": self.net.head(feats)}
        return tuple(out[name] for name in self.features_list)


register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)


def main(argv=None):
    from decm import cli

    parser = cli.parser("python -m decm.eval.digits_features", "Train and cache the digits feature classifier "
                        "(the decm-digits FID extractor).")
    parser.add_argument("--out", default="runs/cache/digits_classifier.pt", help="where the classifier is cached")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the classifier")
    args = parser.parse_args(argv)
    print(f"held-out accuracy: {train_classifier(args.out, args.epochs):.4f} → {args.out}")


if __name__ == "__main__":
    main()
