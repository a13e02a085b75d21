"""`python -m bench`: measured values beside their targets and same-run baselines.

Timings are medians over interleaved rounds; compare ratios, not absolute numbers,
across machines.
"""

import argparse
import platform
import sys

from . import handler, large_model, local_stack, optimize, project, serving, synth
from .table import print_table


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for warm timings")
    parser.add_argument("--cold-runs", type=int, default=15, help="fresh processes per cold-start contender")
    parser.add_argument("--large-runs", type=int, default=3, help="fresh processes per way of loading the large model")
    parser.add_argument("--runner-cold-runs", type=int, default=7, help="fresh workers and floor processes through the runner")
    parser.add_argument("--synth-runs", type=int, default=3, help="synths per model count")
    parser.add_argument("--warm-requests", type=int, default=500, help="requests through the gateway for the warm overhead")
    parser.add_argument("--image-requests", type=int, default=30, help="requests of each kind for one image through the local stack")
    parser.add_argument("--project-runs", type=int, default=3, help="new projects from the installed wheel")
    parser.add_argument("--serving-seconds", type=float, default=10, help="each timed run of the serving program and its peer")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}", file=sys.stderr)
    rows = (handler.warm_overhead(args.rounds) + handler.cold_init(args.cold_runs) + large_model.load_peaks(args.large_runs)
            + local_stack.layer_sizes() + local_stack.extensions_cold_init(args.cold_runs)
            + local_stack.cold_and_warm(args.runner_cold_runs, args.warm_requests)
            + local_stack.image_requests(args.image_requests) + synth.synth_times(args.synth_runs)
            + serving.serving_throughput(args.serving_seconds) + project.project_times(args.project_runs)
            + optimize.levels_by_shape())
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
