"""Post-processing inside the graph, composed onto any ONNX result of `convert` (or a user's own .onnx): the one
artifact then answers with meaningful outputs the same way on Lambda, on SageMaker and locally.

`--labels labels.txt` adds, beside the raw outputs, `class_name` (BYTES) and `class_score` (FP32), each of shape
[-1, K]: the K best classes (`--top-k`, default 1) and their scores, best first. The scores are the model's class
output where it already holds probabilities (rows of values in [0, 1] summing to 1, as a classifier's
`probabilities`), and its softmax where it holds logits.
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.lambda_handlers.runtimes import EXTENSIONS_DOMAIN, EXTENSIONS_IMAGE_DOMAIN, OnnxModel
from slimserve.lambda_handlers.tensors import shape_text
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
    return OnnxResult(result.model, result.feeds, expected, result.notes)


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


def graph_tokenizer(path: Path, max_length: int) -> "GraphTokenizer":
    """The tokenizer.json at `path` as the graph can run it: WordPiece of the BERT family, byte-level BPE of the
    GPT-2 family (GPT-2, RoBERTa, BART), or Unigram of SentencePiece's (T5, XLM-R, mBART)."""
    spec = _read_tokenizer_json(Path(path))
    kind = spec["model"].get("type")
    if kind == "BPE":
        return BpeTokenizer(Path(path), spec, max_length)
    if kind == "WordPiece":
        return WordPieceTokenizer(Path(path), spec, max_length)
    if kind == "Unigram":
        return UnigramTokenizer(Path(path), spec, max_length)
    raise ConvertError(
        f"--tokenizer {path}: expected a WordPiece (BERT's family), byte-level BPE (GPT-2's family) or Unigram "
        f"(SentencePiece's families) tokenizer, found a {kind or 'tokenizer of no known'} model"
    )


def _read_tokenizer_json(path: Path) -> dict:
    import json

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"--tokenizer {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConvertError(f"--tokenizer {path}: not a Hugging Face tokenizer.json: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ConvertError(f"--tokenizer {path}: not a Hugging Face tokenizer.json: it has no model")
    return spec


class GraphTokenizer:
    """A Hugging Face tokenizer.json as onnxruntime-extensions' operators in the graph, and as `tokenizers` itself
    for the reference ids. Each text goes through the subclass's operator in a Loop (they take one text a call),
    padded to max_length, then the batch is cut to its longest text."""

    def __init__(self, path: Path, spec: dict, max_length: int):
        self.path, self.max_length = path, max_length
        vocab = spec["model"].get("vocab") or {}
        # WordPiece and BPE map each token to its id; Unigram lists [piece, score] in id order
        self.vocab: dict[str, int] = vocab if isinstance(vocab, dict) else {str(p[0]): i for i, p in enumerate(vocab)}
        padding = spec.get("padding") or {}
        self.pad_id = int(padding.get("pad_id", self.vocab.get(self.pad_token, 0)))

    pad_token = "[PAD]"

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

    def tokenize_one(self, helper, constant) -> tuple[list, list]:
        """The Loop body's nodes and constants from `one_text` [1] to `ids`, `type_ids` and `mask`, each of at
        most max_length tokens."""
        raise NotImplementedError

    def normalize(self, helper, tensor_proto, nodes: list, initializers: list) -> str:
        """Nodes before the Loop that prepare every text at once; the name of what they answer."""
        return TEXT_INPUT

    def graph(self, input_types: dict[str, int], opset: int):
        """text [N] -> the model's token inputs [N, longest]."""
        from onnx import TensorProto, helper

        constant = _constants(helper, TensorProto)
        tokenize, body_constants = self.tokenize_one(helper, constant)
        body = helper.make_graph(
            [
                helper.make_node("Unsqueeze", ["iteration", "zero_axis"], ["start"]),
                helper.make_node("Add", ["start", "one"], ["end"]),
                helper.make_node("Slice", ["normalized_text", "start", "end"], ["one_text"]),
                *tokenize,
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
                *body_constants,
            ],
        )
        nodes = [helper.make_node("Size", [TEXT_INPUT], ["texts"])]
        initializers = [constant("true", True, TensorProto.BOOL), constant("row_axis", [1]), constant("zero", [0])]
        text = self.normalize(helper, TensorProto, nodes, initializers)
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


