"""`python -m zsadkit.verify <method> DIR [--attention K]`: run `zsadkit.verify.<method>.main(DIR)` and exit with its
status. `--attention module` (default) runs the plain ViT blocks through open_clip's `nn.MultiheadAttention`, the
arithmetic the reference fixtures were recorded with; `--attention sdpa` checks the kit's default kernel, which
differs from it by float rounding (raw residual-stream tokens by up to 2e-5, docs/performance.md)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import zsadkit.verify
from zsadkit.models.runtime import ATTENTION_KERNELS, run_settings


def available_methods() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(zsadkit.verify.__path__) if not info.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    methods = available_methods()
    parser = argparse.ArgumentParser(prog="python -m zsadkit.verify", description=__doc__)
    parser.add_argument("method", choices=methods, help="which method's fixtures to check")
    parser.add_argument("directory", type=Path, help="fixture directory (e.g. tests/fixtures/anomalyclip)")
    parser.add_argument("--attention", choices=ATTENTION_KERNELS, default="module",
                        help="attention kernel of the image tower (default: module, the references' arithmetic)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    module = importlib.import_module(f"zsadkit.verify.{args.method}")
    with run_settings(attention=args.attention):
        return int(module.main(args.directory))


if __name__ == "__main__":
    sys.exit(main())
