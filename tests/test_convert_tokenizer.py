"""--tokenizer: a model that takes token ids takes text instead, tokenized inside the graph by onnxruntime-extensions
from the user's Hugging Face tokenizer.json. The ids equal the `tokenizers` library's own, special tokens, truncation
and padding included, and a batch of n texts gives n answers through every protocol."""

import base64
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import call

from slimserve.cli import main
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import ModelLoadError, OnnxModel

CORPUS = ["the film was a delight from start to finish", "an awful, boring and far too long film",
          "Café crème et croissants: très bon!", "ΣΟΦΙΑ και γνώση", "άλφα, ужасный фильм", "unbelievably wonderful acting",
          "tokenization splits unknown words into pieces", "HELLO there, General Kenobi"]
# Beside the corpus: nothing, one letter, words made of known letters, accents of several alphabets (BERT strips them
# all when it lower-cases), İ (its lower case is two code points) and half-width katakana.
TEXTS = CORPUS + ["", "a", "never seen these wordz qqqq", "Ünïcödé ÀÉÎÕÜ", "УЖАСНЫЙ ΆΛΦΑ γνώση", "İstanbul", "ﾊﾝｶｸ"]
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def train_wordpiece(path, lowercase=True):
    """A BERT-style WordPiece tokenizer trained here, saved as a Hugging Face tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(CORPUS * 10, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                                                 ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    tokenizer.save(str(path))
    return tokenizer


def echo_onnx(path, inputs=TOKEN_INPUTS, elem_type=TensorProto.INT64):
    """A model that answers with the token inputs it was given: its outputs are the graph's tokenization."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_seen"]) for name in inputs], "echo",
        [helper.make_tensor_value_info(name, elem_type, ["N", "T"]) for name in inputs],
        [helper.make_tensor_value_info(f"{name}_seen", elem_type, ["N", "T"]) for name in inputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def text_classifier_onnx(path, vocab_size: int, classes: int = 2):
    """A bag-of-embeddings classifier over token ids: mean of the unmasked tokens' embeddings, then logits."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "one"], ["counted"], keepdims=0),
        helper.make_node("Div", ["summed", "counted"], ["mean"]),
        helper.make_node("MatMul", ["mean", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "bag", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(rng.normal(size=(vocab_size, 8)).astype(np.float32), "embeddings"),
         numpy_helper.from_array(rng.normal(size=(8, classes)).astype(np.float32), "head"),
         numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.array([1], np.int64), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def convert(capsys, *args) -> tuple[int, str, str]:
    status = main(["convert", *map(str, args)])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def assert_the_graph_tokenizes_as(tokenizer, tmp_path, capsys, texts, max_length: int, pad_id: int = 0):
    """`texts` through an echo model behind --tokenizer: one text, the first few, the last few and all of them give
    tokenizers' own ids, masks and type ids, truncated to max_length and padded to the longest with pad_id."""
    echo_onnx(tmp_path / "echo.onnx")
    np.save(tmp_path / "texts.npy", np.array(texts))
    status, out, err = convert(capsys, tmp_path / "echo.onnx", "--samples", tmp_path / "texts.npy", "--tokenizer",
                               tmp_path / "tokenizer.json", "--max-length", max_length, "--out", tmp_path / "text.onnx")
    assert status == 0, err
    model = OnnxModel(tmp_path / "text.onnx")
    assert [(spec.name, spec.datatype, spec.shape) for spec in model.signature.inputs] == [("text", "BYTES", (-1,))]
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=pad_id)
    for batch in (texts, texts[:1], texts[7:9], texts[-4:]):
        expected = tokenizer.encode_batch(batch)
        got = model.run({"text": np.array(batch, dtype=object)}, [f"{name}_seen" for name in TOKEN_INPUTS])
        assert got["input_ids_seen"].tolist() == [e.ids for e in expected]
        assert got["attention_mask_seen"].tolist() == [e.attention_mask for e in expected]
        assert got["token_type_ids_seen"].tolist() == [e.type_ids for e in expected]


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_the_graph_tokenizes_as_tokenizers_does(tmp_path, capsys, lowercase):
    tokenizer = train_wordpiece(tmp_path / "tokenizer.json", lowercase)
    assert_the_graph_tokenizes_as(tokenizer, tmp_path, capsys, TEXTS, 9)


