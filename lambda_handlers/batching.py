"""Dynamic batching: concurrent requests for one model gathered into one runtime call.

Requests wait at most `max_delay_ms` for company, up to `max_batch_size` rows, and only
while the server holds requests that have not reached the batcher yet (`arrive`): a lone
request runs at once. Inputs are concatenated along the batch dimension and each caller
gets its own rows back. Only models whose every input has a dynamic first dimension are
batched; other calls run one at a time on the same workers. With several workers one
gathers the next batch while others run theirs.
"""

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

Done = Callable[[dict[str, np.ndarray] | None, Exception | None], None]
"""Told a request's results, or the error its runtime call raised, on the worker's thread."""


class _Pending:
    __slots__ = ("inputs", "outputs", "rows", "done")

    def __init__(self, inputs, outputs, rows, done: Done):
        self.inputs, self.outputs, self.rows, self.done = inputs, outputs, rows, done


def batch_first(specs) -> bool:
    """Every tensor has a dynamic first dimension: the batch rows can be joined and split along it."""
    return all(spec.shape and spec.shape[0] == -1 for spec in specs)


def one_row_each(results: dict[str, np.ndarray], rows: int) -> bool:
    """Every output has one row per input row: it can be split (or unpadded) along the batch."""
    return all(array.ndim and array.shape[0] == rows for array in results.values())


class BatchingModel:
    """Wraps a runtime adapter: `submit` hands a request to the workers and returns at once, `run` waits for it;
    both may be called from many threads at once."""

    def __init__(self, runtime, max_batch_size: int = 32, max_delay_ms: float = 2.0, workers: int = 1):
        if max_batch_size < 1 or max_delay_ms < 0 or workers < 1:
            raise ValueError(
                f"max_batch_size and workers must be >= 1 and max_delay_ms >= 0, "
                f"got {max_batch_size}, {workers}, {max_delay_ms}"
            )
        self.runtime = runtime
        self.signature, self.platform, self.format = runtime.signature, runtime.platform, runtime.format
        self.max_batch_size, self.max_delay = max_batch_size, max_delay_ms / 1000
        self.batchable = batch_first(runtime.signature.inputs)
        self.runtime_calls = 0
        self.requests = 0
        self.on_runtime_call: Callable[[int], None] = lambda rows: None
        """Told each runtime call's rows (the server's batch size histogram)."""
        self.in_hand = 0  # requests the server holds
        self.reached = 0  # of those, the ones that have been submitted: the rest may still come
        self._queue: "queue.Queue[_Pending]" = queue.Queue()
        self._carried: _Pending | None = None  # taken by a gatherer, too big to join its batch: the next batch's first
        self._lock = threading.Lock()
        self._gathering = threading.Lock()
        for index in range(workers):
            threading.Thread(target=self._loop, name=f"batcher-{index}", daemon=True).start()

    def arrive(self) -> None:
        """The server holds a request that may come here: worth waiting for while a batch gathers."""
        with self._lock:
            self.in_hand += 1

    def reach(self) -> None:
        """A request the server holds is about to be submitted."""
        with self._lock:
            self.reached += 1

    def leave(self, reached: bool) -> None:
        """A request the server held is answered (or refused before it reached here)."""
        with self._lock:
            self.in_hand -= 1
            self.reached -= reached

    def submit(self, inputs: dict[str, np.ndarray], output_names: list[str], done: Done) -> None:
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        with self._lock:
            self.requests += 1
        self._queue.put(_Pending(inputs, tuple(output_names), rows, done))

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        finished, answer = threading.Event(), []

        def done(results, error):
            answer.append((results, error))
            finished.set()

        self.submit(inputs, output_names, done)
        finished.wait()
        results, error = answer[0]
        if error is not None:
            raise error
        return results

    def waiting(self) -> int:
        """Requests queued for a batch that no worker has taken yet."""
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            with self._gathering:
                batch = self._gather()
            self._run_groups(batch)

    def _alone(self, item: _Pending) -> bool:
        return not self.batchable or item.rows >= self.max_batch_size

    def _gather(self) -> list[_Pending]:
        first, self._carried = self._carried or self._queue.get(), None
        batch, rows = [first], first.rows
        if self._alone(first):
            return batch
        deadline = time.monotonic() + self.max_delay
        while rows < self.max_batch_size and (self.in_hand > self.reached or not self._queue.empty()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if self._alone(item) or rows + item.rows > self.max_batch_size:
                self._carried = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _run_groups(self, batch: list[_Pending]) -> None:
        """Requests batch together when they ask for the same outputs and agree on every non-batch dimension."""
        groups: dict[tuple, list[_Pending]] = {}
        for item in batch:
            key = (item.outputs, tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(item.inputs.items())))
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            self._run(items)

    def _run(self, items: list[_Pending]) -> None:
        names = list(items[0].inputs)
        try:
            inputs = {
                name: np.concatenate([item.inputs[name] for item in items]) if len(items) > 1 else items[0].inputs[name]
                for name in names
            }
            with self._lock:
                self.runtime_calls += 1
            total = sum(item.rows for item in items)
            self.on_runtime_call(total)
            results = self.runtime.run(inputs, list(items[0].outputs))
            if len(items) > 1 and not one_row_each(results, total):
                for item in items:  # an output without the batch dimension cannot be split: run them one by one
                    self._run([item])
                return
        except Exception as error:  # every caller of the batch hears of it
            for item in items:
                item.done(None, error)
            return
        if len(items) == 1:  # whole, whatever its outputs' shapes
            items[0].done(results, None)
            return
        start = 0
        for item in items:
            item.done({name: array[start : start + item.rows] for name, array in results.items()}, None)
            start += item.rows