class WordPieceTokenizer(GraphTokenizer):
    """WordPiece with BERT's normalizer and pre-tokenizer, as onnxruntime-extensions' BertTokenizer; lower-casing
    and accent stripping are done before it for the whole of Unicode (BertTokenizer does Latin only)."""

    def __init__(self, path: Path, spec: dict, max_length: int):
        super().__init__(path, spec, max_length)
        normalizer = spec.get("normalizer") or {}
        if normalizer.get("type") not in (None, "BertNormalizer"):
            raise ConvertError(
                f"--tokenizer {path}: expected a WordPiece tokenizer of the BERT family (BertNormalizer), found one "
                f"with a {normalizer.get('type')} normalizer"
            )
        if max_length < 2:
            raise ConvertError(f"--max-length {max_length}: expected at least 2, room for [CLS] and [SEP]")
        self.lowercase = bool(normalizer.get("lowercase", False))
        strip_accents = normalizer.get("strip_accents")
        self.strip_accents = self.lowercase if strip_accents is None else bool(strip_accents)  # BERT's rule
        missing = [token for token in ("[CLS]", "[SEP]", "[UNK]", "[MASK]") if token not in self.vocab]
        if missing:
            raise ConvertError(f"--tokenizer {path}: a BERT vocabulary has {missing[0]}; this one has none")

    def tokenize_one(self, helper, constant) -> tuple[list, list]:
        vocab = "\n".join(token for token, _ in sorted(self.vocab.items(), key=lambda item: item[1]))
        node = helper.make_node(
            "BertTokenizer",
            ["one_text"],
            ["ids", "type_ids", "mask"],
            domain=EXTENSIONS_DOMAIN,
            vocab_file=vocab,
            do_lower_case=int(self.lowercase),
            strip_accents=int(self.strip_accents),
            max_length=self.max_length,
        )
        return [node], []

    def normalize(self, helper, tensor_proto, nodes: list, initializers: list) -> str:
        text = TEXT_INPUT
        if self.lowercase:
            nodes.append(
                helper.make_node(
                    "StringNormalizer", [text], ["lowercase_text"], case_change_action="LOWER", locale=TEXT_LOCALE
                )
            )
            text = "lowercase_text"
        if self.strip_accents:
            text = _rewritten(helper, tensor_proto, nodes, initializers, text, _accent_rewrites(), "unaccented")
        return text


class BpeTokenizer(GraphTokenizer):
    """Byte-level BPE of the GPT-2 family (GPT-2's pre-tokenizing regex, no normalizer; GPT-2, RoBERTa, BART) as
    onnxruntime-extensions' HfJsonTokenizer, which reads the tokenizer.json itself. The special tokens the
    post-processor puts around the text (RoBERTa's <s> and </s>) are its bos and eos; truncation keeps the eos, as
    tokenizers does."""

    pad_token = "<pad>"

    def __init__(self, path: Path, spec: dict, max_length: int):
        super().__init__(path, spec, max_length)
        pre_tokenizer = spec.get("pre_tokenizer") or {}
        if (
            spec.get("normalizer")
            or pre_tokenizer.get("type") != "ByteLevel"
            or not pre_tokenizer.get("use_regex", True)
        ):
            found = (spec.get("normalizer") or {}).get("type") or pre_tokenizer.get("type") or "no"
            raise ConvertError(
                f"--tokenizer {path}: expected a byte-level BPE tokenizer of the GPT-2 family (a ByteLevel "
                f"pre-tokenizer with GPT-2's regex, no normalizer); this one has a {found} "
                f"{'normalizer' if spec.get('normalizer') else 'pre-tokenizer'}"
            )
        if pre_tokenizer.get("add_prefix_space"):
            raise ConvertError(
                f"--tokenizer {path}: its ByteLevel pre-tokenizer adds a prefix space, which onnxruntime-extensions' "
                "HfJsonTokenizer does not"
            )
        self.bos, self.eos = _specials_around_the_text(path, spec.get("post_processor"))
        if max_length < 1 + len(self.bos) + len(self.eos):
            raise ConvertError(f"--max-length {max_length}: expected room for the special tokens and one more")

    def tokenize_one(self, helper, constant) -> tuple[list, list]:
        import json

        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": bool(self.bos),
            "add_eos_token": bool(self.eos),
            **({"bos_token": self.bos[0]} if self.bos else {}),
            **({"eos_token": self.eos[0]} if self.eos else {}),
        }
        kept = self.max_length - len(self.eos)
        nodes = [
            helper.make_node(
                "HfJsonTokenizer",
                ["one_text"],
                ["text_ids"],
                domain=EXTENSIONS_DOMAIN,
                tokenizer_vocab=self.path.read_text(encoding="utf-8"),
                tokenizer_config=json.dumps(config),
            ),
            helper.make_node("Reshape", ["text_ids", "flat"], ["all_text_ids"]),
            # truncated as tokenizers does: the first max_length - len(eos) ids, then the eos (the last id) again
            helper.make_node("Shape", ["all_text_ids"], ["text_length"]),
            helper.make_node("Min", ["text_length", "kept"], ["head_end"]),
            helper.make_node("Sub", ["head_end", "eos_count"], ["head_cut"]),
            helper.make_node("Max", ["head_cut", "zero"], ["head_stop"]),
            helper.make_node("Slice", ["all_text_ids", "zero", "head_stop"], ["head"]),
            helper.make_node("Sub", ["text_length", "eos_count"], ["tail_start"]),
            helper.make_node("Slice", ["all_text_ids", "tail_start", "text_length"], ["tail"]),
            helper.make_node("Concat", ["head", "tail"], ["ids"], axis=0),
            *_type_ids_and_mask(helper, constant),
        ]
        constants = [constant("flat", [-1]), constant("kept", [kept + len(self.eos)]),
                     constant("eos_count", [len(self.eos)])]  # fmt: skip
        return nodes, constants