def train_byte_level_bpe(path, specials_around: bool):
    """A byte-level BPE tokenizer trained here: RoBERTa's (<s> text </s>) or GPT-2's (nothing around the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if specials_around else ["<|endoftext|>"]
    tokenizer.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if specials_around:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", tokenizer.token_to_id("</s>")),
                                                                ("<s>", tokenizer.token_to_id("<s>")))
    tokenizer.save(str(path))
    return tokenizer


# Byte-level BPE sees bytes: whitespace runs, tabs and newlines, contractions, emoji and a special token's own text.
BPE_TEXTS = TEXTS + ["  two  spaces\tand\nnewline ", "don't I'll we're", "emoji 🙂 漢字", "<s> literal </s>"]


@pytest.mark.parametrize("specials_around", [True, False], ids=["roberta", "gpt2"])
def test_a_byte_level_bpe_graph_tokenizes_as_tokenizers_does(tmp_path, capsys, specials_around):
    tokenizer = train_byte_level_bpe(tmp_path / "tokenizer.json", specials_around)
    assert any(len(tokenizer.encode(text).ids) > 12 for text in BPE_TEXTS)  # long texts are cut, keeping RoBERTa's </s>
    assert_the_graph_tokenizes_as(tokenizer, tmp_path, capsys, BPE_TEXTS, 12, tokenizer.token_to_id("<pad>") or 0)


UNIGRAM = ("expected a Unigram tokenizer of SentencePiece's families (Precompiled, Replace and Strip normalizers; a "
           "Metaspace pre-tokenizer, after a WhitespaceSplit or alone); this one has")
UNIGRAM_TEXTS = [*BPE_TEXTS[:-1], "hello   ", "\thello\n", "   ", "▁lead", "x  ▁ y", " 　x​ "]


def train_unigram(path, byte_fallback=False, pre_tokenizer=None, single="$A </s>"):
    """A Unigram tokenizer trained here as SentencePiece's families have it: a Metaspace pre-tokenizer and the text
    followed by </s> (T5's), or a WhitespaceSplit before it, as transformers writes XLM-R's and T5's; XLM-R's
    special tokens in its order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram(byte_fallback=byte_fallback))
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.Metaspace()
    alphabet = [f"<0x{byte:02X}>" for byte in range(256)] if byte_fallback else []
    tokenizer.train_from_iterator(CORPUS * 10, trainers.UnigramTrainer(
        vocab_size=150 + len(alphabet), special_tokens=["<s>", "<pad>", "</s>", "<unk>", *alphabet], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("<s>", "</s>")])
    tokenizer.save(str(path))
    return tokenizer


@pytest.mark.parametrize("form", ["metaspace", "whitespace-split", "byte-fallback"])
def test_a_unigram_graph_tokenizes_as_tokenizers_does(tmp_path, capsys, form):
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tokenizer = train_unigram(tmp_path / "tokenizer.json", form == "byte-fallback", split if form == "whitespace-split" else None)
    assert any(len(tokenizer.encode(text).ids) > 12 for text in UNIGRAM_TEXTS)  # long texts are cut, keeping the </s>
    assert_the_graph_tokenizes_as(tokenizer, tmp_path, capsys, UNIGRAM_TEXTS, 12, tokenizer.token_to_id("<pad>"))


def test_a_unigram_graph_runs_the_normalizers_steps_in_tokenizers_order(tmp_path, capsys):
    """The steps SentencePiece's converters write (Strip, then runs of spaces made one U+2581; a Replace of a string
    before them) run as tokenizers runs them, whitespace edge cases included."""
    from tokenizers import Regex, normalizers

    tokenizer = train_unigram(tmp_path / "tokenizer.json")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.Strip(left=False, right=True),
                                                 normalizers.Replace(Regex(" {2,}"), "▁")])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert_the_graph_tokenizes_as(tokenizer, tmp_path, capsys, [*UNIGRAM_TEXTS, "``quoted'' text"], 12,
                                tokenizer.token_to_id("<pad>"))