class FixedBatchSizes:
    """Runs every call at one of a few batch sizes, each on its own runtime, padding the rows up.

    ONNX Runtime's CUDA convolutions set themselves up again whenever the input shape changes:
    on an H100, ResNet-18 took 43 ms a call alternating batches of 8 and 16 rows, and 1.4 and
    2.2 ms at either size alone. Dynamic batching makes a new size of most batches, so on a GPU
    a batch of 5 rows runs padded to 8 on the runtime that only ever sees 8. The cost is one copy
    of the weights per size.
    """

    def __init__(self, runtime, make_runtime, sizes: list[int]):
        """`runtime` serves the smallest size; `make_runtime` makes one for each of the others."""
        if not sizes or min(sizes) < 1:
            raise ValueError(f"batch sizes must be one or more positive numbers, got {sizes}")
        self.sizes = sorted(set(sizes))
        self._runtimes = {size: runtime if size == self.sizes[0] else make_runtime() for size in self.sizes}
        self.signature, self.platform, self.format = runtime.signature, runtime.platform, runtime.format
        self.calls_by_size = dict.fromkeys(self.sizes, 0)  # /stats shows it
        self._count = threading.Lock()
        # padding rows would show in an output over the whole batch (a sum, say): only per-row outputs are padded
        self._per_row = batch_first(runtime.signature.outputs)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        rows = next(iter(inputs.values())).shape[0]
        largest = self.sizes[-1]
        if rows > largest:
            parts = [
                self.run({name: array[start : start + largest] for name, array in inputs.items()}, output_names)
                for start in range(0, rows, largest)
            ]
            return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        size = next(size for size in self.sizes if size >= rows)
        with self._count:
            self.calls_by_size[size] += 1
        if size == rows or not self._per_row:
            return self._runtimes[size].run(inputs, output_names)
        # padding repeats the last row: zeros could be what a model divides by
        padded = {
            name: np.concatenate([array, np.repeat(array[-1:], size - rows, axis=0)]) for name, array in inputs.items()
        }
        results = self._runtimes[size].run(padded, output_names)
        if not one_row_each(results, size):
            return self._runtimes[size].run(inputs, output_names)  # a dynamic output that is not per row after all
        return {name: array[:rows] for name, array in results.items()}


def powers_of_two(up_to: int) -> list[int]:
    return [1 << power for power in range(up_to.bit_length())] + ([up_to] if up_to & (up_to - 1) else [])
