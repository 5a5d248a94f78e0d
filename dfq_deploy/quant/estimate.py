"""A data-free accuracy estimate: how much top-1 a quantized model loses, from synthetic probes and the float model.

No labels exist without data, so the float model's own probabilities stand in for them. If the float model's
softmax ``p`` were calibrated, the expected top-1 of any classifier ``c`` on inputs like ``x`` would be
``E[p(c(x) | x)]``; the quantized model's expected loss against the float model is then

    drop = E[ p(y_float | x) - p(y_quant | x) ]      (0 where the two agree)

a "soft-label" drop: a disagreement on an input the float model was unsure of costs little, one on an input it
was sure of costs its whole confidence. It is measured on **estimate probes** that calibration never saw:
mixes of two calibration images (random weight, random flip, plus 0.1 Gaussian noise), which sit between the
synthetic images' classes, where quantization moves decisions (:func:`estimate_probes`).

Reported with it: top-1 agreement with the float model, the mean KL divergence ``KL(p_float || p_quant)``, and a
bootstrap interval of the drop over the probes. How well it predicts the measured drop on CIFAR-10 ``dev`` is in
``experiments/results/estimator-deit_tiny_cifar10.md`` (rank correlation and error over every preset and source).
"""

from __future__ import annotations

import numpy as np
import torch

#: Estimate probes drawn by default.
NUM_ESTIMATE_PROBES = 256
#: Seed offset of the estimate probes (apart from the parity probes' and the held-back images').
ESTIMATE_SEED_OFFSET = 2_000_003
#: Predicted drops (points) above this are flagged in the export's report and log.
FLAG_DROP_POINTS = 1.0
#: Bootstrap resamples of the interval, and its coverage.
BOOTSTRAP = 1000
INTERVAL = 0.95


def estimate_probes(calib: torch.Tensor, n: int = NUM_ESTIMATE_PROBES, seed: int = 0) -> torch.Tensor:
    """``n`` probes: convex mixes of two calibration images, half flipped, plus 0.1 noise (deterministic in seed)."""
    g = torch.Generator().manual_seed(seed + ESTIMATE_SEED_OFFSET)
    a, b = (torch.randint(0, len(calib), (n,), generator=g) for _ in range(2))
    lam = torch.rand(n, 1, 1, 1, generator=g)
    mix = lam * calib[a] + (1 - lam) * calib[b]
    flip = torch.rand(n, generator=g) < 0.5
    mix[flip] = mix[flip].flip(-1)
    return mix + 0.1 * torch.randn(mix.shape, generator=g)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def kl_divergence(fp_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-input ``KL(softmax(fp) || softmax(q))`` in nats."""
    p, q = _softmax(fp_logits), _softmax(q_logits)
    return (p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None)))).sum(-1)


def soft_drop(fp_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-input ``p_float(y_float) - p_float(y_quant)`` (see the module docstring)."""
    p = _softmax(fp_logits)
    rows = np.arange(len(p))
    return p[rows, p.argmax(-1)] - p[rows, np.asarray(q_logits).argmax(-1)]


def estimate_accuracy(fp_logits: np.ndarray | torch.Tensor, q_logits: np.ndarray | torch.Tensor,
                      seed: int = 0) -> dict[str, float | list[float] | bool | int]:
    """The data-free estimate from the float and quantized logits on the same probes.

    Returns:
        ``agreement`` (top-1, 0..1), ``kl`` (mean, nats), ``predicted_drop`` (top-1 points), ``interval``
        (bootstrap over the probes, points), ``flagged`` (predicted drop above :data:`FLAG_DROP_POINTS`) and
        ``probes``.
    """
    fp = np.asarray(fp_logits, dtype=np.float64)
    q = np.asarray(q_logits, dtype=np.float64)
    drops = 100.0 * soft_drop(fp, q)
    rng = np.random.default_rng(seed)
    boots = drops[rng.integers(0, len(drops), (BOOTSTRAP, len(drops)))].mean(1)
    lo, hi = np.quantile(boots, [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2])
    predicted = float(drops.mean())
    return {"agreement": float((fp.argmax(-1) == q.argmax(-1)).mean()), "kl": float(kl_divergence(fp, q).mean()),
            "predicted_drop": predicted, "interval": [float(lo), float(hi)],
            "flagged": predicted > FLAG_DROP_POINTS, "probes": len(fp)}


def describe(est: dict) -> str:
    """One line for the export's log."""
    lo, hi = est["interval"]
    flag = f" (more than {FLAG_DROP_POINTS:g} point: check it on labelled data)" if est["flagged"] else ""
    return (f"data-free estimate on {est['probes']} synthetic probes: top-1 agreement with the float model "
            f"{100 * est['agreement']:.1f}%, KL {est['kl']:.4f}, predicted top-1 drop {est['predicted_drop']:.2f} "
            f"points [{lo:.2f}, {hi:.2f}]{flag}")