def test_a_word_with_a_letter_the_vocabulary_lacks_is_refused_where_the_graph_would_differ(tmp_path, capsys):
    """tokenizers makes such a word one [UNK], and a special token typed in a text one id; BertTokenizer keeps the
    pieces before the letter, and splits the special token's text. The graph's ids are checked against tokenizers'
    on the samples before anything is written, whatever the model answers."""
    tokenizer = train_wordpiece(tmp_path / "tokenizer.json")
    echo_onnx(tmp_path / "echo.onnx")
    tokenizer.enable_padding()
    for texts, row in ((["a film", "filmщ"], 1), (["a [MASK] film"], 0)):
        ids = tokenizer.encode_batch(texts)[row].ids  # padded to the longest of the samples
        np.save(tmp_path / "texts.npy", np.array(texts))
        status, _, err = convert(capsys, tmp_path / "echo.onnx", "--samples", tmp_path / "texts.npy", "--tokenizer",
                                 tmp_path / "tokenizer.json", "--out", tmp_path / "text.onnx")
        assert status == 2 and err.startswith(
            f"error: --tokenizer {tmp_path}/tokenizer.json: the graph tokenizes sample {row} ({texts[row]!r}) unlike "
            "tokenizers: input_ids ["), err
        assert err.endswith(f" against {ids}; a sample's text the graph cannot take (a letter its vocabulary lacks, a "
                            "special token typed in it) is refused rather than served\n")
    assert not (tmp_path / "text.onnx").exists()


def test_int32_token_inputs_get_int32_ids(tmp_path, capsys):
    tokenizer = train_wordpiece(tmp_path / "tokenizer.json")
    echo_onnx(tmp_path / "echo.onnx", ("input_ids",), TensorProto.INT32)
    np.save(tmp_path / "texts.npy", np.array(CORPUS))
    assert convert(capsys, tmp_path / "echo.onnx", "--samples", tmp_path / "texts.npy", "--tokenizer",
                   tmp_path / "tokenizer.json", "--out", tmp_path / "text.onnx")[0] == 0
    got = OnnxModel(tmp_path / "text.onnx").run({"text": np.array(CORPUS[:1], dtype=object)}, ["input_ids_seen"])
    assert got["input_ids_seen"].dtype == np.int32 and got["input_ids_seen"].tolist() == [tokenizer.encode(CORPUS[0]).ids]


def test_a_text_classifier_takes_text_through_v2_and_tf_serving_and_names_its_labels(tmp_path, capsys):
    tokenizer = train_wordpiece(tmp_path / "tokenizer.json")
    text_classifier_onnx(tmp_path / "bag.onnx", tokenizer.get_vocab_size())
    np.save(tmp_path / "texts.npy", np.array(TEXTS[:9]))
    (tmp_path / "labels.txt").write_text("negative\npositive\n")
    status, out, err = convert(capsys, tmp_path / "bag.onnx", "--samples", tmp_path / "texts.npy", "--tokenizer",
                               tmp_path / "tokenizer.json", "--labels", tmp_path / "labels.txt", "--out",
                               tmp_path / "sentiment.onnx")
    assert status == 0 and out.startswith(f"wrote {tmp_path / 'sentiment.onnx'}: checked on 9 samples, "), err
    bare = OnnxModel(tmp_path / "bag.onnx")
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(TEXTS)
    logits = bare.run({"input_ids": np.array([e.ids for e in encoded]),
                       "attention_mask": np.array([e.attention_mask for e in encoded])}, ["logits"])["logits"]
    names = np.array(["negative", "positive"])[logits.argmax(axis=1)].tolist()
    core = InferenceCore([ServedModel("sentiment", "1", runtime=OnnxModel(tmp_path / "sentiment.onnx"))])
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    status, answer, _ = call(core, "POST", "/v2/models/sentiment/infer", body)
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert outputs["class_name"]["data"] == names
    np.testing.assert_allclose(np.reshape(outputs["logits"]["data"], logits.shape), logits, rtol=1e-5, atol=1e-6)
    instances = [{"text": {"b64": base64.b64encode(text.encode()).decode()}} for text in TEXTS[:3]]
    status, answer, _ = call(core, "POST", "/v1/models/sentiment:predict", {"instances": instances})
    assert status == 200, answer
    assert [row["class_name"] for row in answer["predictions"]] == [[name] for name in names[:3]]


