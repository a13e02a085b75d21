"""The few kinds of inference error, each tied to its HTTP status in one place.

The Lambda handler, the SageMaker server and the local gateway all map these the
same way, so a client sees the same status for the same mistake wherever the
model runs.
"""


class InferenceError(Exception):
    status = 500
    kind = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(InferenceError):
    status = 400
    kind = "invalid_input"


class NotFound(InferenceError):
    status = 404
    kind = "not_found"


class MethodNotAllowed(InferenceError):
    status = 405
    kind = "method_not_allowed"


class PayloadTooLarge(InferenceError):
    status = 413
    kind = "payload_too_large"

    @classmethod
    def body(cls, size: int | str, limit: int) -> "PayloadTooLarge":
        """A request body past its limit, in the one message every front door gives."""
        return cls(f"request body is {size} bytes; the limit is {limit}")


class ModelNotReady(InferenceError):
    status = 503
    kind = "model_not_ready"


class RuntimeFailure(InferenceError):
    """The runtime itself failed on input that passed validation."""

    status = 500
    kind = "runtime_error"
