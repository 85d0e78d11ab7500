"""Several processes as one server (``flaxchat serve --coordinator HOST:PORT --num-processes N --process-id I``).

Every process runs the same command but its ``--process-id``: each loads the model onto its own devices of
the global mesh; process 0 serves HTTP and schedules, the others replay its device calls
(``sampling/lockstep.py``). The calls travel through the key-value store of the coordination service that
``jax.distributed`` already runs on process 0: no second port, and no process outlives the coordinator
(a follower's read fails when it goes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("flaxchat")

_PREFIX = "flaxchat/lockstep"
_CHUNK = 256  # messages per key-value directory; the leader deletes directories every follower has read
_POLL_MS = 60_000  # a follower's wait per read (an idle server sends nothing for as long as it likes)


@dataclass(frozen=True)
class Cluster:
    coordinator: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int

    @property
    def leads(self) -> bool:
        return self.process_id == 0


def join(cluster: Cluster) -> None:
    """Join the JAX distributed runtime (before anything else touches JAX's backends). On CPU the
    cross-process collectives go over gloo."""
    import jax

    if not 0 <= cluster.process_id < cluster.num_processes:
        raise ValueError(f"--process-id must be in [0, {cluster.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id)
    log.info("process %d of %d joined %s: %d of %d devices here", jax.process_index(), jax.process_count(),
             cluster.coordinator, jax.local_device_count(), jax.device_count())


def _client():
    from jax._src import distributed  # the coordination service's client: public API has no key-value store

    if distributed.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialised (cluster.join)")
    return distributed.global_state.client


def _is(error: Exception, status: str) -> bool:
    return str(error).startswith(status)


class KeyValueChannel:
    """Ordered messages from process 0 to the others through the coordination service's key-value store:
    message ``n`` is the key ``flaxchat/lockstep/<n // 256>/<n>``; each follower records the directory it
    reached, and the leader deletes the directories all of them have passed."""

    def __init__(self) -> None:
        import jax

        self._client = _client()
        self._process, self._processes = jax.process_index(), jax.process_count()
        self._count = 0  # messages sent (leader) or received (follower)
        self._deleted = 0  # directories below this are gone

    def send(self, message: bytes) -> None:
        self._count += 1
        if self._count % _CHUNK == 0:
            self._delete_read()
        self._client.key_value_set_bytes(f"{_PREFIX}/{self._count // _CHUNK}/{self._count}", message)

    def _delete_read(self) -> None:
        reached = min((self._reached(p) for p in range(1, self._processes)), default=self._count // _CHUNK)
        for directory in range(self._deleted, reached):
            self._client.key_value_delete(f"{_PREFIX}/{directory}/")
        self._deleted = max(self._deleted, reached)

    def _reached(self, process: int) -> int:
        try:
            return int(self._client.key_value_try_get(f"{_PREFIX}_reached/{process}"))
        except Exception as error:  # noqa: BLE001
            if _is(error, "NOT_FOUND"):
                return 0
            raise

    def receive(self) -> bytes:
        self._count += 1
        if self._count % _CHUNK == 0:  # everything in the directories below this one has been read
            self._client.key_value_set(f"{_PREFIX}_reached/{self._process}", str(self._count // _CHUNK),
                                       allow_overwrite=True)
        key = f"{_PREFIX}/{self._count // _CHUNK}/{self._count}"
        while True:
            try:
                return self._client.blocking_key_value_get_bytes(key, _POLL_MS)
            except Exception as error:  # noqa: BLE001
                if not _is(error, "DEADLINE_EXCEEDED"):
                    raise


__all__ = ["Cluster", "KeyValueChannel", "join"]
