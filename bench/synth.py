"""Synth time as models are added, and whether an unchanged second synth rebuilds any layer."""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slimserve.config import API_RESOURCES_FOR_MODELS, API_RESOURCES_PER_MODEL

ROOT = Path(__file__).resolve().parent.parent
PER_MODEL_TARGET_S = 0.3
# up to the most Lambda models one app's REST API holds (slimserve.config.API_RESOURCES_FOR_MODELS)
MODEL_COUNTS = (1, 10, API_RESOURCES_FOR_MODELS // API_RESOURCES_PER_MODEL["lambda"])


def _config(folder: Path, models: int) -> Path:
    shutil.copy(ROOT / "examples" / "models" / "iris.onnx", folder / "iris.onnx")
    shutil.copy(ROOT / "examples" / "models" / "digits.tflite", folder / "digits.tflite")
    lines = ['[app]\nname = "synth-bench"\n']
    for index in range(models):
        model_format, artifact = ("onnx", "iris.onnx") if index % 2 == 0 else ("tflite", "digits.tflite")
        lines.append(f'[models.m{index}]\nformat = "{model_format}"\nartifact = "{artifact}"\n')
    path = folder / f"slimserve-{models}.toml"
    path.write_text("\n".join(lines))
    return path


def _synth(config: Path, out: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "app.py", str(config)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "CDK_OUTDIR": str(out)})
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"synth of {config.name} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stderr


def synth_times(runs: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        medians = {}
        for models in MODEL_COUNTS:
            config = _config(folder, models)
            medians[models] = statistics.median(_synth(config, folder / f"out-{models}-{run}")[0] for run in range(runs))
        first, last = MODEL_COUNTS[0], MODEL_COUNTS[-1]
        per_model = (medians[last] - medians[first]) / (last - first)
        rows.append((f"synth: cost per added model ({first} -> {last} models)", per_model, f"<= {PER_MODEL_TARGET_S} s",
                     ", ".join(f"{n} models {medians[n]:.1f} s" for n in medians), per_model <= PER_MODEL_TARGET_S, "s"))
        out = folder / "again"
        config = _config(folder, 10)
        first = _synth(config, out)[1].count("Bundling asset")
        second_s, second_log = _synth(config, out)
        rebuilt = second_log.count("Bundling asset")
        rows.append(("synth again, nothing changed: assets bundled", rebuilt, "0",
                     f"first synth bundled {first}; second took {second_s:.1f} s", rebuilt == 0, ""))
    return rows