# Rust's char::is_whitespace (Unicode's White_Space), which tokenizers' Strip and WhitespaceSplit take as whitespace,
# as an RE2 class: RE2's \s is ASCII's alone.
WHITESPACE = r"[\x{9}-\x{d}\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
METASPACE = "\u2581"


class UnigramTokenizer(GraphTokenizer):
    """Unigram of SentencePiece's families (T5, XLM-R, mBART) as onnxruntime-extensions' SentencepieceTokenizer, on a
    SentencePiece model written from the tokenizer.json's pieces and character map. tokenizers and SentencePiece
    treat whitespace differently (the dummy prefix, stripping, collapsing, where the map runs), so the graph runs
    tokenizers' normalizer and Metaspace steps itself as regular expressions, in their order, and leaves
    SentencePiece only the character map and the lattice. The map's own spaces and removals are made where the
    normalizer runs it, so that the steps after it see what tokenizers' see."""

    pad_token = "<pad>"

    def __init__(self, path: Path, spec: dict, max_length: int):
        super().__init__(path, spec, max_length)
        model = spec["model"]
        self.pieces = [(str(piece), float(score)) for piece, score in model.get("vocab") or []]
        self.unk_id = model.get("unk_id")
        if self.unk_id is None:
            raise ConvertError(f"--tokenizer {path}: its Unigram model has no unk_id; SentencePiece needs one")
        self.byte_fallback = bool(model.get("byte_fallback"))
        added = spec.get("added_tokens") or []
        plain = [token["content"] for token in added if not token.get("special")]
        if plain:
            raise ConvertError(
                f"--tokenizer {path}: its added token {plain[0]!r} is not special; the graph's SentencePiece takes "
                "special added tokens only"
            )
        self.added = {token["content"]: int(token["id"]) for token in added}
        if all(piece in self.added or index == self.unk_id for index, (piece, _) in enumerate(self.pieces)):
            raise ConvertError(
                f"--tokenizer {path}: its Unigram model holds special tokens alone, no pieces of text (a tokenizer "
                "written without its vocabulary?)"
            )
        self.charsmap = b""
        self.rewrites = self._normalizer_rewrites(spec.get("normalizer")) + self._metaspace_rewrites(spec)
        self.bos, self.eos = _specials_around_the_text(path, spec.get("post_processor"))
        if max_length < 1 + len(self.bos) + len(self.eos):
            raise ConvertError(f"--max-length {max_length}: expected room for the special tokens and one more")

    def _refuse(self, what: str) -> ConvertError:
        return ConvertError(
            f"--tokenizer {self.path}: expected a Unigram tokenizer of SentencePiece's families (Precompiled, Replace "
            f"and Strip normalizers; a Metaspace pre-tokenizer, after a WhitespaceSplit or alone); this one has {what}"
        )

    def _normalizer_rewrites(self, normalizer) -> list[tuple[str, str]]:
        import base64

        steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
        rewrites = []
        for step in steps:
            kind = step.get("type")
            if kind == "Precompiled" and not self.charsmap:
                self.charsmap = base64.b64decode(step.get("precompiled_charsmap") or "")
                rewrites += _what_the_map_makes_of_spaces(self.charsmap)
            elif kind == "Replace":
                pattern = step.get("pattern") or {}
                regex = pattern["Regex"] if "Regex" in pattern else _re2_literal(pattern.get("String", ""))
                content = step.get("content", "")
                if self.charsmap and re.sub(r"\\[Az]|[ \u2581{}0-9,+*?|^$()]", "", regex + content):
                    raise self._refuse(f"a Replace of {regex!r} after its Precompiled map, which the graph runs last")
                rewrites.append((regex, content.replace("\\", "\\\\")))
            elif kind == "Strip":
                rewrites += [(rf"\A{WHITESPACE}+", "")] if step.get("strip_left", True) else []
                rewrites += [(rf"{WHITESPACE}+\z", "")] if step.get("strip_right", True) else []
            else:
                raise self._refuse(f"a {kind} normalizer")
        return rewrites

    def _metaspace_rewrites(self, spec: dict) -> list[tuple[str, str]]:
        pre_tokenizer = spec.get("pre_tokenizer") or {}
        steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
        kinds = [step.get("type") for step in steps]
        if kinds not in (["Metaspace"], ["WhitespaceSplit", "Metaspace"]):
            raise self._refuse(f"a {' + '.join(map(str, kinds))} pre-tokenizer")
        metaspace = steps[-1]
        default = "always" if metaspace.get("add_prefix_space", True) else "never"  # tokenizers < 0.14 wrote this
        prepend = metaspace.get("prepend_scheme") or default
        if metaspace.get("replacement", METASPACE) != METASPACE or (
            kinds[0] == "WhitespaceSplit" and prepend != "always"
        ):
            raise self._refuse(f"a Metaspace of {metaspace.get('replacement')!r}, prepending {prepend}")
        if metaspace.get("split", True) and any(METASPACE in piece[1:] for piece, _ in self.pieces):
            # tokenizers then splits before each U+2581 and SentencePiece's lattice spans them: the same only where no
            # piece holds one past its start
            raise self._refuse("a Metaspace that splits the text, and pieces with U+2581 inside")
        # after a WhitespaceSplit, Metaspace takes each word alone: one that starts with U+2581 gets no other
        whitespace_split = [
            (rf"\A{WHITESPACE}+|{WHITESPACE}+\z", ""),
            (rf"{WHITESPACE}+", " "),
            (f" {METASPACE}", METASPACE),
        ]
        rewrites = [*(whitespace_split if len(kinds) > 1 else []), (" ", METASPACE)]
        # Metaspace prepends U+2581 to a text that does not start with one ("first" is "always" for a text alone)
        return rewrites + ([(rf"\A([^{METASPACE}])", rf"{METASPACE}\1")] if prepend != "never" else [])

    def normalize(self, helper, tensor_proto, nodes: list, initializers: list) -> str:
        return _rewritten(helper, tensor_proto, nodes, initializers, TEXT_INPUT, self.rewrites, "metaspace")

    def token_id(self, token: str) -> int:
        return self.added.get(token, self.vocab.get(token, self.unk_id))

    def tokenize_one(self, helper, constant) -> tuple[list, list]:
        from onnx import TensorProto

        from slimserve.modeltools.sentencepiece_writer import unigram_model

        control = {self.vocab[token] for token in self.added if token in self.vocab}
        model = unigram_model(self.pieces, int(self.unk_id), control, self.byte_fallback, self.charsmap)
        nodes = [
            helper.make_node(
                "SentencepieceTokenizer",
                ["one_text", "nbest_size", "alpha", "no", "no", "no"],  # no sampling, bos, eos or reversing
                ["text_tokens", "text_rows"],
                domain=EXTENSIONS_DOMAIN,
                model=model,
            ),
            helper.make_node("Cast", ["text_tokens"], ["text_ids"], to=TensorProto.INT64),
            # truncated as tokenizers does: the text's first ids, then the special tokens around them
            helper.make_node("Slice", ["text_ids", "zero", "kept"], ["kept_ids"]),
            helper.make_node("Concat", ["before", "kept_ids", "after"], ["ids"], axis=0),
            *_type_ids_and_mask(helper, constant),
        ]
        constants = [
            constant("nbest_size", 0),
            constant("alpha", 0.0, TensorProto.FLOAT),
            constant("no", False, TensorProto.BOOL),
            constant("kept", [self.max_length - len(self.bos) - len(self.eos)]),
            constant("before", [self.token_id(token) for token in self.bos]),
            constant("after", [self.token_id(token) for token in self.eos]),
        ]
        return nodes, constants


