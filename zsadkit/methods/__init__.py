"""One module per method; importing this package registers every method with `build_method`.

    >>> from zsadkit.methods import build_method, registered_methods
    >>> registered_methods()
    ['anomalyclip', 'clip', 'clip-ac', 'coop', 'vand', 'winclip']
"""

from zsadkit.methods import anomalyclip, clip_baseline, coop, vand, winclip  # noqa: F401  (registration)
from zsadkit.methods.base import Detector, Prediction, build_method, register_method, registered_methods

__all__ = ["Detector", "Prediction", "build_method", "register_method", "registered_methods"]
