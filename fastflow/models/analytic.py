"""``gmm``: a flow-matching model with a closed-form velocity — no weights, no training.

The data distribution is a mixture of isotropic Gaussians N(m_i, σ²I). Under the
rectified-flow path x_t = t·ε + (1 − t)·x₀ each component stays Gaussian,
x_t | i ~ N((1 − t)m_i, s_t²I) with s_t² = (1 − t)²σ² + t², and the exact velocity
E[ε − x₀ | x_t] is a posterior-weighted sum of per-component velocities

    v_i(x, t) = (t − (1 − t)σ²)/s_t² · (x − (1 − t)m_i) − m_i.

Label i conditions on component i; the null label is the whole mixture. Paths of the
unconditional mixture bend where the posterior picks a mode, so skipping steps there
has a real cost.
"""

from __future__ import annotations

import math

from fastflow.hookspecs import hookimpl
from fastflow.modelspec import ModelSpec, check_labels


class GaussianMixtureFlow:
    """Exact velocity of a Gaussian-mixture target. Call as ``model(x, t, label=None)``."""

    def __init__(self, means, std: float = 0.3):
        import torch

        self.means = torch.as_tensor(means, dtype=torch.float32)  # (K, D)
        self.std = float(std)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def __call__(self, x, t, label=None):
        import torch

        m = self.means.to(device=x.device, dtype=x.dtype)
        K = m.shape[0]
        a = (1.0 - t).view(-1, 1, 1)  # (B,1,1)
        tt = t.view(-1, 1, 1)
        s2 = a * a * self.std**2 + tt * tt
        diff = x.unsqueeze(1) - a * m.unsqueeze(0)  # (B,K,D)
        v_i = (tt - a * self.std**2) / s2 * diff - m.unsqueeze(0)
        logw = -(diff * diff).sum(-1) / (2.0 * s2.view(-1, 1))  # equal std: shared terms cancel
        if label is not None:
            label = torch.as_tensor(label)
            check_labels(self, label, x.shape[0], K)
            label = label.to(device=x.device).long().reshape(-1)
            allowed = torch.nn.functional.one_hot(label.clamp(0, K), K + 1)[:, :K].bool()
            allowed |= (label >= K).unsqueeze(1)  # null label: the whole mixture
            logw = logw.masked_fill(~allowed, -math.inf)
        w = torch.softmax(logw, dim=1).unsqueeze(-1)
        return (w * v_i).sum(1)


def ring_means(k: int = 8, radius: float = 3.0):
    return [[radius * math.cos(2 * math.pi * i / k), radius * math.sin(2 * math.pi * i / k)] for i in range(k)]


def build_gmm() -> GaussianMixtureFlow:
    return GaussianMixtureFlow(ring_means(), std=0.3)


GMM = ModelSpec(
    name="gmm",
    build=build_gmm,
    shape=(2,),
    num_labels=8,
    null_label=8,
    default_guidance=None,
    description="analytic 2-D Gaussian mixture (8 modes on a ring), exact velocity",
    key="gmm-ring8-std0.3",
    label_names=[f"mode{i}" for i in range(8)],
)


@hookimpl
def register_models(register):
    register(GMM)
