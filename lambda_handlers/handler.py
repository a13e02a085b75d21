"""Lambda entry point, `lambda_handlers.handler.handler`.

The model is fetched and loaded at import, in Lambda's init phase, so the first
request does not pay for it and provisioned concurrency or SnapStart keep it warm.
"""

import os

# Imported before the rest of the package on purpose: measured here (python 3.11,
# numpy 2.4), init is about 40 ms faster than when the package pulls numpy in
# halfway through; the cause is not pinned down. bench/ tracks it as "cold init".
import numpy  # noqa: F401

from .function import ModelFunction

handler = ModelFunction(os.environ)
