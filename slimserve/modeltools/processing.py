"""Post-processing inside the graph, composed onto any ONNX result of `convert` (or a user's own .onnx): the one
artifact then answers with meaningful outputs the same way on Lambda, on SageMaker and locally.

`--labels labels.txt` adds, beside the raw outputs, `class_name` (BYTES) and `class_score` (FP32), each of shape
[-1, K]: the K best classes (`--top-k`, default 1) and their scores, best first. The scores are the model's class
output where it already holds probabilities (rows of values in [0, 1] summing to 1, as a classifier's
`probabilities`), and its softmax where it holds logits.
"""

from pathlib import Path

import numpy as np

from slimserve.lambda_handlers.runtimes import EXTENSIONS_DOMAIN
from slimserve.modeltools.convert import ConvertError, OnnxResult, rename_io
from slimserve.modeltools.sklearn_models import TEXT_LOCALE

CLASS_NAME = "class_name"
CLASS_SCORE = "class_score"
# How far a row of probabilities may sum from 1 and still be taken as probabilities (float32 rounding).
PROBABILITY_SUM_TOLERANCE = 1e-4


def read_labels(path: Path) -> list[str]:
    """One label per line, in the order of the model's classes; a final newline is no label."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConvertError(f"--labels {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"--labels {path}: cannot read it as UTF-8 text: {error}") from None
    empty = [number for number, line in enumerate(lines, start=1) if not line.strip()]
    if empty or not lines:
        where = f"line {empty[0]} is empty" if empty else "it is empty"
        raise ConvertError(
            f"--labels {path}: expected one label per line, in the order of the model's classes; {where}"
        )
    return [line.strip() for line in lines]


def with_labels(result: OnnxResult, labels: list[str], top_k: int, labels_path: Path) -> OnnxResult:
    """`result` with `class_name` and `class_score` added to its graph and to what the original answers."""
    from onnx import TensorProto, helper, numpy_helper

    scores_output = _class_output(result, len(labels), labels_path)
    if not 1 <= top_k <= len(labels):
        raise ConvertError(f"--top-k {top_k}: expected 1 to {len(labels)}, the number of labels in {labels_path}")
    reference = np.asarray(result.expected[scores_output], dtype=np.float64)
    probabilities = _are_probabilities(reference)
    graph = result.model.graph
    scores = scores_output
    if not probabilities:
        scores = f"{scores_output}_softmax"
        graph.node.append(helper.make_node("Softmax", [scores_output], [scores], axis=-1))
        reference = np.exp(reference - reference.max(axis=1, keepdims=True))
        reference /= reference.sum(axis=1, keepdims=True)
    names = numpy_helper.from_array(np.array([label.encode() for label in labels], dtype=object), "class_names")
    top_k_tensor = numpy_helper.from_array(np.array([top_k], dtype=np.int64), "class_top_k")
    graph.initializer.extend([names, top_k_tensor])
    graph.node.extend(
        [
            helper.make_node("TopK", [scores, "class_top_k"], [CLASS_SCORE, "class_index"], axis=-1),
            helper.make_node("Gather", ["class_names", "class_index"], [CLASS_NAME]),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(CLASS_NAME, TensorProto.STRING, ["N", top_k]),
            helper.make_tensor_value_info(CLASS_SCORE, TensorProto.FLOAT, ["N", top_k]),
        ]
    )
    best = np.argsort(-reference, axis=1, kind="stable")[:, :top_k]
    expected = {
        **result.expected,
        CLASS_NAME: np.asarray(labels, dtype=object)[best],
        CLASS_SCORE: np.take_along_axis(reference, best, axis=1),
    }
    return OnnxResult(result.model, result.feeds, expected)


def _class_output(result: OnnxResult, classes: int, labels_path: Path) -> str:
    """The float output of one score per class: `probabilities` where a converter wrote it, else the only one."""
    candidates = [
        name
        for name, values in result.expected.items()
        if np.asarray(values).dtype.kind == "f" and np.ndim(values) == 2 and np.shape(values)[1] == classes
    ]
    if "probabilities" in candidates:
        return "probabilities"
    if len(candidates) == 1:
        return candidates[0]
    outputs = ", ".join(f"{name} {tuple(np.shape(values))}" for name, values in result.expected.items())
    found = "several" if candidates else "none"
    raise ConvertError(
        f"--labels {labels_path}: expected one float output of shape (rows, {classes}), one score per label; "
        f"found {found} among the model's outputs on the samples: {outputs}"
    )


def _are_probabilities(scores: np.ndarray) -> bool:
    return bool(
        (scores >= 0).all()
        and (scores <= 1).all()
        and np.allclose(scores.sum(axis=1), 1.0, atol=PROBABILITY_SUM_TOLERANCE)
    )


# What a text model takes, as the Hugging Face tokenizers write it; a model takes input_ids and any of the others.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_INPUT = "text"
TOKENIZER_PREFIX = "tokenizer_"


class WordPieceTokenizer:
    """A Hugging Face tokenizer.json of the BERT family (WordPiece with BERT's normalizer and pre-tokenizer) as an
    onnxruntime-extensions BertTokenizer in the graph, and as `tokenizers` itself for the reference ids."""

    def __init__(self, path: Path, max_length: int):
        import json

        self.path, self.max_length = Path(path), max_length
        try:
            spec = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConvertError(f"--tokenizer {path}: no such file") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ConvertError(f"--tokenizer {path}: not a Hugging Face tokenizer.json: {error}") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        kind = model.get("type") if isinstance(model, dict) else None
        normalizer = spec.get("normalizer") or {}
        if kind != "WordPiece" or normalizer.get("type") not in (None, "BertNormalizer"):
            raise ConvertError(
                f"--tokenizer {path}: expected a WordPiece tokenizer of the BERT family (BertNormalizer), found a "
                f"{kind or 'tokenizer of no known'} model with {normalizer.get('type') or 'no'} normalizer; "
                "BPE and Unigram tokenizers are not in the graph yet"
            )
        if max_length < 2:
            raise ConvertError(f"--max-length {max_length}: expected at least 2, room for [CLS] and [SEP]")
        self.vocab: dict[str, int] = model["vocab"]
        self.lowercase = bool(normalizer.get("lowercase", False))
        strip_accents = normalizer.get("strip_accents")
        self.strip_accents = self.lowercase if strip_accents is None else bool(strip_accents)  # BERT's rule
        padding = spec.get("padding") or {}
        self.pad_id = int(padding.get("pad_id", self.vocab.get("[PAD]", 0)))
        missing = [token for token in ("[CLS]", "[SEP]", "[UNK]", "[MASK]") if token not in self.vocab]
        if missing:
            raise ConvertError(f"--tokenizer {path}: a BERT vocabulary has {missing[0]}; this one has none")

    def check_inputs(self, names: list[str], source) -> None:
        if "input_ids" not in names or set(names) - set(TOKEN_INPUTS):
            raise ConvertError(
                f"--tokenizer {self.path}: expected a model that takes {', '.join(TOKEN_INPUTS[:1])} and any of "
                f"{', '.join(TOKEN_INPUTS[1:])}; {source} takes {', '.join(names)}"
            )

    def model_feeds(self, texts: np.ndarray, signature, source) -> dict[str, np.ndarray]:
        """What the bare model takes for `texts`: `tokenizers`' ids, in each input's datatype."""
        from slimserve.lambda_handlers.datatypes import V2_TO_NUMPY

        self.check_inputs([spec.name for spec in signature.inputs], source)
        tokens = self.encode(texts)
        return {spec.name: tokens[spec.name].astype(V2_TO_NUMPY[spec.datatype]) for spec in signature.inputs}

    def encode(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        """`tokenizers`' own ids for `texts`: truncated to max_length, padded to the longest, as int64."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConvertError(
                f"--tokenizer {self.path}: checking the graph's tokens needs tokenizers: pip install 'slimserve[text]'"
            ) from None
        tokenizer = Tokenizer.from_file(str(self.path))
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(pad_id=self.pad_id)
        encodings = tokenizer.encode_batch([str(text) for text in np.asarray(texts).reshape(-1)])
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def graph(self, input_types: dict[str, int], opset: int):
        """text [N] -> the model's token inputs [N, longest]: each text through BertTokenizer in a Loop (it takes
        one text a call), padded to max_length, then cut to the longest in the batch."""
        from onnx import TensorProto, helper

        vocab = "\n".join(token for token, _ in sorted(self.vocab.items(), key=lambda item: item[1]))
        constant = _constants(helper, TensorProto)
        body = helper.make_graph(
            [
                helper.make_node("Unsqueeze", ["iteration", "zero_axis"], ["start"]),
                helper.make_node("Add", ["start", "one"], ["end"]),
                helper.make_node("Slice", ["normalized_text", "start", "end"], ["one_text"]),
                helper.make_node(
                    "BertTokenizer",
                    ["one_text"],
                    ["ids", "type_ids", "mask"],
                    domain=EXTENSIONS_DOMAIN,
                    vocab_file=vocab,
                    do_lower_case=int(self.lowercase),
                    strip_accents=int(self.strip_accents),
                    max_length=self.max_length,
                ),
                helper.make_node("Shape", ["ids"], ["length"]),
                helper.make_node("Sub", ["max_length", "length"], ["missing"]),
                helper.make_node("Concat", ["zero", "missing"], ["pads"], axis=0),
                helper.make_node("Pad", ["ids", "pads", "pad_id"], ["padded_ids"]),
                helper.make_node("Pad", ["type_ids", "pads", "zero_scalar"], ["padded_type_ids"]),
                helper.make_node("Pad", ["mask", "pads", "zero_scalar"], ["padded_mask"]),
                helper.make_node("Identity", ["condition"], ["condition_out"]),
            ],
            "tokenize_one",
            [
                helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
                helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
            ],
            [
                helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
                *(
                    helper.make_tensor_value_info(name, TensorProto.INT64, [self.max_length])
                    for name in ("padded_ids", "padded_type_ids", "padded_mask")
                ),
            ],
            [
                constant("zero_axis", [0]),
                constant("one", [1]),
                constant("zero", [0]),
                constant("zero_scalar", 0),
                constant("pad_id", self.pad_id),
                constant("max_length", [self.max_length]),
            ],
        )
        nodes = [helper.make_node("Size", [TEXT_INPUT], ["texts"])]
        initializers = [constant("true", True, TensorProto.BOOL), constant("row_axis", [1]), constant("zero", [0])]
        text = TEXT_INPUT
        # BertTokenizer lower-cases and strips the accents of Latin letters only: the whole of Unicode is done here
        if self.lowercase:
            nodes.append(
                helper.make_node(
                    "StringNormalizer", [text], ["lowercase_text"], case_change_action="LOWER", locale=TEXT_LOCALE
                )
            )
            text = "lowercase_text"
        if self.strip_accents:
            for index, (pattern, rewrite) in enumerate(_accent_rewrites()):
                initializers += [_string(helper, TensorProto, f"accents_{index}", pattern),
                                 _string(helper, TensorProto, f"unaccented_{index}", rewrite)]  # fmt: skip
                nodes.append(
                    helper.make_node(
                        "StringRegexReplace",
                        [text, f"accents_{index}", f"unaccented_{index}"],
                        [f"unaccented_text_{index}"],
                        domain=EXTENSIONS_DOMAIN,
                    )
                )
                text = f"unaccented_text_{index}"
        nodes.append(helper.make_node("Identity", [text], ["normalized_text"]))
        nodes += [
            helper.make_node("Loop", ["texts", "true"], ["all_ids", "all_type_ids", "all_mask"], body=body),
            helper.make_node("ReduceSum", ["all_mask", "row_axis"], ["lengths"], keepdims=0),
            helper.make_node("ReduceMax", ["lengths"], ["longest"], keepdims=1),
        ]
        cut = {"input_ids": "all_ids", "token_type_ids": "all_type_ids", "attention_mask": "all_mask"}
        outputs = []
        for name, elem_type in input_types.items():
            sliced = name if elem_type == TensorProto.INT64 else f"{name}_int64"
            nodes.append(helper.make_node("Slice", [cut[name], "zero", "longest", "row_axis"], [sliced]))
            if sliced != name:
                nodes.append(helper.make_node("Cast", [sliced], [name], to=elem_type))
            outputs.append(helper.make_tensor_value_info(name, elem_type, ["N", "tokens"]))
        graph = helper.make_graph(
            nodes,
            "tokenizer",
            [helper.make_tensor_value_info(TEXT_INPUT, TensorProto.STRING, ["N"])],
            outputs,
            initializers,
        )
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(EXTENSIONS_DOMAIN, 1)],
        )


