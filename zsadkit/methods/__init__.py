"""One module per method, registered by name: `build_method("anomalyclip", ...)` imports and builds it.

    >>> from zsadkit.methods import build_method, registered_methods
    >>> registered_methods()
    ['anomalyclip', 'clip', 'clip-ac', 'coop', 'vand', 'winclip']
"""

from zsadkit.methods.base import Detector, Prediction, build_method, register_method, registered_methods

__all__ = ["Detector", "Prediction", "build_method", "register_method", "registered_methods"]