def _re2_literal(text: str) -> str:
    return "".join(f"\\x{{{ord(letter):x}}}" for letter in text)


def _re2_class(codes: list[int]) -> str:
    return f"[{_re2_literal(''.join(map(chr, codes)))}]"


@functools.cache
def _what_the_map_makes_of_spaces(charsmap: bytes) -> tuple[tuple[str, str], ...]:
    """A Precompiled map's letters that become a space and those it removes, as rewrites: made where tokenizers
    runs the map, they let the whitespace steps after it see its spaces before SentencePiece runs the rest of it.
    Cached: it runs the map on every code point (0.7 s), and convert reads the tokenizer for the model's reference
    feeds, for the graph and, for a checkpoint, for the export."""
    from tokenizers import normalizers

    precompiled = normalizers.Precompiled(charsmap)
    made: dict[str, list[int]] = {" ": [], "": []}
    for code in (*range(0xD800), *range(0xE000, 0x110000)):
        normalized = precompiled.normalize_str(chr(code))
        if normalized in made and chr(code) != normalized:
            made[normalized].append(code)
    return tuple((_re2_class(codes), rewrite) for rewrite, codes in made.items() if codes)


def _type_ids_and_mask(helper, constant) -> list:
    """A text's token type ids (zeros) and attention mask (ones), as long as its `ids`."""
    return [
        helper.make_node("Shape", ["ids"], ["ids_length"]),
        helper.make_node("ConstantOfShape", ["ids_length"], ["type_ids"], value=constant("zero_value", [0])),
        helper.make_node("ConstantOfShape", ["ids_length"], ["mask"], value=constant("one_value", [1])),
    ]


