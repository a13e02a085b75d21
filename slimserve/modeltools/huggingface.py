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
    first_sentence,
    require,
)

TEXT_CLASSIFICATION = "text-classification"
SENTENCE_EMBEDDINGS = "sentence-embeddings"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (TEXT_CLASSIFICATION, SENTENCE_EMBEDDINGS, IMAGE_CLASSIFICATION)
CLASSIFICATION_TASKS = (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION)
# Models whose positions count from pad_token_id + 1 (RoBERTa's family): that many fewer tokens fit.
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text")
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
PILLOW_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


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
    """The processing the checkpoint brings for `task` (its tokenizer.json, its image preprocessing), each replaced
    by the user's own option where one is given; the class names come from the model once it is loaded."""
    if task not in TASKS:
        found = f"found {task!r}" if task else "none is given"
        raise ConvertError(
            f"--task: {folder} is a Hugging Face checkpoint: expected one of {', '.join(TASKS)}; {found}"
        )
    takes_images = task == IMAGE_CLASSIFICATION
    # a text model's config has a vocabulary; an image model's, channels or an image size
    text_model = "vocab_size" in config or "text_config" in config
    image_model = "num_channels" in config or "image_size" in config or "vision_config" in config
    if (takes_images and text_model and not image_model) or (not takes_images and image_model and not text_model):
        raise ConvertError(
            f"--task {task}: {folder} holds a {config['model_type']} model, which takes "
            f"{'text' if text_model else 'images'}; {task} is for one that takes {'images' if takes_images else 'text'}"
        )
    if task == SENTENCE_EMBEDDINGS and processing.labels:
        raise ConvertError(f"--labels: the task {task} answers embeddings, which have no classes to name")
    if takes_images:
        if processing.tokenizer:
            raise ConvertError(f"--tokenizer: the task {task} takes images, not text")
        return _image_processing(folder, processing)
    if processing.image:
        raise ConvertError(f"--image: the task {task} takes text, not images")
    return _text_processing(folder, task, config, processing)


def _text_processing(folder: Path, task: str, config: dict, processing: Processing) -> Processing:
    """The checkpoint's tokenizer.json, keeping at most what the model has positions for (and, for embeddings,
    sentence-transformers' max_seq_length)."""
    tokenizer = processing.tokenizer or folder / "tokenizer.json"
    if not Path(tokenizer).is_file():
        raise ConvertError(f"{folder}: has no tokenizer.json: give the model's own with --tokenizer")
    positions = config.get("max_position_embeddings") or config.get("n_positions")  # GPT-2 calls it n_positions
    if config.get("model_type") in POSITIONS_AFTER_PADDING and isinstance(positions, int):
        positions -= int(config.get("pad_token_id") or 0) + 1
    limit = int(positions) if isinstance(positions, int) and positions > 0 else None
    default = min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if task == SENTENCE_EMBEDDINGS:
        default = int(_read_json(folder / "sentence_bert_config.json", {}).get("max_seq_length") or default)
    max_length = processing.max_length or default
    if limit is not None and max_length > limit:
        raise ConvertError(f"--max-length {max_length}: {folder} takes at most {limit} tokens (its positions)")
    return dataclasses.replace(processing, tokenizer=Path(tokenizer), max_length=max_length)


def _image_processing(folder: Path, processing: Processing) -> Processing:
    """The size, mean and std of preprocessor_config.json, each where not given. A processor the graph cannot
    reproduce (a size by the shortest edge, a crop, a resampling other than bilinear) needs --image given; pixels
    are always scaled by 1/255."""
    path = folder / "preprocessor_config.json"
    if not path.is_file() and not processing.image:
        raise ConvertError(f"{folder}: has no preprocessor_config.json: give the model's image size with --image HxW")
    spec = _read_json(path, {})
    rescaled, factor = spec.get("do_rescale", True) is not False, spec.get("rescale_factor", RESCALE_FACTOR)
    if not rescaled or not np.isclose(factor, RESCALE_FACTOR):
        found = f"rescale_factor {factor}" if rescaled else "do_rescale false"
        raise ConvertError(f"{path}: {found}: the graph scales pixels by 1/255")
    mean, std = processing.mean, processing.std
    if spec.get("do_normalize", True):
        mean = mean or ",".join(str(value) for value in spec.get("image_mean", (0, 0, 0)))
        std = std or ",".join(str(value) for value in spec.get("image_std", (1, 1, 1)))
    if processing.image:
        return dataclasses.replace(processing, mean=mean, std=std)
    size = spec.get("size")
    resample = spec.get("resample", PILLOW_BILINEAR)
    if not isinstance(size, dict) or not {"height", "width"} <= set(size) or spec.get("do_center_crop"):
        found = f"resizes by {size!r}{' and crops' if spec.get('do_center_crop') else ''}"
    elif resample != PILLOW_BILINEAR:
        found = f"resamples with resample={resample} (Pillow's {PILLOW_FILTERS.get(resample, 'unknown filter')})"
    else:
        return dataclasses.replace(processing, image=f"{size['height']}x{size['width']}", mean=mean, std=std)
    raise ConvertError(
        f"{path}: its processor {found}; the graph resizes to one size, bilinearly: give the size with --image HxW "
        "to accept that (the mean and std stay the processor's)"
    )


