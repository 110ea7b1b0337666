"""The one error the importers raise: a log that cannot be read, said in one line."""

from __future__ import annotations


class LogError(ValueError):
    """A log file or folder that cannot be read, or a bad ``--map``; ``str()`` is one
    line that names the file and what is wrong with it."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
