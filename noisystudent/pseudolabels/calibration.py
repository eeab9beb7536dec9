"""Temperature scaling (Guo et al., 2017): one scalar T for the teacher, softmax(logits / T), chosen to
minimise the negative log-likelihood on held-out labeled images, so that a confidence of 0.3 means
about 30% right before pseudolabel.threshold is applied to it.

No optimizer loop over stored logits: one pass over the held-out shards measures the NLL at a grid of
temperatures at once (evaluation.evaluate, summed over processes like every other metric), then a
parabola through the best grid point and its neighbours (in log T) refines the minimum. A second pass
measures NLL and expected calibration error at the fitted T, to record what calibration changed."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

# T from 0.05 to 20, 4% apart: the NLL is smooth in log T, so the parabola lands well inside a step
GRID = torch.logspace(math.log10(0.05), math.log10(20.0), 154, dtype=torch.float64)


def best_temperature(temps: list[float], nll: list[float]) -> float:
    """The minimum of the NLL over the grid, refined by a parabola in log T through its neighbours."""
    i = min(range(len(nll)), key=nll.__getitem__)
    if i in (0, len(nll) - 1):
        log.warning("calibration: the best temperature is at the edge of the grid searched (T=%.3g)", temps[i])
        return float(temps[i])
    x = [math.log(temps[j]) for j in (i - 1, i, i + 1)]
    y = [nll[j] for j in (i - 1, i, i + 1)]
    curv = (y[2] - 2 * y[1] + y[0])
    if curv <= 0:
        return float(temps[i])
    h = x[1] - x[0]
    return float(math.exp(x[1] + h * (y[0] - y[2]) / (2 * curv)))


def fit_temperature(measure, source: str) -> dict:
    """`measure(temperature, grid)` -> evaluation.evaluate's metrics on the held-out images (from `source`,
    a config key). The fitted temperature and the NLL / ECE before and after it."""
    before = measure(1.0, GRID)
    if not before["images"]:
        from ..errors import DataError

        raise DataError(f"pseudolabel.calibrate=true: {source} holds no labeled image to fit the temperature on")
    t = best_temperature(GRID.tolist(), before["nll_at"])
    after = measure(t, None)
    out = {"temperature": t, "source": source, "images": before["images"],
           "before": {k: before[k] for k in ("nll", "ece", "top1")},
           "after": {k: after[k] for k in ("nll", "ece", "top1")},
           "reliability_before": before["reliability"], "reliability_after": after["reliability"]}
    log.info("calibration on %s (%d images): temperature %.3f; NLL %.4f -> %.4f, ECE %.4f -> %.4f", source,
             out["images"], t, out["before"]["nll"], out["after"]["nll"], out["before"]["ece"], out["after"]["ece"])
    return out
