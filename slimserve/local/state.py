"""Where a running local stack says where it is: a small JSON file in the project's build/local, written once the
stack is up and removed when it stops, so the registry commands find this project's S3 on whichever port it took."""

import json
import os
from pathlib import Path

STATE_FILE = "stack.json"


def write_state(work_dir: Path, gateway: str, s3_endpoint: str, bucket: str) -> Path:
    path = work_dir / STATE_FILE
    path.write_text(json.dumps({"pid": os.getpid(), "gateway": gateway, "s3_endpoint": s3_endpoint, "bucket": bucket}))
    return path


def running_state(work_dir: Path) -> dict | None:
    """The state of the stack running from `work_dir`; None if none is (no file, or its process has gone)."""
    try:
        state = json.loads((work_dir / STATE_FILE).read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state
