"""The one check of a named choice, used wherever an argument must be one of a fixed set of names."""
from __future__ import annotations

from typing import Any, Iterable


def check_choice(name: str, value: Any, choices: Iterable) -> None:
    """A ValueError naming ``name``, the allowed ``choices`` and what was found, unless ``value`` is one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
