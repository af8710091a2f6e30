"""Parity checks of zsadkit against golden outputs of the reference implementations.

    python -m zsadkit.verify anomalyclip tests/fixtures/anomalyclip

Each method has a module `zsadkit.verify.<method>` with `main(directory: Path) -> int` that recomputes the
fixture arrays, prints one line per array (max |Δ| and tolerance) and returns non-zero when any array is out of
tolerance, a required file is missing, or nothing was checked. `Comparison` is the one line printer and tally of
every verify command; `Comparison.section` turns an unexpected fixture format into one FAIL line naming the part
(and the file and key the error names) and goes on with the other parts. Every file a command reads is read inside
a section, the settings included: a fixture the command cannot read is FAIL lines and exit status 1, never a
traceback. `int_setting`, `ints_setting`, `float_setting` and `floats_setting` read a typed setting of a JSON file and name the
file, the key and what was expected when the value has another type.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["Comparison", "FixtureError", "float_setting", "floats_setting", "int_setting", "ints_setting"]

Parsed = TypeVar("Parsed")


class FixtureError(ValueError):
    """A fixture directory lacks a file or key, or holds a value of another format than expected."""


#: What a section turns into a FAIL line: fixture formats the code did not expect (missing keys, values of another
#: type or shape, unreadable or truncated files; torch reports shape mismatches as RuntimeError), not programming
#: errors such as AttributeError.
SECTION_ERRORS: tuple[type[Exception], ...] = (FixtureError, KeyError, ValueError, TypeError, IndexError, OSError,
                                               RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise TypeError(f"not an integer: {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"not an integer: {value!r}")
    return int(value)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _setting(mapping: Mapping, key: str, file: Path | str, expected: str, parse: Callable[[object], Parsed]) -> Parsed:
    """`parse(mapping[key])`; a value of another type is a FixtureError naming the file, the key and what was
    expected (a missing key is the caller's to check, as the defaults differ)."""
    value = mapping[key]
    try:
        return parse(value)
    except (TypeError, ValueError) as error:
        raise FixtureError(f"{file}: {key!r} must be {expected}, got {type(value).__name__} {value!r}") from error


def int_setting(mapping: Mapping, key: str, file: Path | str) -> int:
    """The integer `mapping[key]` of `file` (a JSON value such as ``"vision_heads": 2``)."""
    return _setting(mapping, key, file, "an integer", _integer)


def _list_of(parse_item: Callable[[object], Any]) -> Callable[[object], tuple]:
    """A parser of a JSON list whose items `parse_item` reads."""
    def parse(value: object) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"not a list: {value!r}")
        return tuple(parse_item(item) for item in value)
    return parse


def ints_setting(mapping: Mapping, key: str, file: Path | str) -> tuple[int, ...]:
    """The list of integers `mapping[key]` of `file` (e.g. ``"levels": [6, 12, 18, 24]``)."""
    return _setting(mapping, key, file, "a list of integers", _list_of(_integer))


def float_setting(mapping: Mapping, key: str, file: Path | str) -> float:
    """The number `mapping[key]` of `file` (e.g. ``"text_adapt_weight": 0.1``)."""
    return _setting(mapping, key, file, "a number", _number)


def floats_setting(mapping: Mapping, key: str, file: Path | str) -> tuple[float, ...]:
    """The list of numbers `mapping[key]` of `file` (e.g. ``"betas": [0.5, 0.999]``)."""
    return _setting(mapping, key, file, "a list of numbers", _list_of(_number))


@dataclass
class Comparison:
    """Compares arrays with `|ours − reference| ≤ atol + rtol·|reference|`, printing one line each."""

    failures: list[str] = field(default_factory=list)
    checked: int = 0
    missing_files: list[str] = field(default_factory=list)

    def require(self, directory: Path, name: str) -> bool:
        """True if the required file `directory/name` exists; else print a MISSING line and count a failure."""
        if (directory / name).exists():
            return True
        self.missing_files.append(name)
        self.failures.append(name)
        print(f"FAIL  {name:<58} required file absent from {directory}")
        return False

    def optional(self, directory: Path, name: str) -> bool:
        """True if the optional file `directory/name` exists; else print a "skipped" line."""
        if (directory / name).exists():
            return True
        print(f"skipped: {name} absent")
        return False

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

    def note(self, text: str) -> None:
        """Print a NOTE line (a fixture peculiarity or a setting read from defaults)."""
        print(f"NOTE  {text}")

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Run one part of the checks; an error in it (a missing key, an array of another format) is one FAIL
        line with the error, counted as a failure, and the other parts still run."""
        try:
            yield
        except SECTION_ERRORS as error:
            self.failures.append(name)
            print(f"FAIL  {name:<58} not checked: {type(error).__name__}: {error}")

    def summary(self) -> int:
        """Print the tally; the exit status (0 = every required file present, at least one array checked, all
        within tolerance)."""
        if self.missing_files:
            print(f"{len(self.missing_files)} required files missing: {', '.join(self.missing_files)}")
        outside = [name for name in self.failures if name not in self.missing_files]
        if outside:
            print(f"{len(outside)} checks failed (of {self.checked} arrays compared): {', '.join(outside)}")
        if self.failures:
            return 1
        if self.checked == 0:
            print("nothing was checked: no reference arrays found")
            return 1
        print(f"all {self.checked} arrays within tolerance")
        return 0


def _as_float64(values: object) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)
