"""Time to generate the default synthetic datasets (target: a few seconds on 2 CPU cores).

Usage: python benchmarks/bench_synthetic.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from zsadkit.data.synthetic import SyntheticConfig, make_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = SyntheticConfig()
    n_files = (len(config.aux_classes) + len(config.target_classes)) * (
        config.n_train_normal + config.n_test_normal + 2 * config.n_test_anomalous
    )
    print(f"default SyntheticConfig: {config.image_size}px, {n_files} PNG files (images + masks)")
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            make_synthetic(Path(folder))
            generated = time.perf_counter() - start
            start = time.perf_counter()
            make_synthetic(Path(folder))
            reused = time.perf_counter() - start
        print(f"run {repeat}: generate {generated:.2f} s, reuse existing {reused * 1000:.1f} ms")


if __name__ == "__main__":
    main()
