"""Dynamic batching: concurrent requests for one model gathered into one runtime call.

Requests wait at most `max_delay_ms` for company, up to `max_batch_size` rows, and only
while more is likely to come: the server holds requests that have not reached the batcher
yet (`arrive`), or a client it just answered came back within the delay last time
(`answered`). So a lone request runs at once, and clients that send their next request as
soon as answered make full batches. Inputs are concatenated along the batch dimension and
each caller gets its own rows back. Only models whose every input has a dynamic first
dimension are batched; other calls run one at a time on the same workers. With several
workers one gathers the next batch while others run theirs.
"""

import queue
import threading
import time
from collections.abc import Callable, Hashable

import numpy as np

Done = Callable[[dict[str, np.ndarray] | None, Exception | None], None]
"""Told a request's results, or the error its runtime call raised, on the worker's thread."""


class _Pending:
    __slots__ = ("inputs", "outputs", "rows", "done")

    def __init__(self, inputs, outputs, rows, done: Done):
        self.inputs, self.outputs, self.rows, self.done = inputs, outputs, rows, done


class _Client:
    """What the batcher knows of one client: when its last answer was ready, and how soon it came back before."""

    __slots__ = ("answered", "gap")

    def __init__(self):
        self.answered: float | None = None
        self.gap: float | None = None


class CallCost:
    """A runtime call's seconds as a fixed part plus a part per row: a least-squares line through recent calls
    (each call's weight decays by `decay` per later call)."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self._sums = [0.0] * 5  # weights, rows, seconds, rows², rows x seconds

    def add(self, rows: int, seconds: float) -> None:
        for index, value in enumerate((1.0, rows, seconds, rows * rows, rows * seconds)):
            self._sums[index] = self._sums[index] * self.decay + value

    def fixed(self) -> float:
        """The fixed part, what a call costs whatever its rows: the whole call while every call had the same rows
        (no line to fit), 0 before any call."""
        weight, rows, seconds, squares, products = self._sums
        if not weight:
            return 0.0
        mean_rows, mean_seconds = rows / weight, seconds / weight
        spread = squares / weight - mean_rows**2
        if spread < 0.01:
            return mean_seconds
        per_row = (products / weight - mean_rows * mean_seconds) / spread
        return min(max(mean_seconds - per_row * mean_rows, 0.0), mean_seconds)


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
        self._call_cost = CallCost()
        self._clients: dict[Hashable, _Client] = {}  # those the server told of, until they are gone
        self._expected: dict[Hashable, float] = {}  # of those, the ones a gathering batch waits for, and until when
        self._carried: _Pending | None = None  # taken by a gatherer, too big to join its batch: the next batch's first
        self._lock = threading.Lock()
        self._gathering = threading.Lock()
        for index in range(workers):
            threading.Thread(target=self._loop, name=f"batcher-{index}", daemon=True).start()

    def arrive(self, client: Hashable = None) -> None:
        """The server holds a request that may come here (from `client`, when the server knows them apart): worth
        waiting for while a batch gathers."""
        now = time.monotonic()
        with self._lock:
            self.in_hand += 1
            if client is None:
                return
            known = self._clients.setdefault(client, _Client())
            if known.answered is not None:
                known.gap, known.answered = now - known.answered, None
            self._expected.pop(client, None)

    def reach(self) -> None:
        """A request the server holds is about to be submitted."""
        with self._lock:
            self.reached += 1

    def leave(self, reached: bool) -> None:
        """A request the server held is answered (or refused before it reached here)."""
        with self._lock:
            self.in_hand -= 1
            self.reached -= reached

    def answered(self, client: Hashable) -> None:
        """`client`'s answer is ready. One whose last request came within the delay of its answer is likely to come
        back as soon again: a gathering batch waits for it, up to twice that gap."""
        now = time.monotonic()
        with self._lock:
            known = self._clients.get(client)
            if known is None:  # gone already
                return
            known.answered = now
            if known.gap is not None and known.gap <= self.max_delay:
                self._expected[client] = now + min(self.max_delay, 2 * known.gap)

    def gone(self, client: Hashable) -> None:
        """`client` will send nothing more."""
        with self._lock:
            self._clients.pop(client, None)
            self._expected.pop(client, None)

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
        started = time.monotonic()
        deadline = started + self.max_delay
        while rows < self.max_batch_size:
            if self.in_hand > self.reached or not self._queue.empty():
                until = deadline
            else:
                until = min(deadline, self._worth_waiting_until(started, len(batch)))
            remaining = until - time.monotonic()
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

    def _worth_waiting_until(self, started: float, requests: int) -> float:
        """Until when clients expected back are worth the runtime's idle wait: with k of them expected, each bringing
        as many rows as a request in hand, n requests in hand, and a call costing `fixed` plus a part per row, the
        batch's rows per second of runtime come out ahead exactly while the time waited is under fixed * k / n. So
        a model whose calls cost much the same at any size (a GPU's) waits for them; one whose cost is all rows
        does not."""
        now = time.monotonic()
        with self._lock:
            expected = [until for until in self._expected.values() if until > now]
            fixed = self._call_cost.fixed()
        return min(max(expected, default=0.0), started + fixed * len(expected) / requests)

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
            started = time.monotonic()
            results = self.runtime.run(inputs, list(items[0].outputs))
            with self._lock:
                self._call_cost.add(total, time.monotonic() - started)
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
