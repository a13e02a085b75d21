"""Hugging Face checkpoints to ONNX: a local folder (config.json, the weights, tokenizer.json or
preprocessor_config.json), loaded by transformers from that folder alone, never from the hub, for `--task`.

The model is wrapped in a module that takes the task's tensors and answers its one output, exported by
torch.onnx.export (batch dynamic, and the sequence for text) and checked against transformers' own answers on the
samples. Then the checkpoint's own processing goes into the graph as `--tokenizer` and `--image` put it (the text
tasks take text, the image task JPEG or PNG bytes), and its id2label names the classes; the user's own options win.
optimum's exporter is not used: its ONNX package (optimum-onnx 0.1.0) needs transformers < 4.58 and optimum 2.1.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from slimserve.modeltools.convert import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TOLERANCE,
    Conversion,
    ConvertError,
    Processing,
    check_and_save_onnx,
    existing_onnx,
    export_torch,
    require,
)

TEXT_CLASSIFICATION = "text-classification"
SENTENCE_EMBEDDINGS = "sentence-embeddings"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (TEXT_CLASSIFICATION, SENTENCE_EMBEDDINGS, IMAGE_CLASSIFICATION)
# What each task's graph answers (beside class_name and class_score, for the classifiers).
TASK_OUTPUTS = {
    TEXT_CLASSIFICATION: "logits",
    SENTENCE_EMBEDDINGS: "sentence_embedding",
    IMAGE_CLASSIFICATION: "logits",
}
# transformers' class that loads each task's model from the checkpoint.
TASK_MODELS = {
    TEXT_CLASSIFICATION: "AutoModelForSequenceClassification",
    SENTENCE_EMBEDDINGS: "AutoModel",
    IMAGE_CLASSIFICATION: "AutoModelForImageClassification",
}
HUGGINGFACE_EXTRA = "'slimserve[huggingface]'"
# Pixels as transformers' image processors rescale them (do_rescale), and the resampling the graph's Resize matches.
RESCALE_FACTOR = 1 / 255
PILLOW_BILINEAR = 2


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder}: a folder, but not a Hugging Face checkpoint: expected config.json in it")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConvertError(f"{path}: not a Hugging Face config: {error}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConvertError(f"{path}: not a Hugging Face config: expected an object with a model_type")
    return config


def checkpoint_processing(folder: Path, task: str | None, config: dict, processing: Processing) -> Processing:
    """The processing the checkpoint brings for `task` (its tokenizer.json, its image preprocessing, its class
    names), each replaced by the user's own option where one is given."""
    if task not in TASKS:
        found = f"found {task!r}" if task else "none is given"
        raise ConvertError(
            f"--task: {folder} is a Hugging Face checkpoint: expected one of {', '.join(TASKS)}; {found}"
        )
    if task == IMAGE_CLASSIFICATION:
        if processing.tokenizer:
            raise ConvertError(f"--tokenizer: the task {task} takes images, not text")
        processing = _image_processing(folder, processing)
    else:
        if processing.image:
            raise ConvertError(f"--image: the task {task} takes text, not images")
        processing = _text_processing(folder, config, processing)
    if task == SENTENCE_EMBEDDINGS:
        if processing.labels:
            raise ConvertError(f"--labels: the task {task} answers embeddings, which have no classes to name")
        return processing
    if processing.labels is None:
        processing = dataclasses.replace(processing, class_names=_class_names(folder, config))
    return processing


def _text_processing(folder: Path, config: dict, processing: Processing) -> Processing:
    tokenizer = processing.tokenizer or folder / "tokenizer.json"
    if not Path(tokenizer).is_file():
        raise ConvertError(f"{folder}: has no tokenizer.json: give the model's own with --tokenizer")
    positions = config.get("max_position_embeddings")
    limit = int(positions) if isinstance(positions, int) and positions > 0 else None
    max_length = processing.max_length or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit is not None and max_length > limit:
        raise ConvertError(
            f"--max-length {max_length}: {folder} takes at most {limit} tokens (max_position_embeddings)"
        )
    return dataclasses.replace(processing, tokenizer=Path(tokenizer), max_length=max_length)


def _image_processing(folder: Path, processing: Processing) -> Processing:
    """--image, --mean and --std from preprocessor_config.json where not given; a processor the graph cannot
    reproduce (a crop, a size by the shortest edge) needs --image given."""
    path = folder / "preprocessor_config.json"
    if processing.image:
        return processing
    if not path.is_file():
        raise ConvertError(f"{folder}: has no preprocessor_config.json: give the model's image size with --image HxW")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConvertError(f"{path}: not an image processor's config: {error}") from None
    size = spec.get("size") if isinstance(spec, dict) else None
    if not isinstance(size, dict) or not {"height", "width"} <= set(size) or spec.get("do_center_crop"):
        raise ConvertError(
            f"{path}: its processor resizes by {size!r}{' and crops' if spec.get('do_center_crop') else ''}; the "
            "graph resizes to one size: give it with --image HxW (and --mean, --std)"
        )
    if spec.get("do_rescale", True) and not np.isclose(spec.get("rescale_factor", RESCALE_FACTOR), RESCALE_FACTOR):
        raise ConvertError(f"{path}: rescale_factor {spec['rescale_factor']}: the graph scales pixels by 1/255")
    mean, std = processing.mean, processing.std
    if spec.get("do_normalize", True):
        mean = mean or ",".join(str(value) for value in spec.get("image_mean", (0, 0, 0)))
        std = std or ",".join(str(value) for value in spec.get("image_std", (1, 1, 1)))
    return dataclasses.replace(processing, image=f"{size['height']}x{size['width']}", mean=mean, std=std)


