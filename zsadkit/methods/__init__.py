"""One module per method, each registering its builder by name (timm's registry): importing the package imports
them all, so `build_method("anomalyclip", ...)` knows every method.

    >>> from zsadkit.methods import build_method, registered_methods
    >>> registered_methods()
    ['aaclip', 'anomalyclip', 'clip', 'clip-ac', 'coop', 'headclip', 'inctrl', 'vand', 'winclip']
"""

from zsadkit.methods import aaclip, anomalyclip, clip_baseline, coop, headclip, inctrl, vand, winclip
from zsadkit.methods.base import (
    Detector,
    FeatureModel,
    Prediction,
    build_method,
    register_method,
    registered_methods,
)

__all__ = [
    "Detector",
    "FeatureModel",
    "Prediction",
    "aaclip",
    "anomalyclip",
    "build_method",
    "clip_baseline",
    "coop",
    "headclip",
    "inctrl",
    "register_method",
    "registered_methods",
    "vand",
    "winclip",
]