def _rewritten(helper, tensor_proto, nodes: list, initializers: list, text: str, rewrites, name: str) -> str:
    """Nodes that rewrite every text with each (RE2 pattern, rewrite) in turn; the name of what they answer."""
    for index, (pattern, rewrite) in enumerate(rewrites):
        initializers += [_string(helper, tensor_proto, f"{name}_pattern_{index}", pattern),
                         _string(helper, tensor_proto, f"{name}_rewrite_{index}", rewrite)]  # fmt: skip
        nodes.append(
            helper.make_node(
                "StringRegexReplace",
                [text, f"{name}_pattern_{index}", f"{name}_rewrite_{index}"],
                [f"{name}_text_{index}"],
                domain=EXTENSIONS_DOMAIN,
            )
        )
        text = f"{name}_text_{index}"
    return text


def _specials_around_the_text(path: Path, post_processor) -> tuple[list[str], list[str]]:
    """The special tokens a tokenizer.json's post-processor puts before and after a single text (at most one
    each): RobertaProcessing's, BertProcessing's or a TemplateProcessing's; none for ByteLevel or no processor."""
    processors = (post_processor or {}).get("processors", [post_processor]) if post_processor else []
    before: list[str] = []
    after: list[str] = []
    for processor in processors:
        kind = processor.get("type")
        if kind in ("RobertaProcessing", "BertProcessing"):
            before, after = [processor["cls"][0]], [processor["sep"][0]]
        elif kind == "TemplateProcessing":
            pieces = processor.get("single", [])
            sequence = next((i for i, piece in enumerate(pieces) if "Sequence" in piece), None)
            if sequence is None:
                raise ConvertError(f"--tokenizer {path}: its TemplateProcessing has no place for the text")
            before = [piece["SpecialToken"]["id"] for piece in pieces[:sequence]]
            after = [piece["SpecialToken"]["id"] for piece in pieces[sequence + 1 :]]
        elif kind != "ByteLevel":
            raise ConvertError(f"--tokenizer {path}: its {kind} post-processor is not in the graph yet")
    if len(before) > 1 or len(after) > 1:
        raise ConvertError(
            f"--tokenizer {path}: its post-processor puts {before + after} around the text; the graph puts at most "
            "one special token before it and one after"
        )
    return before, after


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


def with_tokenizer(result: OnnxResult, tokenizer: GraphTokenizer, texts: np.ndarray, source) -> OnnxResult:
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
    _check_tokens(tokenizer, front, texts)
    merged = compose.merge_models(
        front,
        model,
        io_map=[(name, name) for name in ordered],
        prefix1=TOKENIZER_PREFIX,
    )
    _merge_opsets(merged, model)
    rename_io(merged, {f"{TOKENIZER_PREFIX}{TEXT_INPUT}": TEXT_INPUT})
    return OnnxResult(merged, {TEXT_INPUT: np.asarray(texts, dtype=object).reshape(-1)}, result.expected)


