"""Ray, the optional engine behind ``tbsac sweep`` and ``tbsac evaluate --workers``.

Local Ray on this machine by default (one worker per requested CPU), a cluster by its
address. Ray is an extra (``pip install -e '.[cluster]'``); without it these commands
say how to install it. Every worker runs torch on one thread: two threads per process
on busy cores made SAC up to 100x slower, and one thread everywhere keeps an evaluation
split over workers number for number equal to the serial one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from contextlib import contextmanager

from core.config import ConfigError
from core.registry import get_task

RAY_MISSING = "Ray is not installed: pip install -e '.[cluster]' (Ray Tune; an optional extra of tbsac)"
# Workers inherit these: one torch/BLAS thread per worker process.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def import_ray():
    """The ray module, or ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


@contextmanager
def ray_runtime(address: str | None = None, cpus: int | None = None, env: dict | None = None):
    """Ray for the block: a local instance with `cpus` CPUs (default: all), or the cluster
    at `address` (``ray://HOST:PORT`` or ``HOST:PORT``); shut down after the block.

    Inside the block this process's stdout goes to stderr: Ray prints its banners and the
    output it forwards from remote processes (Tune's, through Ray Client) on stdout, which
    stays for the command's results (``--json``)."""
    ray = import_ray()
    if ray.is_initialized():  # a caller (a test, a notebook) already chose where to run
        yield ray
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield from _started(ray, address, cpus, env)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ConfigError unless something listens at `address` (Ray retries a dead address for
    minutes before it gives up)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address: {address!r} is not ray://HOST:PORT or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"--address: nothing answers at {address} ({exc.strerror or exc}); is the Ray head running "
                          "(ray start --head ...)?") from None


def _started(ray, address: str | None, cpus: int | None, env: dict | None):
    if address:
        check_reachable(address)
    runtime_env = {"env_vars": {**WORKER_ENV, **(env or {})}}
    options = dict(include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    try:
        if address:
            _connect(ray, address, options)
        else:
            ray.init(num_cpus=cpus or os.cpu_count(), **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"--address: cannot reach the Ray cluster at {address}" if address else "cannot start a local Ray instance"
        raise ConfigError(f"{where} ({' '.join(str(exc).split())[:300]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# The head answers a Ray Client by spawning a server process for it; on a loaded head
# that spawn sometimes dies (seen once in CI, the next connection worked). Nothing ran
# yet, so connecting again is safe; any other failure is reported at once.
SPAWN_FAILED = "Starting Ray client server failed"
CONNECT_ATTEMPTS = 3


def _connect(ray, address: str, options: dict) -> None:
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **options)
            return
        except ConnectionError as exc:
            if SPAWN_FAILED not in str(exc) or attempt == CONNECT_ATTEMPTS:
                raise
            logging.getLogger(__name__).warning("the Ray head could not start a client server (attempt %d of %d); "
                                                "connecting again", attempt, CONNECT_ATTEMPTS)
            time.sleep(2.0 * attempt)


def seed_chunks(seed: int, episodes: int, workers: int, per_worker: int = 10) -> list[range]:
    """Machines seed .. seed + episodes - 1 in contiguous parts, about `per_worker` parts per
    worker so that slow machines (an optimiser that takes longer) do not leave a worker idle
    at the end (with 4 parts per worker, 40 RFQ injectors on 2 workers ran 1.72x faster than
    serially; a part costs one environment set-up, well under a second)."""
    parts = max(1, min(episodes, workers * per_worker))
    size = math.ceil(episodes / parts)
    return [range(start, min(start + size, seed + episodes)) for start in range(seed, seed + episodes, size)]


def _evaluate_part(task: str, setup, errors, agent, seeds: range, methods: tuple[str, ...], budget: int | None, extra: dict):
    import torch

    torch.set_num_threads(1)
    return get_task(task).evaluate_part(setup, errors, agent, seeds, methods, budget, **extra)


def evaluate_on_workers(definition, setup, errors, agent, episodes: int, seed: int, methods: tuple[str, ...],
                        budget: int | None, workers: int, address: str | None = None, **extra) -> tuple[dict, dict]:
    """The task's evaluation split over Ray workers: (summary, runs), equal to the serial run's.
    `extra`: as for ``TaskDefinition.evaluate`` (e.g. the comparison policies)."""
    if not definition.splits_evaluation:
        raise ConfigError(f"--workers: task {definition.name} does not split its evaluation over workers; "
                          "run it without --workers")
    with ray_runtime(address, workers) as ray:
        remote = ray.remote(num_cpus=1, max_retries=1)(_evaluate_part)
        setup_ref, errors_ref, agent_ref, extra_ref = ray.put(setup), ray.put(errors), ray.put(agent), ray.put(extra)
        pending = [remote.remote(definition.name, setup_ref, errors_ref, agent_ref, part, methods, budget, extra_ref)
                   for part in seed_chunks(seed, episodes, workers)]
        try:
            parts = ray.get(pending)
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(f"an evaluation worker failed: {exc.cause!r}") from None
    return definition.merge_evaluation(setup, errors, agent, parts, seed, methods, budget)
