"""Errors raised while reading checkpoints: they always name the file and the problem."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated or describes something unsupported."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An unanticipated exception as a short phrase for a ``CheckpointError``: its type and first line."""
    text = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