def _check_tokens(tokenizer: GraphTokenizer, front, texts: np.ndarray) -> None:
    """The graph's tokens for each sample equal `tokenizers`' own, or a ConvertError naming the first that differs:
    a model's answers alone may hide a different token (a near-uniform model, an unused one)."""
    texts = np.asarray(texts, dtype=object).reshape(-1)
    graph = OnnxModel(front.SerializeToString())
    names = [spec.name for spec in graph.signature.outputs]
    got = graph.run({TEXT_INPUT: texts}, names)
    expected = tokenizer.encode(texts)
    for row, text in enumerate(texts):
        for name in names:
            mine, theirs = (np.asarray(tokens[name])[row].astype(np.int64).tolist() for tokens in (got, expected))
            if mine != theirs:
                raise ConvertError(
                    f"--tokenizer {tokenizer.path}: the graph tokenizes sample {row} ({str(text)[:60]!r}) unlike "
                    f"tokenizers: {name} {mine[:16]} against {theirs[:16]}; a sample's text the graph cannot take "
                    "(a letter its vocabulary lacks, a special token typed in it) is refused rather than served"
                )


def _merge_opsets(merged, model) -> None:
    """merge_models keeps the first model's opset imports: the model's own domains (ai.onnx.ml, ...) must stay."""
    from onnx import helper

    present = {opset.domain for opset in merged.opset_import}
    merged.opset_import.extend(
        helper.make_opsetid(opset.domain, opset.version) for opset in model.opset_import if opset.domain not in present
    )


IMAGE_INPUT = "image"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The float datatypes an image model's input may have, as ONNX numbers them (FLOAT, FLOAT16, DOUBLE).
FLOAT_INPUTS = (1, 10, 11)
# Resize's antialiasing and its axes attribute came in opset 18.
IMAGE_OPSET = 18


