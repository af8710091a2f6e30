"""Where zsadkit reads and writes on disk: one place for every path the package derives from its checkout.

The package lives in a repository checkout (editable install); results, caches and the smoke data sit beside it.

Example:
    >>> results_dir("smoke").name
    'smoke'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "PACKAGE_ROOT",
    "PUBLISHED_DIR",
    "REGISTRY_FILE",
    "REPO_ROOT",
    "SMOKE_DATA_ROOT",
    "default_cache_root",
    "results_dir",
]

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
#: The synthetic MVTec-layout datasets of the smoke profile (generated on first use).
SMOKE_DATA_ROOT = REPO_ROOT / "data" / "synthetic"
#: The papers' numbers as CSV (`results/published/README.md`).
PUBLISHED_DIR = REPO_ROOT / "results" / "published"
#: The notebooks the runner executes (`python -m zsadkit.reproduce`).
REGISTRY_FILE = REPO_ROOT / "notebooks" / "registry.yaml"


def results_dir(profile: str) -> Path:
    """`results/<profile>/` of the checkout (not created)."""
    return REPO_ROOT / "results" / profile


def default_cache_root() -> Path:
    """Parent folder of the feature caches: `$ZSADKIT_CACHE/features`, else `<repo>/.cache/features`."""
    base = os.environ.get("ZSADKIT_CACHE")
    return Path(base) / "features" if base else REPO_ROOT / ".cache" / "features"
