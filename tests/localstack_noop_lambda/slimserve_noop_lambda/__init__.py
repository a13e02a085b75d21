"""A LocalStack Lambda runtime executor that needs no Docker: functions become Active, invoking them fails.

The deploy test checks what CloudFormation creates from slimserve's templates; running the functions is the
local stack's job (`slimserve serve`), not LocalStack's.
"""

from localstack.services.lambda_.invocation.plugins import RuntimeExecutorPlugin

NOT_RUN = "Lambda functions are not run: LocalStack without Docker (slimserve's noop executor)"


class NoopRuntimeExecutorPlugin(RuntimeExecutorPlugin):
    name = "noop"

    def load(self, *args, **kwargs):
        from localstack.services.lambda_.invocation.runtime_executor import (
            RuntimeExecutor,
        )

        class NoopRuntimeExecutor(RuntimeExecutor):
            def start(self, env_vars):
                raise RuntimeError(NOT_RUN)

            def invoke(self, payload):
                raise RuntimeError(NOT_RUN)

            def stop(self):
                pass

            def get_address(self):
                return "127.0.0.1"

            def get_endpoint_from_executor(self):
                return "127.0.0.1"

            def get_runtime_endpoint(self):
                return "http://127.0.0.1"

            def get_logs(self):
                return ""

            @classmethod
            def prepare_version(cls, function_version):
                pass

            @classmethod
            def cleanup_version(cls, function_version):
                pass

            @classmethod
            def validate_environment(cls):
                return True

        return NoopRuntimeExecutor