class ImageInput:
    """`--image HxW --mean R,G,B --std R,G,B`: encoded JPEG or PNG bytes in, decoded to RGB in the graph, resized
    to HxW (linear, antialiased: Pillow's BILINEAR), scaled to [0, 1], normalized and laid out as the model takes
    them; Pillow doing the same on the samples gives the reference."""

    def __init__(self, size: str, mean: str | None = None, std: str | None = None):
        try:
            height, width = (int(side) for side in size.lower().split("x"))
        except ValueError:
            raise ConvertError(f"--image {size}: expected HEIGHTxWIDTH in pixels, such as 224x224") from None
        if height < 1 or width < 1:
            raise ConvertError(f"--image {size}: expected sides of at least 1 pixel")
        self.height, self.width = height, width
        self.mean = _channels("--mean", mean, 0.0)
        self.std = _channels("--std", std, 1.0)
        if (self.std == 0).any():
            raise ConvertError(f"--std {std}: a channel's standard deviation cannot be 0")

    def layout(self, shape, source) -> str:
        """NCHW or NHWC, from the model's one image input of shape `shape`, whose sides must be ours or free."""
        channels_first = len(shape) == 4 and shape[1] == 3
        channels_last = len(shape) == 4 and shape[3] == 3
        if channels_first == channels_last:
            raise ConvertError(
                f"--image: expected a model whose one input is a batch of RGB images, [N, 3, H, W] or [N, H, W, 3]; "
                f"{source} takes {shape_text(shape)}"
            )
        sides = tuple(shape[2:4] if channels_first else shape[1:3])
        if any(side not in (-1, wanted) for side, wanted in zip(sides, (self.height, self.width))):
            raise ConvertError(
                f"--image {self.height}x{self.width}: {source} takes images of {sides[0]}x{sides[1]} "
                f"({shape_text(shape)})"
            )
        return "NCHW" if channels_first else "NHWC"

    def model_feeds(self, samples: "ImageSamples", signature, source) -> dict[str, np.ndarray]:
        """What the bare model takes for the sample images: Pillow's pixels, in its layout and datatype."""
        from slimserve.lambda_handlers.datatypes import V2_TO_NUMPY

        if len(signature.inputs) != 1 or signature.inputs[0].datatype not in ("FP16", "FP32", "FP64"):
            found = ", ".join(f"{spec.name} ({spec.datatype})" for spec in signature.inputs)
            raise ConvertError(f"--image: expected a model of one float image input; {source} takes {found}")
        spec = signature.inputs[0]
        pixels = self.pixels(samples, self.layout(spec.shape, source))
        return {spec.name: pixels.astype(V2_TO_NUMPY[spec.datatype])}

    def pixels(self, samples: "ImageSamples", layout: str) -> np.ndarray:
        """What the bare model takes for the sample images, as Pillow decodes and resizes them."""
        import io

        from slimserve.modeltools.convert import require

        image_module = require("PIL.Image", samples.paths[0], "checking --image", "'slimserve[image]'")
        rows = []
        for data, path in zip(samples.images, samples.paths):
            try:
                image = image_module.open(io.BytesIO(data)).convert("RGB")
            except (OSError, ValueError) as error:
                raise ConvertError(f"--samples {path}: Pillow cannot read it as an image: {error}") from None
            resized = image.resize((self.width, self.height), image_module.Resampling.BILINEAR)
            rows.append((np.asarray(resized, dtype=np.float32) / 255 - self.mean) / self.std)
        batch = np.stack(rows)
        return batch.transpose(0, 3, 1, 2) if layout == "NCHW" else batch

    def graph(self, layout: str, elem_type: int, opset: int):
        """image [N, longest] and image_length [N] -> the model's input [N, 3, H, W] or [N, H, W, 3]: each image
        through DecodeImage, Resize and the normalization in a Loop (DecodeImage takes one image a call)."""
        from onnx import TensorProto, helper, numpy_helper

        constant = _constants(helper, TensorProto)
        shape = [3, self.height, self.width] if layout == "NCHW" else [self.height, self.width, 3]
        nodes = [
            helper.make_node("Unsqueeze", ["iteration", "zero"], ["start"]),
            helper.make_node("Add", ["start", "one"], ["end"]),
            helper.make_node("Slice", [IMAGE_INPUT, "start", "end"], ["row"]),
            helper.make_node("Slice", [f"{IMAGE_INPUT}_length", "start", "end"], ["length"]),
            helper.make_node("Reshape", ["row", "flat"], ["padded"]),
            helper.make_node("Slice", ["padded", "zero", "length"], ["encoded"]),
            helper.make_node("DecodeImage", ["encoded"], ["rgb"], domain=EXTENSIONS_IMAGE_DOMAIN, color_space="rgb"),
            helper.make_node(
                "Resize",
                ["rgb", "", "", "sides"],
                ["resized"],
                mode="linear",
                antialias=1,
                axes=[0, 1],
                coordinate_transformation_mode="half_pixel",
            ),
            helper.make_node("Cast", ["resized"], ["levels"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["levels", "full_scale"], ["scaled"]),
            helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["normalized"]),
        ]
        last = "normalized"
        if layout == "NCHW":
            nodes.append(helper.make_node("Transpose", [last], ["channels_first"], perm=[2, 0, 1]))
            last = "channels_first"
        if elem_type != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [last], ["typed"], to=elem_type))
            last = "typed"
        nodes.append(helper.make_node("Identity", [last], ["one_image"]))
        nodes.append(helper.make_node("Identity", ["condition"], ["condition_out"]))
        body = helper.make_graph(
            nodes,
            "decode_one",
            [
                helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
                helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
            ],
            [
                helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("one_image", elem_type, shape),
            ],
            [
                constant("zero", [0]),
                constant("one", [1]),
                constant("flat", [-1]),
                constant("sides", [self.height, self.width]),
                numpy_helper.from_array(np.array(255, dtype=np.float32), "full_scale"),
                numpy_helper.from_array(self.mean, "mean"),
                numpy_helper.from_array(self.std, "std"),
            ],
        )
        graph = helper.make_graph(
            [
                helper.make_node("Size", [f"{IMAGE_INPUT}_length"], ["images"]),
                helper.make_node("Loop", ["images", "true"], [IMAGE_INPUT_PIXELS], body=body),
            ],
            "image_decoder",
            [
                helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8, ["N", "bytes"]),
                helper.make_tensor_value_info(f"{IMAGE_INPUT}_length", TensorProto.INT64, ["N"]),
            ],
            [helper.make_tensor_value_info(IMAGE_INPUT_PIXELS, elem_type, ["N", *shape])],
            [constant("true", True, TensorProto.BOOL)],
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(EXTENSIONS_IMAGE_DOMAIN, 1)]
        )


IMAGE_INPUT_PIXELS = "pixels"
IMAGE_PREFIX = "image_decoder_"