def test_tokenizer_mistakes_are_one_line(tmp_path, capsys):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    train_wordpiece(tmp_path / "tokenizer.json")
    echo_onnx(tmp_path / "echo.onnx")
    np.save(tmp_path / "texts.npy", np.array(CORPUS))
    common = ["--samples", tmp_path / "texts.npy", "--out", tmp_path / "x.onnx"]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    bpe.save(str(tmp_path / "bpe.json"))
    wordlevel = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    wordlevel.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    wordlevel.save(str(tmp_path / "wordlevel.json"))
    unigram = train_unigram(tmp_path / "unigram.json")
    unigram.normalizer = normalizers.NFKC()
    unigram.save(str(tmp_path / "nfkc.json"))
    unigram.normalizer, unigram.pre_tokenizer = None, pre_tokenizers.Whitespace()
    unigram.save(str(tmp_path / "whitespace.json"))
    unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(prepend_scheme="first")])
    unigram.save(str(tmp_path / "first.json"))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.add_tokens(["film"])
    unigram.save(str(tmp_path / "added.json"))
    specials_alone = json.loads((tmp_path / "unigram.json").read_text())
    specials_alone["model"]["vocab"] = specials_alone["model"]["vocab"][:4]  # <s>, <pad>, </s>, <unk>
    (tmp_path / "specials.json").write_text(json.dumps(specials_alone))
    train_byte_level_bpe(tmp_path / "roberta.json", True)
    prefixed = json.loads((tmp_path / "roberta.json").read_text())
    prefixed["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "prefixed.json").write_text(json.dumps(prefixed))
    (tmp_path / "broken.json").write_text("{not json")
    echo_onnx(tmp_path / "floats.onnx", ("features",), TensorProto.FLOAT)
    cases = {
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "bpe.json"):
            f"--tokenizer {tmp_path}/bpe.json: expected a byte-level BPE tokenizer of the GPT-2 family (a ByteLevel "
            "pre-tokenizer with GPT-2's regex, no normalizer); this one has a Whitespace pre-tokenizer",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "wordlevel.json"):
            f"--tokenizer {tmp_path}/wordlevel.json: expected a WordPiece (BERT's family), byte-level BPE (GPT-2's "
            "family) or Unigram (SentencePiece's families) tokenizer, found a WordLevel model",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "nfkc.json"): f"--tokenizer {tmp_path}/nfkc.json: {UNIGRAM} a NFKC normalizer",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "whitespace.json"):
            f"--tokenizer {tmp_path}/whitespace.json: {UNIGRAM} a Whitespace pre-tokenizer",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "first.json"):
            f"--tokenizer {tmp_path}/first.json: {UNIGRAM} a Metaspace of '\u2581', prepending first",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "added.json"):
            f"--tokenizer {tmp_path}/added.json: its added token 'film' is not special; the graph's SentencePiece "
            "takes special added tokens only",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "specials.json"):
            f"--tokenizer {tmp_path}/specials.json: its Unigram model holds special tokens alone, no pieces of text "
            "(a tokenizer written without its vocabulary?)",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "unigram.json", "--max-length", 1):
            "--max-length 1: expected room for the special tokens and one more",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "prefixed.json"):
            f"--tokenizer {tmp_path}/prefixed.json: its ByteLevel pre-tokenizer adds a prefix space, which "
            "onnxruntime-extensions' HfJsonTokenizer does not",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "roberta.json", "--max-length", 2):
            "--max-length 2: expected room for the special tokens and one more",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "nope.json"): f"--tokenizer {tmp_path}/nope.json: no such file",
        (tmp_path / "echo.onnx", "--tokenizer", tmp_path / "tokenizer.json", "--max-length", 1):
            "--max-length 1: expected at least 2, room for [CLS] and [SEP]",
        (tmp_path / "floats.onnx", "--tokenizer", tmp_path / "tokenizer.json"):
            f"--tokenizer {tmp_path}/tokenizer.json: expected a model that takes input_ids and any of attention_mask, "
            f"token_type_ids; {tmp_path}/floats.onnx takes features",
    }
    for args, message in cases.items():
        status, out, err = convert(capsys, *args, *common)
        assert (status, out, err) == (2, "", f"error: {message}\n")
    status, _, err = convert(capsys, tmp_path / "echo.onnx", "--tokenizer", tmp_path / "broken.json", *common)
    assert status == 2 and err.startswith(f"error: --tokenizer {tmp_path}/broken.json: not a Hugging Face tokenizer.json: ")
    assert not (tmp_path / "x.onnx").exists()


