"""Hugging Face checkpoints, as a user's folder holds them (config.json, safetensors weights, tokenizer.json or
preprocessor_config.json), converted with --task: text classification, sentence embeddings and image classification.
Each checkpoint is built in the test from a transformers config with seeded weights (nothing comes from the hub),
its tokenizer trained by `tokenizers` and its images written by Pillow; the converted graph takes text or image bytes
and answers what transformers answers, with the classes named by the checkpoint's id2label."""

import json

import numpy as np
import pytest
from support import call, convert_error, run_in_extra_venv
from test_convert_tokenizer import CORPUS, TEXTS, train_byte_level_bpe, train_unigram, train_wordpiece

from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import OnnxModel

PIL = pytest.importorskip("PIL.Image")
SENTIMENTS = {0: "negative", 1: "neutral", 2: "positive"}
NONEMPTY_TEXTS = [text for text in TEXTS if text]

# Run in .venv-torch: each checkpoint saved as transformers saves one, and transformers' own answers beside it (the
# tokenizer's ids through the model; the image processor's pixels through the model).
CHECKPOINTS_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np, torch, transformers
from PIL import Image
from tokenizers import Tokenizer

folder, sentiments = Path(sys.argv[1]), json.loads(sys.argv[2])
texts = [line for line in (folder / "texts.txt").read_text().split("\\n")]
tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
encoded = tokenizer.encode_batch(texts)
ids = torch.tensor([e.ids for e in encoded])
mask = torch.tensor([e.attention_mask for e in encoded])
bert = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.token_to_id("[PAD]"))

torch.manual_seed(0)
config = transformers.BertConfig(**bert, num_labels=3, id2label={int(k): v for k, v in sentiments.items()})
classifier = transformers.BertForSequenceClassification(config).eval()
classifier.save_pretrained(folder / "bert-sentiment")
(folder / "bert-sentiment" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
with torch.no_grad():
    np.save(folder / "bert-sentiment-logits.npy", classifier(input_ids=ids, attention_mask=mask).logits.numpy())


# RoBERTa's model (positions counted from pad_token_id + 1) with tokenizer_file: <s> text </s>, <pad> is 1
def roberta_family(name, tokenizer_file, seed, config_class, model_class):
    tokenizer = Tokenizer.from_file(str(folder / tokenizer_file))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("<pad>"))
    encoded = tokenizer.encode_batch(texts)
    torch.manual_seed(seed)
    config = config_class(**{**bert, "vocab_size": tokenizer.get_vocab_size(), "pad_token_id": 1,
                             "max_position_embeddings": 66}, num_labels=3,
                          id2label={int(k): v for k, v in sentiments.items()})
    model = model_class(config).eval()
    model.save_pretrained(folder / name)
    (folder / name / "tokenizer.json").write_bytes((folder / tokenizer_file).read_bytes())
    with torch.no_grad():
        np.save(folder / f"{name}-logits.npy", model(input_ids=torch.tensor([e.ids for e in encoded]),
                attention_mask=torch.tensor([e.attention_mask for e in encoded])).logits.numpy())


roberta_family("roberta-sentiment", "bpe-tokenizer.json", 3, transformers.RobertaConfig,
               transformers.RobertaForSequenceClassification)
# XLM-R: the same model with a Unigram (SentencePiece) tokenizer
roberta_family("xlm-roberta-sentiment", "unigram-tokenizer.json", 5, transformers.XLMRobertaConfig,
               transformers.XLMRobertaForSequenceClassification)

# GPT-2: its BPE puts nothing around a text, so an empty one has no tokens to attend to (README: Limits); its
# tokenizer gives no token_type_ids, and GPT-2 gets none
gpt2_tokenizer = Tokenizer.from_file(str(folder / "gpt2-tokenizer.json"))
gpt2_tokenizer.enable_padding(pad_id=0)
encoded = gpt2_tokenizer.encode_batch([text for text in texts if text])
torch.manual_seed(4)
config = transformers.GPT2Config(vocab_size=gpt2_tokenizer.get_vocab_size(), n_embd=32, n_layer=2, n_head=2,
                                 n_positions=64, pad_token_id=0, num_labels=3,
                                 id2label={int(k): v for k, v in sentiments.items()})
