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
    import threading

    from slimserve.local.stack import LocalStack

    # while the stack starts, SIGTERM interrupts it as Ctrl-C does, and what started is closed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
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

        def stop(signum, frame):
            """Ctrl-C or SIGTERM (a process manager, a test): the gateway stops taking requests and the stack closes
            in order. Not an exception raised wherever the main thread is, which can leave a lock held; a second
            signal is one, to stop at once."""
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            threading.Thread(target=gateway.shutdown, daemon=True).start()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        stack.serve_forever()
        print("stopping", flush=True)
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(load_config(args.config), sys.stdout)
