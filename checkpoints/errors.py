"""Errors raised while reading checkpoints: they always name the file and the problem."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated or describes something unsupported."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
