"""Lambda entry point, `lambda_handlers.handler.handler`.

The model is fetched and loaded at import, in Lambda's init phase, so the first
request does not pay for it and provisioned concurrency or SnapStart keep it warm.
"""

import os

from .function import ModelFunction

handler = ModelFunction(os.environ)
