"""One local stack per project, and where it says it is.

A stack holds an exclusive lock on its project's build/local for as long as it runs: one store has one writer, and a
second `serve` of the project is refused instead of starting a second store that overwrites the first. The kernel
releases the lock when the process ends, however it ends, so a killed stack never leaves the project locked. Once up,
the stack writes a small JSON file saying where its gateway and S3 are, so the registry commands find this project's
S3 on whichever port it took.
"""

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from slimserve.errors import UserError

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"


def _held(work_dir: Path) -> bool:
    """Whether a stack holds the project's lock (this process's own included: flock locks are per open file)."""
    try:
        with open(work_dir / LOCK_FILE) as probe:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no stack ever ran here
        return False
    return False


@contextlib.contextmanager
def claim_project(work_dir: Path, config: Path) -> Iterator[None]:
    """The project's lock, held until the stack stops; refused in one line naming the stack that holds it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            state = running_state(work_dir)
            where = f"serving at {state['gateway']}" if state else "still starting"
            raise UserError(
                f"{config}: its local stack is already running (process {holder}, {where}): one stack per project "
                "keeps one store. Use that one (register, alias and versions find it themselves), or stop it first"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        (work_dir / STATE_FILE).unlink(missing_ok=True)  # a killed stack's: not where this one will be
        try:
            yield
        finally:
            (work_dir / STATE_FILE).unlink(missing_ok=True)


def write_state(work_dir: Path, gateway: str, s3_endpoint: str, bucket: str) -> None:
    """Written whole, then renamed into place: a reader never sees half of it."""
    partial = work_dir / f".{STATE_FILE}.partial"
    partial.write_text(
        json.dumps({"pid": os.getpid(), "gateway": gateway, "s3_endpoint": s3_endpoint, "bucket": bucket})
    )
    os.replace(partial, work_dir / STATE_FILE)


def running_state(work_dir: Path) -> dict | None:
    """The state of the stack running from `work_dir`; None while none is up (no stack holds the lock, or it is still
    starting)."""
    if not _held(work_dir):
        return None
    try:
        return json.loads((work_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
