"""User-facing errors: one message that names the file (or input) and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class JaxrsError(Exception):
    """An error the user can act on; the CLI prints its message alone, without a traceback."""


class ModelLoadError(JaxrsError):
    """A model source that cannot be loaded: missing, truncated, unsupported or inconsistent."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