def _channels(option: str, text: str | None, default: float) -> np.ndarray:
    if text is None:
        return np.full(3, default, dtype=np.float32)
    try:
        values = [float(value) for value in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ConvertError(f"{option} {text}: expected three numbers R,G,B, such as 0.485,0.456,0.406")
    return np.array(values, dtype=np.float32)


@dataclass(frozen=True)
class ImageSamples:
    images: list[bytes]
    paths: list[Path]


def read_images(path: Path) -> ImageSamples:
    """`--samples` for an image model: one JPEG or PNG file, or a folder of them (in name order)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConvertError(
                f"--samples {path}: expected JPEG or PNG images (.jpg, .jpeg, .png); the folder has none"
            )
    elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        files = [path]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise ConvertError(f"--samples {path}: no such image file")
    else:
        raise ConvertError(
            f"--samples {path}: with --image, expected a JPEG or PNG image or a folder of them, found "
            f"{'no such folder' if not path.suffix else f'a {path.suffix} file'}"
        )
    return ImageSamples([file.read_bytes() for file in files], files)


def with_image(result: OnnxResult, image: ImageInput, samples: ImageSamples, source) -> OnnxResult:
    """`result` (an ONNX model taking one batch of images as floats, its answers on `image.pixels(images)`) behind
    the image decoder: inputs `image` and `image_length`, which the runtime shows clients as one BYTES input."""
    from onnx import compose, helper, version_converter

    from slimserve.lambda_handlers.images import IMAGE_INPUTS, image_problem

    for data, path in zip(samples.images, samples.paths):
        problem = image_problem(data)
        if problem:
            raise ConvertError(f"--samples {path}: {problem}")
    model = result.model
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    elem_type = inputs[0].type.tensor_type.elem_type
    if len(inputs) != 1 or elem_type not in FLOAT_INPUTS:
        found = ", ".join(value.name for value in inputs)
        raise ConvertError(f"--image: expected a model of one float image input; {source} takes {found}")
    shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in inputs[0].type.tensor_type.shape.dim]
    layout = image.layout(shape, source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < IMAGE_OPSET:
        try:
            model = version_converter.convert_version(model, IMAGE_OPSET)
        except Exception as error:  # onnx's converter raises its own unexported kinds
            raise ConvertError(
                f"{source}: the image decoder needs ONNX opset {IMAGE_OPSET}; onnx cannot raise the model's opset "
                f"{opset} to it: {error}"
            ) from None
    front = image.graph(layout, elem_type, IMAGE_OPSET if opset < IMAGE_OPSET else opset)
    front.ir_version = model.ir_version
    merged = compose.merge_models(front, model, io_map=[(IMAGE_INPUT_PIXELS, inputs[0].name)], prefix1=IMAGE_PREFIX)
    _merge_opsets(merged, model)
    rename_io(merged, {f"{IMAGE_PREFIX}{name}": name for name in (IMAGE_INPUT, f"{IMAGE_INPUT}_length")})
    helper.set_model_props(merged, {**{p.key: p.value for p in merged.metadata_props}, IMAGE_INPUTS: IMAGE_INPUT})
    encoded = np.array(samples.images, dtype=object)
    expected, notes = _on_the_graphs_pixels(result, front, image, encoded, inputs[0].name, layout)
    return OnnxResult(merged, {IMAGE_INPUT: encoded}, expected, notes)


def _on_the_graphs_pixels(result: OnnxResult, front, image: ImageInput, encoded, name: str, layout: str):
    """What the model answers on the pixels the decoder graph makes (the composed graph must answer the same), and
    how those pixels and answers compare with Pillow's: decoders and resizers round differently, so they are
    measured, in levels of 255, not gated on."""
    from slimserve.lambda_handlers.images import pack

    pixels = OnnxModel(front.SerializeToString()).session.run(None, pack(IMAGE_INPUT, encoded))[0]
    pillow = result.feeds[name]
    bare = OnnxModel(result.model.SerializeToString())
    expected = bare.run({name: pixels.astype(pillow.dtype)}, list(result.expected))
    spread = image.std.reshape((1, 3, 1, 1) if layout == "NCHW" else (1, 1, 1, 3))
    levels = np.abs(pixels.astype(np.float64) - pillow) * spread * 255
    notes = [
        f"pixels against Pillow's (RGB, BILINEAR): max {levels.max():.2f} levels of 255, "
        f"{(levels >= 0.5).mean():.2%} of values a level or more apart"
    ]
    for output, reference in result.expected.items():
        reference, answer = np.asarray(reference), np.asarray(expected[output])
        if reference.dtype.kind == "f" and reference.ndim == 2 and reference.shape[1] > 1:
            same = (reference.argmax(axis=1) == answer.argmax(axis=1)).mean()
            diff = np.abs(answer.astype(np.float64) - reference).max()
            notes.append(f"{output} on Pillow's pixels: top class agrees on {same:.2%}, max |diff| {diff:.3g}")
    return expected, tuple(notes)
