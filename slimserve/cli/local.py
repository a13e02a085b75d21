"""The local stack's commands: serve, and demo, which serves, calls with real clients and stops."""

import os
import sys

from slimserve.config import load_config

from .common import add_config


def add_commands(commands) -> None:
    serve = commands.add_parser("serve", help="serve every model of the config on one port, as the deployed API does")
    add_config(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("SLIMSERVE_API_KEY"),
        help="the API key clients send as x-api-key (default: $SLIMSERVE_API_KEY, else a new one each start)",
    )
    serve.add_argument(
        "--s3-port",
        type=int,
        help="the local S3's port (default: any free one; the registry commands find it in build/local/stack.json)",
    )
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="start the local stack, call it with real clients, then stop it")
    add_config(demo)
    demo.set_defaults(run=_demo)


def _serve(args) -> int:
    import signal

    from slimserve.local.stack import LocalStack

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (a process manager, a test) stops everything as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    config = load_config(args.config)
    with LocalStack(
        config,
        args.host,
        args.port,
        log=lambda line: print(line, flush=True),
        s3_port=args.s3_port,
        api_key=args.api_key,
    ) as stack:
        gateway = stack.gateway
        print(f"slimserve serving {', '.join(gateway.routes)} at {gateway.url}", flush=True)
        if any(route.api_key_required for route in gateway.routes.values()):
            print(f"API key (send as x-api-key): {gateway.api_key}", flush=True)
        print("ready; Ctrl-C stops everything", flush=True)
        try:
            stack.serve_forever()
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(load_config(args.config), sys.stdout)