def _accent_rewrites() -> list[tuple[str, str]]:
    """BERT's strip_accents (NFD, then no combining marks) as regular expressions: each letter with an accent,
    grouped by what it becomes, then any combining mark left."""
    import unicodedata
    from collections import defaultdict

    plain = defaultdict(list)
    for code in range(0xC0, 0x2000):  # Latin, Greek, Cyrillic and the rest of the alphabets with accents
        letter = chr(code)
        if unicodedata.category(letter).startswith("L"):
            stripped = "".join(c for c in unicodedata.normalize("NFD", letter) if unicodedata.category(c) != "Mn")
            if stripped != letter:
                plain[stripped].append(letter)
    rewrites = [(f"[{''.join(letters)}]", stripped) for stripped, letters in plain.items()]
    return [*rewrites, (r"\p{Mn}", "")]


def _string(helper, tensor_proto, name: str, value: str):
    return helper.make_tensor(name, tensor_proto.STRING, [1], [value.encode()])


def _constants(helper, tensor_proto):
    def constant(name: str, value, elem_type=None):
        values = np.asarray(value)
        dims = list(values.shape)
        return helper.make_tensor(name, elem_type or tensor_proto.INT64, dims, values.reshape(-1).tolist())

    return constant


def with_tokenizer(result: OnnxResult, tokenizer: WordPieceTokenizer, texts: np.ndarray, source) -> OnnxResult:
    """`result` (an ONNX model taking token ids, its answers on `tokenizer.encode(texts)`) behind the tokenizer:
    one input `text` of shape [-1], the same outputs."""
    from onnx import compose

    model = result.model
    inputs = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = {name: elem_type for name, elem_type in inputs.items() if name not in initializers}
    tokenizer.check_inputs(list(inputs), source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ConvertError(f"{source}: a tokenizer in the graph needs ONNX opset 13 or later; the model has {opset}")
    ordered = {name: inputs[name] for name in TOKEN_INPUTS if name in inputs}
    front = tokenizer.graph(ordered, opset)
    front.ir_version = model.ir_version
    merged = compose.merge_models(
        front,
        model,
        io_map=[(name, name) for name in ordered],
        prefix1=TOKENIZER_PREFIX,
    )
    _merge_opsets(merged, model)
    rename_io(merged, {f"{TOKENIZER_PREFIX}{TEXT_INPUT}": TEXT_INPUT})
    return OnnxResult(merged, {TEXT_INPUT: np.asarray(texts, dtype=object).reshape(-1)}, result.expected)


def _merge_opsets(merged, model) -> None:
    """merge_models keeps the first model's opset imports: the model's own domains (ai.onnx.ml, ...) must stay."""
    from onnx import helper

    present = {opset.domain for opset in merged.opset_import}
    merged.opset_import.extend(
        helper.make_opsetid(opset.domain, opset.version) for opset in model.opset_import if opset.domain not in present
    )
