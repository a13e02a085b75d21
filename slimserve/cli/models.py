"""Model tools: convert to ONNX or TFLite, optimize, and the example models."""

from pathlib import Path

from slimserve.errors import UserError
from slimserve.modeltools.convert import DEFAULT_MAX_LENGTH, DEFAULT_TOLERANCE
from slimserve.modeltools.huggingface import CLASSIFICATION_TASKS, IMAGE_CLASSIFICATION, TASKS
from slimserve.modeltools.optimize import DEFAULT_MIN_AGREEMENT, LEVELS
from slimserve.modeltools.optimize import DEFAULT_TOLERANCE as DEFAULT_OPTIMIZE_TOLERANCE


def add_commands(commands) -> None:
    examples = commands.add_parser("examples", help="train the example models and write them")
    examples.add_argument("--out", default="examples/models", help="folder for the model files")
    examples.set_defaults(run=_examples)

    convert = commands.add_parser(
        "convert",
        help="a scikit-learn, XGBoost, LightGBM, CatBoost or PyTorch model to ONNX, or Keras to TFLite, "
        "checked on samples first",
    )
    convert.add_argument(
        "model",
        help="scikit-learn, XGBoost, LightGBM or CatBoost (.joblib, .pkl), XGBoost (.json, .ubj), LightGBM (.txt), "
        "CatBoost (.cbm), PyTorch module (.pt, .pth, saved whole), Keras (.keras, .h5; needs the tensorflow extra), "
        "an .onnx to add processing to, or a Hugging Face checkpoint folder (with --task; needs the huggingface extra)",
    )
    convert.add_argument(
        "--task",
        choices=TASKS,
        help="what a Hugging Face checkpoint's model is for: it takes text (with its tokenizer.json in the graph) or "
        "images (with its preprocessor_config.json's size, mean and std), and classifiers name their classes",
    )
    convert.add_argument(
        "--samples",
        required=True,
        help="representative inputs: .npy (numbers or strings), .npz (named arrays) or .csv (a header of column "
        "names); for a model that takes images, a JPEG or PNG image or a folder of them",
    )
    convert.add_argument("--out", required=True, help="the .onnx file to write (.tflite for Keras)")
    convert.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest output difference accepted, relative to the value where it is past 1 (default: %(default)s)",
    )
    convert.add_argument(
        "--external-data",
        action="store_true",
        help="PyTorch: write the weights to <out>.data beside the model (they always are past 1.5 GiB)",
    )
    convert.add_argument(
        "--labels",
        help="a text file of class names, one per line in the order of the model's classes: the outputs add "
        "class_name and class_score",
    )
    convert.add_argument(
        "--top-k", type=int, default=1, help="with --labels: how many of the best classes to name (default: 1)"
    )
    convert.add_argument(
        "--tokenizer",
        help="a Hugging Face tokenizer.json (WordPiece of BERT's family, or byte-level BPE of GPT-2's): the model "
        "takes text, tokenized in the graph",
    )
    convert.add_argument(
        "--max-length",
        type=int,
        help=f"with --tokenizer or a text checkpoint: tokens kept of each text (default: {DEFAULT_MAX_LENGTH}, or "
        "the checkpoint's positions where fewer, or its sentence-transformers max_seq_length)",
    )
    convert.add_argument(
        "--image",
        metavar="HxW",
        help="the model takes encoded JPEG or PNG images, decoded to RGB, resized to HxW and normalized in the graph; "
        "--samples is then an image or a folder of them",
    )
    convert.add_argument(
        "--mean",
        metavar="R,G,B",
        help="with --image or an image checkpoint: subtracted from pixels scaled to [0, 1] (default: the "
        "checkpoint processor's image_mean, else 0,0,0)",
    )
    convert.add_argument(
        "--std",
        metavar="R,G,B",
        help="with --image or an image checkpoint: what pixels are divided by after (default: the checkpoint "
        "processor's image_std, else 1,1,1)",
    )
    convert.set_defaults(run=_convert)

    optimize = commands.add_parser(
        "optimize",
        help="graph-optimize, int8- or fp16-quantize an ONNX model (or a Keras model to TFLite), gated on its answers "
        "and its speed",
    )
    optimize.add_argument(
        "model", help="the .onnx model, or a Keras model (.keras, .h5; int8 or fp16; needs the tensorflow extra)"
    )
    optimize.add_argument(
        "--level",
        required=True,
        choices=LEVELS,
        help="graph: ONNX Runtime's fusions; int8: dynamic (weights only); int8-static: weights and activations, "
        "calibrated on the samples; fp16: half-precision weights; auto: each of these, writing the fastest that passes",
    )
    optimize.add_argument(
        "--samples", required=True, help=".npy (one input) or .npz (named inputs) of representative inputs"
    )
    optimize.add_argument(
        "--targets",
        help="a .npy of the samples' true labels, one per sample: the report adds accuracy, and the gate "
        "refuses a result that loses more than --min-agreement allows",
    )
    optimize.add_argument(
        "--tolerance",
        type=float,
        help="largest absolute output difference accepted (default: for a classifier, none: its classes are gated by "
        f"--min-agreement; for other models, {DEFAULT_OPTIMIZE_TOLERANCE})",
    )
    optimize.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        help="least share of the samples whose class must stay the original's (default: %(default)s)",
    )
    optimize.add_argument(
        "--force", action="store_true", help="write the result even if it is slower, or larger and no faster"
    )
    optimize.add_argument(
        "--out", help="where to write the result (default: MODEL with .LEVEL.onnx, .LEVEL.tflite for Keras)"
    )
    optimize.set_defaults(run=_optimize)