def _read_json(path: Path, default: dict) -> dict:
    if not path.is_file():
        return default
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConvertError(f"{path}: cannot read it as JSON: {error}") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def _class_names(folder: Path, model) -> tuple[str, ...]:
    """The model's id2label, as transformers reads it (LABEL_0 ... where config.json names none)."""
    id2label = getattr(model.config, "id2label", None) or {}
    names = {int(index): str(name) for index, name in id2label.items()}
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
    if task in CLASSIFICATION_TASKS and processing.labels is None:
        processing = dataclasses.replace(processing, class_names=_class_names(folder, model))
    if image:
        feeds = {"pixel_values": image.pixels(samples, "NCHW")}
        module = _task_module(torch, model, task, list(feeds))
    else:
        taken = _token_inputs(model, config)
        tokens = processing.text_tokenizer().encode(samples.matrix())
        feeds = {name: ids for name, ids in tokens.items() if name in taken}
        if task == SENTENCE_EMBEDDINGS and "attention_mask" not in feeds:
            raise ConvertError(f"{folder}: its model takes no attention_mask, which mean pooling needs")
        pooling = _pooling(folder) if task == SENTENCE_EMBEDDINGS else ()
        module = _task_module(torch, model, task, list(feeds), *pooling)
    with tempfile.TemporaryDirectory() as scratch:  # the model's ONNX, checked against it, then processed
        exported = Path(scratch) / out.name
        sequence_inputs = () if image else tuple(feeds)
        export_torch(module, feeds, (TASK_OUTPUTS[task],), exported, tolerance, False, sequence_inputs, folder)
        result = existing_onnx(exported, samples, processing)
        return check_and_save_onnx(processing.apply(result, samples, folder), out, tolerance)


def _load(transformers, folder: Path, task: str):
    from importlib import metadata

    os.environ["HF_HUB_OFFLINE"] = "1"  # the folder is the whole checkpoint: nothing is looked up on the hub
    transformers.logging.set_verbosity_error()  # its load reports; what fails is raised, and said in one line
    transformers.logging.disable_progress_bar()
    loader = getattr(transformers, TASK_MODELS[task])
    try:
        return loader.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as error:  # transformers raises many kinds for a checkpoint it cannot read
        raise ConvertError(
            f"{folder}: transformers {metadata.version('transformers')} cannot load it for {task} "
            f"({TASK_MODELS[task]}): {first_sentence(error)}"
        ) from None


def _token_inputs(model, config: dict) -> set[str]:
    """What the model's forward takes of the tokenizer's outputs: token_type_ids only for a model with token types
    (GPT-2's forward takes them too, but looks them up among its words, and its tokenizer never gives them)."""
    import inspect

    taken = set(inspect.signature(model.forward).parameters)
    return taken if "type_vocab_size" in config else taken - {"token_type_ids"}


def _pooling(folder: Path) -> tuple[str, bool]:
    """How a sentence-transformers checkpoint pools its tokens (1_Pooling/config.json: the mean by default, or the
    first token) and whether it normalizes (a Normalize module in modules.json)."""
    pooling = "mean"
    modules_path = folder / "modules.json"
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8")) if modules_path.is_file() else []
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConvertError(f"{modules_path}: cannot read it as JSON: {error}") from None
    config = _read_json(folder / "1_Pooling" / "config.json", {})
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