def _class_names(folder: Path, config: dict) -> tuple[str, ...]:
    id2label = config.get("id2label") or {}
    try:
        names = {int(index): str(name) for index, name in id2label.items()}
    except (AttributeError, ValueError):
        names = {}
    if not names or sorted(names) != list(range(len(names))):
        raise ConvertError(
            f"{folder}/config.json: id2label does not name the classes 0 to n-1: give their names with --labels"
        )
    return tuple(names[index] for index in range(len(names)))


def convert_checkpoint(
    folder: Path,
    task: str | None,
    samples_path: Path,
    out: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    processing: Processing = Processing(),
) -> Conversion:
    """The checkpoint in `folder` for `task`, exported, checked against transformers on the samples, and composed
    with its processing (see the module's docstring)."""
    from slimserve.modeltools.processing import read_images
    from slimserve.modeltools.samples import read_samples

    config = read_config(folder)
    processing = checkpoint_processing(folder, task, config, processing)
    if out.suffix != ".onnx":
        raise ConvertError(
            f"{out}: a Hugging Face checkpoint converts to ONNX: expected an output path ending in .onnx"
        )
    image = processing.image_input()
    samples = read_images(samples_path) if image else read_samples(samples_path)
    torch = require("torch", folder, "converting a Hugging Face checkpoint", HUGGINGFACE_EXTRA)
    transformers = require("transformers", folder, "converting a Hugging Face checkpoint", HUGGINGFACE_EXTRA)
    model = _load(transformers, folder, task)
    if image:
        feeds = {"pixel_values": image.pixels(samples, "NCHW")}
        module = _task_module(torch, model, task, list(feeds))
    else:
        taken = _token_inputs(model)
        tokens = processing.text_tokenizer().encode(samples.matrix())
        feeds = {name: ids for name, ids in tokens.items() if name in taken}
        if task == SENTENCE_EMBEDDINGS and "attention_mask" not in feeds:
            raise ConvertError(f"{folder}: its model takes no attention_mask, which mean pooling needs")
        pooling = _pooling(folder) if task == SENTENCE_EMBEDDINGS else ()
        module = _task_module(torch, model, task, list(feeds), *pooling)
    with tempfile.TemporaryDirectory() as scratch:  # the model's ONNX, checked against it, then processed
        exported = Path(scratch) / out.name
        sequence_inputs = () if image else tuple(feeds)
        export_torch(module, feeds, (TASK_OUTPUTS[task],), exported, tolerance, sequence_inputs=sequence_inputs)
        result = existing_onnx(exported, samples, processing)
        return check_and_save_onnx(processing.apply(result, samples, folder), out, tolerance)


def _load(transformers, folder: Path, task: str):
    from importlib import metadata

    os.environ["HF_HUB_OFFLINE"] = "1"  # the folder is the whole checkpoint: nothing is looked up on the hub
    loader = getattr(transformers, TASK_MODELS[task])
    try:
        return loader.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as error:  # transformers raises many kinds for a checkpoint it cannot read
        reason = " ".join(str(error).split())
        raise ConvertError(
            f"{folder}: transformers {metadata.version('transformers')} cannot load it for {task} "
            f"({TASK_MODELS[task]}): {reason[:300]}"
        ) from None


def _token_inputs(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _pooling(folder: Path) -> tuple[str, bool]:
    """How a sentence-transformers checkpoint pools its tokens (1_Pooling/config.json: the mean by default, or the
    first token) and whether it normalizes (a Normalize module in modules.json)."""
    pooling = "mean"
    modules_path = folder / "modules.json"
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8")) if modules_path.is_file() else []
        config_path = folder / "1_Pooling" / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConvertError(f"{folder}: cannot read its sentence-transformers modules: {error}") from None
    types = [str(module.get("type", "")) for module in modules if isinstance(module, dict)]
    normalize = any(kind.endswith(".Normalize") for kind in types)
    modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
    if modes == ["pooling_mode_cls_token"]:
        pooling = "cls"
    elif modes not in ([], ["pooling_mode_mean_tokens"]):
        raise ConvertError(
            f"{folder}/1_Pooling/config.json: pools by {', '.join(modes)}; the graph pools by the mean of the tokens "
            "or the first token (pooling_mode_mean_tokens, pooling_mode_cls_token)"
        )
    return pooling, normalize


def _task_module(torch, model, task: str, names: list[str], pooling: str = "mean", normalize: bool = False):
    """`model` behind positional tensors (as torch.onnx.export passes them), answering the task's one output:
    the logits, or the pooled (and perhaps normalized) embedding of the tokens."""

    class TaskModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            outputs = self.model(**dict(zip(names, tensors)))
            if task != SENTENCE_EMBEDDINGS:
                return outputs.logits
            hidden = outputs.last_hidden_state
            if pooling == "cls":
                embedding = hidden[:, 0]
            else:
                mask = tensors[names.index("attention_mask")].unsqueeze(-1).to(hidden.dtype)
                embedding = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    return TaskModule()
