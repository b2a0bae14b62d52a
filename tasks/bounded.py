"""Submit tasks with at most a given number in flight, and take each as it ends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prefect.futures import PrefectFuture, as_completed

T = TypeVar("T")
_END = object()


def bounded(submit: Callable[[T], PrefectFuture[Any]], args: Iterable[T], limit: int) -> Iterator[
        tuple[T, PrefectFuture[Any]]]:
    """Submit ``submit(arg)`` for each arg with at most ``limit`` in flight; yield ``(arg, future)`` as each ends.

    Each yielded future has finished: ``future.state`` is the task run's final state (not the API's last
    write, which can lag behind).

    Args:
        submit: starts one task run for an argument (e.g. ``lambda x: some_task.submit(x)``).
        args: the arguments, consumed lazily as slots free up.
        limit: most task runs in flight at once (>= 1).
    """
    pending = iter(args)
    in_flight: dict[PrefectFuture[Any], T] = {}
    while True:
        while len(in_flight) < limit:
            arg = next(pending, _END)
            if arg is _END:
                break
            in_flight[submit(arg)] = arg  # type: ignore[index]
        if not in_flight:
            return
        done = next(as_completed(list(in_flight)))
        done.wait()
        yield in_flight.pop(done), done
