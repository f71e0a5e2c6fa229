"""Silence the third-party deprecation warnings every run would otherwise start with.

Only warnings that a user of this package cannot act on, matched by their message:

- setuptools' "pkg_resources is deprecated as an API": mmengine imports (and reloads)
  ``pkg_resources`` whenever it checks whether a package is installed, so every run
  printed it three times.
"""

from __future__ import annotations

import warnings

#: (message regex, category) of each silenced warning.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"pkg_resources is deprecated as an API", UserWarning),
)


def silence_known_warnings() -> None:
    """Add an ``ignore`` filter for each of :data:`KNOWN_WARNINGS` (idempotent)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