def test_a_pipeline_takes_text_as_it_was_fitted_and_refuses_a_tokenizer(tmp_path, capsys):
    import joblib
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train_wordpiece(tmp_path / "tokenizer.json")
    joblib.dump(make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(CORPUS, [0, 1] * 4), tmp_path / "p.joblib")
    np.save(tmp_path / "texts.npy", np.array(CORPUS))
    status, _, err = convert(capsys, tmp_path / "p.joblib", "--samples", tmp_path / "texts.npy", "--tokenizer",
                             tmp_path / "tokenizer.json", "--out", tmp_path / "x.onnx")
    assert (status, err) == (2, f"error: --tokenizer: {tmp_path}/p.joblib takes its input as it was fitted; decoding "
                                "or tokenizing in the graph is for a model that takes tensors (an .onnx, or a PyTorch "
                                "module)\n")


def test_the_runtime_loads_the_extensions_only_for_a_model_that_uses_them(tmp_path, capsys, monkeypatch):
    import importlib.util

    train_wordpiece(tmp_path / "tokenizer.json")
    echo_onnx(tmp_path / "echo.onnx")
    np.save(tmp_path / "texts.npy", np.array(CORPUS))
    assert convert(capsys, tmp_path / "echo.onnx", "--samples", tmp_path / "texts.npy", "--tokenizer",
                   tmp_path / "tokenizer.json", "--out", tmp_path / "text.onnx")[0] == 0
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "onnxruntime_extensions" else find_spec(name, *rest))
    OnnxModel(tmp_path / "echo.onnx")  # a plain model never looks for them
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/text.onnx uses operators of onnxruntime-extensions \(pre- or "
                                             r"post-processing in the graph\), and onnxruntime-extensions is not installed$"):
        OnnxModel(tmp_path / "text.onnx")


@pytest.mark.slow
def test_a_text_model_answers_text_through_the_local_stack_on_lambda_and_sagemaker(tmp_path, capsys):
    """The Lambda-faithful workers run it from the built layer, the SageMaker program from its own environment; the
    clients send JSON strings, tritonclient's binary BYTES and a text/plain body, and all get the same answer."""
    import json
    import urllib.request

    import tritonclient.http as triton
    from support import running_stack

    tokenizer = train_wordpiece(tmp_path / "tokenizer.json")
    text_classifier_onnx(tmp_path / "bag.onnx", tokenizer.get_vocab_size())
    np.save(tmp_path / "texts.npy", np.array(TEXTS[:9]))
    (tmp_path / "labels.txt").write_text("negative\npositive\n")
    assert convert(capsys, tmp_path / "bag.onnx", "--samples", tmp_path / "texts.npy", "--tokenizer",
                   tmp_path / "tokenizer.json", "--labels", tmp_path / "labels.txt", "--out", tmp_path / "sentiment.onnx")[0] == 0
    expected = OnnxModel(tmp_path / "sentiment.onnx").run({"text": np.array(CORPUS, dtype=object)}, ["class_name"])
    expected_names = [name for name in expected["class_name"].ravel()]
    config = tmp_path / "slimserve.toml"
    config.write_text('[app]\nname = "text"\n\n[defaults]\nauth = "none"\n\n'
                      '[models.sentiment]\nformat = "onnx"\nartifact = "sentiment.onnx"\n\n'
                      '[models.sentiment-gpu]\nformat = "onnx"\nartifact = "sentiment.onnx"\ntarget = "sagemaker"\n')
    with running_stack(config, tmp_path / "work") as stack:
        client = triton.InferenceServerClient(stack.gateway.url.removeprefix("http://"), network_timeout=60)
        for name in ("sentiment", "sentiment-gpu"):
            metadata = client.get_model_metadata(name)
            assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
            for binary in (False, True):
                text = triton.InferInput("text", [len(CORPUS)], "BYTES")
                text.set_data_from_numpy(np.array(CORPUS, dtype=object), binary_data=binary)
                headers = {"Content-Type": "application/octet-stream"} if binary else {}
                answer = client.infer(name, [text], outputs=[triton.InferRequestedOutput("class_name", binary_data=False)],
                                      headers=headers)
                assert [item.decode() if isinstance(item, bytes) else item
                        for item in answer.as_numpy("class_name").ravel()] == expected_names
            request = urllib.request.Request(f"{stack.gateway.url}/v2/models/{name}/infer", data=CORPUS[0].encode(),
                                             method="POST", headers={"Content-Type": "text/plain; charset=utf-8"})
            with urllib.request.urlopen(request, timeout=60) as response:
                outputs = {output["name"]: output for output in json.loads(response.read())["outputs"]}
            assert outputs["class_name"]["data"] == expected_names[:1]