def _examples(args) -> int:
    from slimserve.modeltools.examples import build_all

    for model in build_all(Path(args.out)):
        print(
            f"{model.name}: wrote {model.path} ({model.path.stat().st_size} bytes), "
            f"held-out accuracy {model.accuracy:.3f} on {len(model.test_labels)} samples"
        )
    return 0


def _convert(args) -> int:
    from slimserve.modeltools.convert import Processing, convert_file

    if args.top_k != 1 and not args.labels and args.task not in CLASSIFICATION_TASKS:
        raise UserError("--top-k: names the best classes of --labels (or of a classifier checkpoint), none is given")
    for option, value in (("--mean", args.mean), ("--std", args.std)):
        if value is not None and not args.image and args.task != IMAGE_CLASSIFICATION:
            raise UserError(f"{option}: normalizes the images of --image (or of an image checkpoint), none is given")
    labels, tokenizer = (Path(path) if path else None for path in (args.labels, args.tokenizer))
    processing = Processing(labels, args.top_k, tokenizer, args.max_length, args.image, args.mean, args.std)
    source, samples, out = Path(args.model), Path(args.samples), Path(args.out)
    result = convert_file(source, samples, out, args.tolerance, args.external_data, processing, args.task)
    agreement = f", labels agree on {result.label_agreement:.2%}" if result.label_agreement is not None else ""
    data = f" (weights in {', '.join(result.data_files)})" if result.data_files else ""
    print(
        f"wrote {result.path}{data}: checked on {result.samples} samples, max |diff| {result.max_abs_diff:.3g}"
        f"{agreement}"
    )
    for note in result.notes:
        print(f"  {note}")
    return 0


def _optimize(args) -> int:
    from slimserve.modeltools.convert import KERAS_SUFFIXES
    from slimserve.modeltools.optimize import optimize

    model = Path(args.model)
    suffix = ".tflite" if model.suffix in KERAS_SUFFIXES else ".onnx"
    out = Path(args.out) if args.out else model.with_suffix(f".{args.level}{suffix}")
    targets = Path(args.targets) if args.targets else None
    report = optimize(
        model, args.level, Path(args.samples), args.tolerance, out, args.force, args.min_agreement, targets
    )
    print(report.table())
    for refused in (m for m in report.candidates if m.refused):
        print(f"  {refused.label}: {'; '.join(refused.refused)}")
    chosen = report.optimized
    classifier = chosen.top1_agreement is not None
    agreement = f", the original's class for {chosen.top1_agreement:.2%} of the samples" if classifier else ""
    tolerance = report.gate.value_tolerance(classifier)
    within = (
        " of its scores (not gated: --tolerance holds them)"
        if tolerance is None
        else (f" within the tolerance {tolerance:g}")
    )
    print(
        f"wrote {report.written}: {chosen.label}, {chosen.size / report.original.size:.0%} of the original's size, "
        f"{chosen.median_ms / report.original.median_ms:.2f}x its median latency (of {report.runs} runs each)"
        f"{agreement}, max |diff| {chosen.max_abs_diff:.3g}{within}"
    )
    return 0
