"""Parity checks of zsadkit against golden outputs of the reference implementations.

    python -m zsadkit.verify anomalyclip tests/fixtures/anomalyclip

Each method has a module `zsadkit.verify.<method>` with `main(directory: Path) -> int` that recomputes the
fixture arrays, prints one line per array (max |Δ| and tolerance) and returns non-zero when any array is out of
tolerance. `Comparison` is the shared line printer and tally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Comparison:
    """Compares arrays with `|ours − reference| ≤ atol + rtol·|reference|`, printing one line each."""

    failures: list[str] = field(default_factory=list)
    checked: int = 0

    def check(self, name: str, ours: object, reference: object, atol: float, rtol: float = 0.0) -> bool:
        """Compare one array (any shape; integer arrays compare exactly when atol = rtol = 0)."""
        ours_array, reference_array = _as_float64(ours), _as_float64(reference)
        self.checked += 1
        if ours_array.shape != reference_array.shape:
            self.failures.append(name)
            print(f"FAIL  {name:<58} shape {ours_array.shape} vs reference {reference_array.shape}")
            return False
        difference = np.abs(ours_array - reference_array)
        max_difference = float(difference.max()) if difference.size else 0.0
        within = bool(np.all(difference <= atol + rtol * np.abs(reference_array)))
        if not within:
            self.failures.append(name)
        print(f"{'ok  ' if within else 'FAIL'}  {name:<58} max|Δ| {max_difference:.3e}   tol atol={atol:g} rtol={rtol:g}")
        return within

    def summary(self) -> int:
        """Print the tally; the exit status (0 = all within tolerance)."""
        if self.failures:
            print(f"{len(self.failures)} of {self.checked} arrays outside tolerance: {', '.join(self.failures)}")
            return 1
        print(f"all {self.checked} arrays within tolerance")
        return 0


def _as_float64(values: object) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)
