"""Dynamic batching: concurrent requests for one model gathered into one runtime call.

Requests wait at most `max_delay_ms` for company, up to `max_batch_size` rows, and only
while the server has more requests in hand than the batch holds (`arriving`): a lone
request runs at once. Inputs are concatenated along the batch dimension and each caller
gets its own rows back. Only models whose every input has a dynamic first dimension are
batched.
"""

import contextlib
import queue
import threading
import time

import numpy as np


class _Pending:
    __slots__ = ("inputs", "outputs", "rows", "done", "result", "error")

    def __init__(self, inputs, outputs, rows):
        self.inputs, self.outputs, self.rows = inputs, outputs, rows
        self.done = threading.Event()
        self.result = None
        self.error = None


class BatchingModel:
    """Wraps a runtime adapter; `run` may be called from many threads at once."""

    def __init__(self, runtime, max_batch_size: int = 32, max_delay_ms: float = 2.0):
        if max_batch_size < 1 or max_delay_ms < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_delay_ms >= 0, got {max_batch_size}, {max_delay_ms}")
        self.runtime = runtime
        self.signature, self.platform, self.format = runtime.signature, runtime.platform, runtime.format
        self.max_batch_size, self.max_delay = max_batch_size, max_delay_ms / 1000
        self.batchable = all(spec.shape and spec.shape[0] == -1 for spec in runtime.signature.inputs)
        self.runtime_calls = 0
        self.requests = 0
        self.in_hand = 0  # requests the server is reading, or waiting on an answer for
        self._queue: "queue.Queue[_Pending]" = queue.Queue()
        self._lock = threading.Lock()
        if self.batchable:
            threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    @contextlib.contextmanager
    def arriving(self):
        """The server holds a request that may come here: worth waiting for while a batch gathers."""
        with self._lock:
            self.in_hand += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_hand -= 1

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            self.requests += 1
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        if not self.batchable or rows >= self.max_batch_size:
            with self._lock:
                self.runtime_calls += 1
            return self.runtime.run(inputs, output_names)
        pending = _Pending(inputs, tuple(output_names), rows)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.max_delay
            while rows < self.max_batch_size and (len(batch) < self.in_hand or not self._queue.empty()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                batch.append(item)
                rows += item.rows
            self._run_groups(batch)

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
            inputs = {name: np.concatenate([item.inputs[name] for item in items]) if len(items) > 1 else items[0].inputs[name]
                      for name in names}
            with self._lock:
                self.runtime_calls += 1
            results = self.runtime.run(inputs, list(items[0].outputs))
            total = sum(item.rows for item in items)
            if len(items) > 1 and any(array.ndim == 0 or array.shape[0] != total for array in results.values()):
                for item in items:  # an output without the batch dimension cannot be split: run them one by one
                    self._run([item])
                return
            start = 0
            for item in items:
                item.result = {name: array[start:start + item.rows] for name, array in results.items()}
                start += item.rows
        except Exception as error:  # every caller of the batch hears of it
            for item in items:
                item.error = error
        for item in items:
            item.done.set()
