"""The `slimserve` command line."""

import argparse
import sys
from pathlib import Path

from .config import DEFAULT_CONFIG, ConfigError, load_config


def _examples(args) -> int:
    from .examples import build_all

    for model in build_all(Path(args.out)):
        print(f"{model.name}: wrote {model.path} ({model.path.stat().st_size} bytes), "
              f"held-out accuracy {model.accuracy:.3f} on {len(model.test_labels)} samples")
    return 0


def _check(args) -> int:
    config = load_config(args.config)
    print(f"{config.path}: app {config.name!r}, {len(config.models)} models")
    for model in config.models:
        where = model.sagemaker.instance_type if model.sagemaker else f"{model.memory_mb} MB {model.architecture}"
        print(f"  {model.name}: {model.format} {model.artifact} -> {model.target} ({where}), auth {model.auth}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(load_config(args.config), sys.stdout)


def _layer(args) -> int:
    from layers.builder import LayerBuildError, build_layer

    try:
        layer = build_layer(args.runtime, args.python, args.arch, out=Path(args.out), log=print)
    except LayerBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{layer.runtime} layer for python{layer.python_version} {layer.architecture}"
          f"{' (cached)' if layer.cached else ''}: {layer.path}")
    print(f"  {layer.slim_bytes / 2**20:.1f} MiB unzipped (naive install {layer.naive_bytes / 2**20:.1f} MiB), "
          f"{layer.files} files; bytecode: {layer.pyc}; {layer.stripped}; smoke test: {layer.smoke}")
    return 0


def _synth(args) -> int:
    """The CDK app through `app.py`; prints what each stack holds."""
    import collections
    import json
    import os
    import subprocess

    load_config(args.config)  # a config error is reported here, in one line, before CDK starts
    out = Path(args.out)
    subprocess.run([sys.executable, "app.py", args.config], check=True, env={**os.environ, "CDK_OUTDIR": str(out)})
    for template in sorted(out.glob("*.template.json")):
        resources = json.loads(template.read_text()).get("Resources", {})
        counts = collections.Counter(resource["Type"] for resource in resources.values())
        print(f"{template.name.removesuffix('.template.json')}: {len(resources)} resources")
        for kind, count in sorted(counts.items()):
            print(f"  {count} x {kind}")
    return 0


def _serve(args) -> int:
    from .local import LocalStack

    config = load_config(args.config)
    with LocalStack(config, args.host, args.port, log=lambda line: print(line, flush=True)) as stack:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimserve", description="Serve ONNX and TFLite models on AWS Lambda and SageMaker.")
    commands = parser.add_subparsers(dest="command", required=True)

    examples = commands.add_parser("examples", help="train the example models and write them")
    examples.add_argument("--out", default="examples/models", help="folder for the model files")
    examples.set_defaults(run=_examples)

    for name, run, text in [
        ("check", _check, "validate the config and list its models"),
        ("demo", _demo, "run the config's Lambda models through the handler on a local S3"),
    ]:
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
        command.set_defaults(run=run)

    layer = commands.add_parser("layer", help="build (or reuse) a slim runtime layer and print its size report")
    layer.add_argument("--runtime", default="onnx", help="onnx, tflite, tflite-py311 or lambda-runtime")
    layer.add_argument("--python", default="3.12", help="the Lambda Python version")
    layer.add_argument("--arch", default="x86_64", help="x86_64 or arm64")
    layer.add_argument("--out", default="build/layers", help="where layers are built (default: %(default)s)")
    layer.set_defaults(run=_layer)

    synth = commands.add_parser("synth", help="synthesize the CloudFormation templates and count their resources")
    synth.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    synth.add_argument("--out", default="cdk.out", help="cloud assembly folder (default: %(default)s)")
    synth.set_defaults(run=_synth)

    serve = commands.add_parser("serve", help="serve every model of the config on one port, as the deployed API does")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(run=_serve)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
