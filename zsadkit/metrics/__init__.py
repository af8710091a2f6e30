"""Metrics shared by every method: image and pixel AUROC / AP / F1-max, two AU-PRO variants, AUPIMO, an evaluator.

See docs/metrics.md for which paper reports which metric and why two AU-PRO variants exist.

Example:
    >>> import numpy as np
    >>> from zsadkit.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
"""

from zsadkit.metrics.aupimo import AUPIMO_FPR_BOUNDS, aupimo, per_image_aupimo
from zsadkit.metrics.evaluator import ClassSamples, Evaluator, mad
from zsadkit.metrics.pro import aupro, aupro_cflow200
from zsadkit.metrics.ranking import f1_max, image_ap, image_auroc, pixel_ap, pixel_auroc, pixel_f1_max
from zsadkit.metrics.validation import UndefinedMetricError

__all__ = [
    "AUPIMO_FPR_BOUNDS",
    "ClassSamples",
    "Evaluator",
    "UndefinedMetricError",
    "aupimo",
    "aupro",
    "aupro_cflow200",
    "f1_max",
    "image_ap",
    "image_auroc",
    "mad",
    "per_image_aupimo",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
]