gpt2 = transformers.GPT2ForSequenceClassification(config).eval()
gpt2.save_pretrained(folder / "gpt2-sentiment")
(folder / "gpt2-sentiment" / "tokenizer.json").write_bytes((folder / "gpt2-tokenizer.json").read_bytes())
with torch.no_grad():
    np.save(folder / "gpt2-sentiment-logits.npy", gpt2(input_ids=torch.tensor([e.ids for e in encoded]),
            attention_mask=torch.tensor([e.attention_mask for e in encoded])).logits.numpy())

torch.manual_seed(1)
encoder = transformers.BertModel(transformers.BertConfig(**bert)).eval()
encoder.save_pretrained(folder / "embedder")
(folder / "embedder" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
(folder / "embedder" / "modules.json").write_text(json.dumps([
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
(folder / "embedder" / "1_Pooling").mkdir()
(folder / "embedder" / "1_Pooling" / "config.json").write_text(json.dumps(
    {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
(folder / "embedder" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
tokenizer.enable_truncation(8)  # sentence-transformers keeps max_seq_length tokens
encoded = tokenizer.encode_batch(texts)
ids, mask = torch.tensor([e.ids for e in encoded]), torch.tensor([e.attention_mask for e in encoded])
with torch.no_grad():
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
weights = mask.unsqueeze(-1).float()
mean = (hidden * weights).sum(1) / weights.sum(1)
np.save(folder / "embeddings.npy", torch.nn.functional.normalize(mean, dim=-1).numpy())

torch.manual_seed(2)
vit = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, num_labels=4)  # no id2label: transformers names them LABEL_0 ...
viewer = transformers.ViTForImageClassification(vit).eval()
viewer.save_pretrained(folder / "animals")
processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                           image_std=[0.2, 0.25, 0.3])
processor.save_pretrained(folder / "animals")
images = [Image.open(path).convert("RGB") for path in sorted((folder / "images").iterdir())]
with torch.no_grad():
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    np.save(folder / "animal-logits.npy", viewer(pixel_values=pixels).logits.numpy())
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The checkpoints, and what transformers answers on the samples (texts; 32x32 PNGs, which decode
    exactly and are not resized, so the graph's pixels are the processor's)."""
    from test_convert_image import encoded, picture

    folder = tmp_path_factory.mktemp("checkpoints")
    train_wordpiece(folder / "tokenizer.json")
    train_byte_level_bpe(folder / "bpe-tokenizer.json", specials_around=True)
    train_byte_level_bpe(folder / "gpt2-tokenizer.json", specials_around=False)
    train_unigram(folder / "unigram-tokenizer.json", single="<s> $A </s>")
    (folder / "texts.txt").write_text("\n".join(TEXTS))
    np.save(folder / "texts.npy", np.array(TEXTS))
    np.save(folder / "texts-nonempty.npy", np.array(NONEMPTY_TEXTS))
    (folder / "images").mkdir()
    for index in range(6):
        (folder / "images" / f"{index}.png").write_bytes(encoded(picture(index, (32, 32)), "PNG"))
    made = run_in_extra_venv(
        "torch", "-c", CHECKPOINTS_SCRIPT, str(folder), json.dumps(SENTIMENTS)
    )
    assert made.returncode == 0, made.stderr[-3000:]
    return folder


def convert_in_torch_venv(*args) -> str:
    converted = run_in_extra_venv("torch", "-m", "slimserve", "convert", *map(str, args))
    assert converted.returncode == 0, converted.stderr[-3000:]  # torch logs its exporter warnings on stderr
    return converted.stdout


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["bert-sentiment", "roberta-sentiment", "gpt2-sentiment", "xlm-roberta-sentiment"])
def test_a_text_classifier_checkpoint_takes_text_and_names_its_classes(checkpoints, tmp_path, checkpoint):
    """BERT with its WordPiece tokenizer; RoBERTa with its byte-level BPE (<s> text </s>, padded with <pad>, the
    id RoBERTa's positions count from); GPT-2 with its byte-level BPE (nothing around the text, no token types);
    XLM-R with its Unigram tokenizer (SentencePiece's)."""
    texts = NONEMPTY_TEXTS if checkpoint == "gpt2-sentiment" else TEXTS
    out = convert_in_torch_venv(
        checkpoints / checkpoint,
        "--task",
        "text-classification",
        "--samples",
        checkpoints / ("texts-nonempty.npy" if checkpoint == "gpt2-sentiment" else "texts.npy"),
        "--out",
        tmp_path / "sentiment.onnx",
    )
    assert out.startswith(f"wrote {tmp_path / 'sentiment.onnx'}: checked on {len(texts)} samples, max |diff| ")
    logits = np.load(checkpoints / f"{checkpoint}-logits.npy")
    model = OnnxModel(tmp_path / "sentiment.onnx")
    assert [(spec.name, spec.datatype, spec.shape) for spec in model.signature.inputs] == [("text", "BYTES", (-1,))]
    core = InferenceCore([ServedModel("sentiment", "1", runtime=model)])
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    status, answer, _ = call(core, "POST", "/v2/models/sentiment/infer", body)
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    np.testing.assert_allclose(np.reshape(outputs["logits"]["data"], logits.shape), logits, rtol=1e-4, atol=1e-5)
    assert outputs["class_name"]["data"] == [SENTIMENTS[index] for index in logits.argmax(axis=1)]
    status, answer, _ = call(
        core, "POST", "/v2/models/sentiment/infer", texts[3].encode(), {"Content-Type": "text/plain"}
    )
    assert status == 200, answer
    assert {o["name"]: o["data"] for o in answer["outputs"]}["class_name"] == [SENTIMENTS[logits[3].argmax()]]


@pytest.mark.slow
def test_a_sentence_embedding_checkpoint_pools_and_normalizes_as_sentence_transformers_says(checkpoints, tmp_path):
    """Mean pooling and Normalize from modules.json, texts cut at sentence_bert_config.json's max_seq_length."""
    convert_in_torch_venv(
        checkpoints / "embedder",
        "--task",
        "sentence-embeddings",
        "--samples",
        checkpoints / "texts.npy",
        "--out",
        tmp_path / "embedder.onnx",
    )
    model = OnnxModel(tmp_path / "embedder.onnx")
    assert [spec.name for spec in model.signature.outputs] == ["sentence_embedding"]
    embeddings = model.run({"text": np.array(TEXTS, dtype=object)}, ["sentence_embedding"])["sentence_embedding"]
    np.testing.assert_allclose(embeddings, np.load(checkpoints / "embeddings.npy"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    one = model.run({"text": np.array(CORPUS[:1], dtype=object)}, ["sentence_embedding"])["sentence_embedding"]
    np.testing.assert_allclose(one, embeddings[:1], rtol=1e-4, atol=1e-5)  # padding in a batch changes nothing


@pytest.mark.slow
def test_an_image_classifier_checkpoint_takes_images_with_its_processors_size_mean_and_std(checkpoints, tmp_path):
    """Its config names no classes: they are transformers' LABEL_0 ..., the best two of each with --top-k 2."""
    out = convert_in_torch_venv(
        checkpoints / "animals",
        "--task",
        "image-classification",
        "--samples",
        checkpoints / "images",
        "--top-k",
        2,
        "--out",
        tmp_path / "animals.onnx",
    )
    assert out.startswith(f"wrote {tmp_path / 'animals.onnx'}: checked on 6 samples, max |diff| ")
    assert "  pixels against Pillow's (RGB, BILINEAR): max 0.00 levels of 255" in out
    logits = np.load(checkpoints / "animal-logits.npy")
    images = [path.read_bytes() for path in sorted((checkpoints / "images").iterdir())]
    model = OnnxModel(tmp_path / "animals.onnx")
    answer = model.run({"image": np.array(images, dtype=object)}, ["logits", "class_name"])
    np.testing.assert_allclose(answer["logits"], logits, rtol=1e-4, atol=1e-5)
    best = np.argsort(-logits, axis=1)[:, :2]
    assert answer["class_name"].tolist() == [[f"LABEL_{index}" for index in row] for row in best]


def test_checkpoint_mistakes_are_one_line(checkpoints, tmp_path, capsys):
    sentiment, texts, out = checkpoints / "bert-sentiment", checkpoints / "texts.npy", tmp_path / "m.onnx"
    assert convert_error(capsys, tmp_path, "--task", "text-classification", "--samples", texts, "--out", out) == (
        f"error: {tmp_path}: a folder, but not a Hugging Face checkpoint: expected config.json in it\n"
    )
    assert convert_error(capsys, sentiment, "--samples", texts, "--out", out) == (
        f"error: --task: {sentiment} is a Hugging Face checkpoint: expected one of text-classification, "
        "sentence-embeddings, image-classification; none is given\n"
    )
    assert convert_error(capsys, texts, "--task", "text-classification", "--samples", texts, "--out", out) == (
        f"error: --task text-classification: is for a Hugging Face checkpoint folder; {texts} is a file\n"
    )
    assert convert_error(
        capsys,
        sentiment,
        "--task",
        "sentence-embeddings",
        "--labels",
        checkpoints / "texts.txt",
        "--samples",
        texts,
        "--out",
        out,
    ) == ("error: --labels: the task sentence-embeddings answers embeddings, which have no classes to name\n")
    assert convert_error(
        capsys, sentiment, "--task", "text-classification", "--image", "32x32", "--samples", texts, "--out", out
    ) == ("error: --image: the task text-classification takes text, not images\n")
    assert convert_error(
        capsys, sentiment, "--task", "text-classification", "--max-length", "100", "--samples", texts, "--out", out
    ) == (f"error: --max-length 100: {sentiment} takes at most 64 tokens (its positions)\n")
    roberta = checkpoints / "roberta-sentiment"  # 66 positions, counted from pad_token_id + 1
    assert convert_error(capsys, roberta, "--task", "text-classification", "--max-length", "65", "--samples", texts,
                         "--out", out) == f"error: --max-length 65: {roberta} takes at most 64 tokens (its positions)\n"
    assert convert_error(
        capsys, sentiment, "--task", "text-classification", "--samples", texts, "--out", tmp_path / "m.tflite"
    ) == (
        f"error: {tmp_path}/m.tflite: a Hugging Face checkpoint converts to ONNX: expected an output path ending "
        "in .onnx\n"
    )
    images = checkpoints / "images"
    assert convert_error(capsys, checkpoints / "animals", "--task", "text-classification", "--samples", texts,
                         "--out", out) == (
        f"error: --task text-classification: {checkpoints}/animals holds a vit model, which takes images; "
        "text-classification is for one that takes text\n")
    assert convert_error(capsys, sentiment, "--task", "image-classification", "--samples", images, "--out", out) == (
        f"error: --task image-classification: {sentiment} holds a bert model, which takes text; "
        "image-classification is for one that takes images\n")
    assert convert_error(capsys, tmp_path / "nowhere", "--task", "text-classification", "--samples", texts,
                         "--out", out) == (
        f"error: --task text-classification: is for a Hugging Face checkpoint folder; {tmp_path}/nowhere is not "
        "there\n")
    assert convert_error(capsys, sentiment, "--task", "text-classification", "--samples", images, "--out", out) == (
        f"error: {images}: expected samples in a .npy, .npz or .csv file, found a folder\n")
    untokenized = tmp_path / "untokenized"
    untokenized.mkdir()
    (untokenized / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30}))
    assert convert_error(capsys, untokenized, "--task", "text-classification", "--samples", texts, "--out", out) == (
        f"error: {untokenized}: has no tokenizer.json: give the model's own with --tokenizer\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "vit", "num_channels": 3}))
    processor = bare / "preprocessor_config.json"
    assert convert_error(capsys, bare, "--task", "image-classification", "--samples", images, "--out", out) == (
        f"error: {bare}: has no preprocessor_config.json: give the model's image size with --image HxW\n")
    refusals = {
        json.dumps({"size": {"shortest_edge": 224}, "do_center_crop": True}): "its processor resizes by "
            "{'shortest_edge': 224} and crops; the graph resizes to one size, bilinearly: give the size with --image "
            "HxW to accept that (the mean and std stay the processor's)",
        json.dumps({"size": {"height": 32, "width": 32}, "resample": 3}): "its processor resamples with resample=3 "
            "(Pillow's BICUBIC); the graph resizes to one size, bilinearly: give the size with --image HxW to accept "
            "that (the mean and std stay the processor's)",
        json.dumps({"size": {"height": 32, "width": 32}, "do_rescale": False}): "do_rescale false: the graph scales "
            "pixels by 1/255",
        json.dumps({"size": {"height": 32, "width": 32}, "rescale_factor": 1.0}): "rescale_factor 1.0: the graph "
            "scales pixels by 1/255",
        "[1, 2]": "expected a JSON object, found a list",
    }
    for spec, message in refusals.items():
        processor.write_text(spec)
        assert convert_error(capsys, bare, "--task", "image-classification", "--samples", images, "--out", out) == (
            f"error: {processor}: {message}\n")
    (bare / "config.json").write_text("{not json")
    assert convert_error(capsys, bare, "--task", "image-classification", "--samples", images, "--out", out
                         ).startswith(f"error: {bare}/config.json: not a Hugging Face config: ")
    assert not list(tmp_path.glob("m.*"))


def test_image_size_given_keeps_the_processors_mean_and_std(checkpoints):
    """--image HxW replaces the processor's size only; its mean and std stay, unless --mean and --std are given."""
    from slimserve.modeltools.convert import Processing
    from slimserve.modeltools.huggingface import checkpoint_processing, read_config

    animals = checkpoints / "animals"
    config = read_config(animals)
    chosen = checkpoint_processing(animals, "image-classification", config, Processing(image="48x40"))
    assert (chosen.image, chosen.mean, chosen.std) == ("48x40", "0.5,0.4,0.3", "0.2,0.25,0.3")
    chosen = checkpoint_processing(animals, "image-classification", config, Processing(image="48x40", mean="0,0,0"))
    assert (chosen.image, chosen.mean, chosen.std) == ("48x40", "0,0,0", "0.2,0.25,0.3")
    chosen = checkpoint_processing(animals, "image-classification", config, Processing())
    assert (chosen.image, chosen.mean, chosen.std) == ("32x32", "0.5,0.4,0.3", "0.2,0.25,0.3")


def test_a_checkpoint_without_transformers_names_the_extra(checkpoints, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torch", None)
    assert convert_error(
        capsys,
        checkpoints / "bert-sentiment",
        "--task",
        "text-classification",
        "--samples",
        checkpoints / "texts.npy",
        "--out",
        tmp_path / "m.onnx",
    ) == (
        f"error: {checkpoints}/bert-sentiment: converting a Hugging Face checkpoint needs torch, which is not installed: "
        "pip install 'slimserve[huggingface]'\n"
    )
