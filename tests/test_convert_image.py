"""--image: a model that takes a batch of RGB images as floats takes encoded JPEG or PNG bytes instead, decoded,
resized and normalized inside the graph by onnxruntime-extensions and ONNX's own Resize. Its answers equal the model's
own on Pillow's preprocessing of the same images (labels identical, values within the bound the README measures), a
batch of n images gives n answers, every protocol carries the bytes, and a damaged image is the client's mistake,
never the end of the serving process."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import call, convert_error

from slimserve.cli import main
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.images import IMAGE_INPUTS, image_problem
from slimserve.lambda_handlers.runtimes import OnnxModel

PIL = pytest.importorskip("PIL.Image")
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
LABELS = ["cat", "dog", "bird", "fish"]


def conv_net(path, layout="NCHW", side=32, opset=17, elem_type=TensorProto.FLOAT):
    """A small seeded classifier over images: convolution, ReLU, average pool, logits of four classes."""
    rng = np.random.default_rng(0)
    shape = ["N", 3, side, side] if layout == "NCHW" else ["N", side, side, 3]
    nodes, pixels = [], "pixels"
    if elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [pixels], ["float_pixels"], to=TensorProto.FLOAT))
        pixels = "float_pixels"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [pixels], ["channels_first"], perm=[0, 3, 1, 2]))
        pixels = "channels_first"
    nodes += [helper.make_node("Conv", [pixels, "kernel", "bias"], ["features"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["features"], ["active"]),
              helper.make_node("GlobalAveragePool", ["active"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "head", "head_bias"], ["logits"])]
    weights = {"kernel": (8, 3, 3, 3), "bias": (8,), "head": (8, 4), "head_bias": (4,)}
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("pixels", elem_type, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(size=size).astype(np.float32), name) for name, size in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def picture(index: int, size=(160, 120)):
    """An RGB picture with gradients, sharp edges and a coloured disc, different for each index."""
    from PIL import ImageDraw

    width, height = size
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.stack([(columns * (index + 1)) % 256, rows * 255 // height, (rows + columns) // 2 % 256], -1)
    image = PIL.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 8 + index, height // 6, width // 2 + index, height * 5 // 6),
                                  fill=(200, 40 * index % 256, 40))
    return image


def encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# What clients send: PNG of every colour type, JPEG baseline (4:4:4 and 4:2:0), progressive and grey, larger and
# smaller than the model's 32x32 (so both down- and upscaled).
SAMPLE_IMAGES = {
    "rgb.png": lambda: encoded(picture(0), "PNG"),
    "rgba.png": lambda: encoded(picture(1).convert("RGBA"), "PNG"),
    "grey.png": lambda: encoded(picture(2).convert("L"), "PNG"),
    "palette.png": lambda: encoded(picture(3).convert("P"), "PNG"),
    "small.png": lambda: encoded(picture(4, (20, 24)), "PNG"),
    "full-colour.jpg": lambda: encoded(picture(5), "JPEG", quality=90, subsampling=0),
    "subsampled.jpg": lambda: encoded(picture(6, (224, 224)), "JPEG", quality=85),
    "progressive.jpg": lambda: encoded(picture(7), "JPEG", progressive=True),
    "grey.jpg": lambda: encoded(picture(8).convert("L"), "JPEG"),
}


def write_images(folder, names=tuple(SAMPLE_IMAGES)) -> dict[str, bytes]:
    folder.mkdir(exist_ok=True)
    images = {name: SAMPLE_IMAGES[name]() for name in names}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return dict(sorted(images.items()))


def pillow_pixels(images, layout="NCHW", side=32, mean=MEAN, std=STD) -> np.ndarray:
    """The client's own preprocessing, written out: Pillow's RGB, BILINEAR resize, [0, 1], normalized."""
    mean, std = (np.array([float(v) for v in text.split(",")], dtype=np.float32) for text in (mean, std))
    rows = [(np.asarray(PIL.open(io.BytesIO(data)).convert("RGB").resize((side, side), PIL.Resampling.BILINEAR),
                        dtype=np.float32) / 255 - mean) / std for data in images]
    batch = np.stack(rows)
    return batch.transpose(0, 3, 1, 2) if layout == "NCHW" else batch


def convert(capsys, *args) -> tuple[int, str, str]:
    status = main(["convert", *map(str, args)])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """cnn.onnx converted with --image 32x32 --mean --std --labels, on every kind of sample image."""
    folder = tmp_path_factory.mktemp("image")
    conv_net(folder / "cnn.onnx")
    images = write_images(folder / "samples")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    status = main(["convert", str(folder / "cnn.onnx"), "--image", "32x32", "--mean", MEAN, "--std", STD,
                   "--labels", str(folder / "labels.txt"), "--samples", str(folder / "samples"),
                   "--out", str(folder / "classifier.onnx")])
    assert status == 0
    return folder, images, OnnxModel(folder / "classifier.onnx")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["FP32", "FP16"])
def test_an_image_model_answers_as_on_pillows_preprocessing(tmp_path, capsys, layout, elem_type):
    conv_net(tmp_path / "cnn.onnx", layout, elem_type=elem_type)
    images = write_images(tmp_path / "samples")
    status, out, err = convert(capsys, tmp_path / "cnn.onnx", "--image", "32x32", "--mean", MEAN, "--std", STD,
                               "--samples", tmp_path / "samples", "--out", tmp_path / "image.onnx")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path}/image.onnx: checked on {len(images)} samples, max |diff| ")
    assert lines[1].startswith("  pixels against Pillow's (RGB, BILINEAR): max ")
    assert lines[2].startswith("  logits on Pillow's pixels: top class agrees on 100.00%, max |diff| ")
    served = OnnxModel(tmp_path / "image.onnx")
    assert [(spec.name, spec.datatype, spec.shape) for spec in served.signature.inputs] == [("image", "BYTES", (-1,))]
    got = served.run({"image": np.array(list(images.values()), dtype=object)}, ["logits"])["logits"]
    bare = OnnxModel(tmp_path / "cnn.onnx")
    pixels = pillow_pixels(images.values(), layout).astype(np.float16 if elem_type == TensorProto.FLOAT16 else np.float32)
    expected = bare.run({"pixels": pixels}, ["logits"])["logits"]
    assert got.shape == (len(images), 4)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    # JPEG's 4:2:0 colour and Resize's rounding put the graph's pixels up to 10 levels from Pillow's (README)
    np.testing.assert_allclose(got, expected, atol=0.1, rtol=0.1)
    # one image at a time answers as in the batch: the Loop decodes each alone
    for index, data in enumerate(images.values()):
        alone = served.run({"image": np.array([data], dtype=object)}, ["logits"])["logits"]
        np.testing.assert_allclose(alone[0], got[index], rtol=1e-6, atol=1e-6)


def test_lossless_images_reach_the_model_as_pillows_pixels_within_two_levels(tmp_path):
    """PNG and 4:4:4 JPEG decode to Pillow's pixels exactly; the antialiased resize rounds a level or two the other
    way on a few values. An identity model shows the pixels the graph makes."""
    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["seen"])], "identity",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("seen", TensorProto.FLOAT, ["N", 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "identity.onnx")
    images = write_images(tmp_path / "samples", ("rgb.png", "rgba.png", "grey.png", "full-colour.jpg", "small.png"))
    assert main(["convert", str(tmp_path / "identity.onnx"), "--image", "32x32", "--samples", str(tmp_path / "samples"),
                 "--out", str(tmp_path / "pixels.onnx")]) == 0
    seen = OnnxModel(tmp_path / "pixels.onnx").run({"image": np.array(list(images.values()), dtype=object)}, ["seen"])
    levels = np.abs(seen["seen"] - pillow_pixels(images.values(), mean="0,0,0", std="1,1,1")) * 255
    assert levels.max() <= 2 + 1e-3
    assert (levels > 1e-3).mean() < 0.05


def test_the_labelled_classifier_names_each_images_class_through_every_protocol(classifier):
    folder, images, served = classifier
    batch = np.array(list(images.values()), dtype=object)
    expected = served.run({"image": batch}, ["class_name", "class_score", "logits"])
    bare = OnnxModel(folder / "cnn.onnx").run({"pixels": pillow_pixels(images.values())}, ["logits"])["logits"]
    assert [name.decode() if isinstance(name, bytes) else name for name in expected["class_name"].ravel()] == [
        LABELS[index] for index in bare.argmax(axis=1)]
    names = [name.decode() if isinstance(name, bytes) else name for name in expected["class_name"].ravel()]
    core = InferenceCore([ServedModel("pets", "1", runtime=served)])
    status, metadata, _ = call(core, "GET", "/v2/models/pets")
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    # V2 JSON with base64 BYTES, a batch of all
    b64 = [{"b64": base64.b64encode(data).decode()} for data in images.values()]
    status, body, _ = call(core, "POST", "/v2/models/pets/infer",
                           {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(b64)], "data": b64}]})
    outputs = {output["name"]: output for output in body["outputs"]}
    assert status == 200 and outputs["class_name"]["data"] == names
    # TF Serving's {"b64": ...}
    status, body, _ = call(core, "POST", "/v1/models/pets:predict", {"instances": b64})
    assert status == 200 and [row["class_name"] for row in body["predictions"]] == [[name] for name in names]
    # the V2 binary extension, as tritonclient writes it
    import tritonclient.http as triton

    tensor = triton.InferInput("image", [len(batch)], "BYTES")
    tensor.set_data_from_numpy(batch, binary_data=True)
    request, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton.InferRequestedOutput("class_name", binary_data=False)])
    status, body, _ = call(core, "POST", "/v2/models/pets/infer", request,
                           {"Inference-Header-Content-Length": str(header_length)})
    assert status == 200 and body["outputs"][0]["data"] == names
    # one raw image/jpeg or image/png body
    for (name, data), label in zip(images.items(), names):
        media_type = "image/png" if name.endswith(".png") else "image/jpeg"
        status, body, _ = call(core, "POST", "/v2/models/pets/infer", data, {"Content-Type": media_type})
        outputs = {output["name"]: output for output in body["outputs"]}
        assert (status, outputs["class_name"]["data"]) == (200, [label])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"GIF89a" + bytes(40), "it starts with b'GIF89a\\x00\\x00', neither JPEG's b'\\xff\\xd8' nor PNG's "
                                "b'\\x89PNG\\r\\n\\x1a\\n'"),
        (b"", "it starts with b'', neither JPEG's b'\\xff\\xd8' nor PNG's b'\\x89PNG\\r\\n\\x1a\\n'"),
        ("truncated", "it ends before its end-of-image marker (truncated)"),
        ("headers only", "it ends before its end-of-image marker (truncated)"),
        ("no scan", "it ends before any scan of image data"),
        ("cmyk", "its frame has 4 colour components; 1 (grey) or 3 (colour) are decoded"),
        ("arithmetic", "its coding (start-of-frame 0xC9: lossless, hierarchical or arithmetic) is not decoded"),
    ],
)
def test_an_image_the_decoder_cannot_take_is_the_clients_mistake_in_one_line(classifier, body, error):
    _, images, served = classifier
    jpeg = images["full-colour.jpg"]
    scan = jpeg.index(b"\xff\xda")
    frame = jpeg.index(b"\xff\xc0")
    bodies = {
        "truncated": jpeg[: len(jpeg) * 2 // 3],
        "headers only": jpeg[:scan],
        "no scan": jpeg[:scan] + b"\xff\xd9",
        "cmyk": encoded(picture(0).convert("CMYK"), "JPEG"),
        "arithmetic": jpeg[:frame] + b"\xff\xc9" + jpeg[frame + 2:],
    }
    body = bodies.get(body, body)
    core = InferenceCore([ServedModel("pets", "1", runtime=served)])
    status, answer, _ = call(core, "POST", "/v2/models/pets/infer", body, {"Content-Type": "image/jpeg"})
    assert (status, answer) == (400, {"error": f"input 'image': image 0 is not a JPEG or PNG image the model can "
                                               f"decode: {error}"})
    # and the model still answers
    status, _, _ = call(core, "POST", "/v2/models/pets/infer", jpeg, {"Content-Type": "image/jpeg"})
    assert status == 200


def test_a_png_the_decoder_refuses_is_the_clients_mistake(classifier):
    _, images, served = classifier
    core = InferenceCore([ServedModel("pets", "1", runtime=served)])
    png = images["rgb.png"]
    status, answer, _ = call(core, "POST", "/v2/models/pets/infer", png[: len(png) // 2], {"Content-Type": "image/png"})
    assert (status, answer) == (400, {"error": "input 'image': an image the model cannot decode: Error during png creation"})


FUZZ = """
import random, sys
import numpy as np
from slimserve.lambda_handlers.errors import InvalidInput
from slimserve.lambda_handlers.runtimes import OnnxModel
model = OnnxModel(sys.argv[1])
seeds = [open(path, "rb").read() for path in sys.argv[2:]]
rng = random.Random(0)
answered = refused = 0
for case in range(int(1500)):
    data = bytearray(rng.choice(seeds))
    kind = rng.random()
    if kind < 0.3:
        data = data[: rng.randrange(2, len(data))]
    elif kind < 0.8:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(2, len(data))] = rng.randrange(256)
    else:
        at = rng.randrange(2, len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    try:
        model.run({"image": np.array([bytes(data)], dtype=object)}, ["logits"])
        answered += 1
    except InvalidInput:
        refused += 1
    except Exception as error:  # the decoder's own refusal (PNG), raised through ONNX Runtime: still alive
        refused += 1
print(answered, refused)
"""


def test_damaged_jpegs_never_end_the_serving_process(classifier):
    """onnxruntime-extensions' JPEG decoder calls exit() on a damaged header: 1,500 damaged JPEGs (truncated,
    bytes changed, bytes inserted) are each answered or refused, and the process that serves them lives on."""
    folder, _, _ = classifier
    seeds = [folder / "samples" / name for name in ("full-colour.jpg", "subsampled.jpg", "progressive.jpg", "grey.jpg")]
    done = subprocess.run([sys.executable, "-c", FUZZ, str(folder / "classifier.onnx"), *map(str, seeds)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    answered, refused = map(int, done.stdout.split())
    assert answered + refused == 1500 and answered > 100 and refused > 100


def test_the_image_walk_refuses_what_libjpeg_would_end_the_process_for(classifier):
    _, images, _ = classifier
    jpeg = images["full-colour.jpg"]
    huffman = jpeg.index(b"\xff\xc4")
    assert image_problem(jpeg) is None and image_problem(images["rgb.png"]) is None
    assert image_problem(jpeg[:huffman] + b"\xff\xa4" + jpeg[huffman + 2:]) == (
        "it has a marker 0xA4 the decoder does not take")
    scan = jpeg.index(b"\xff\xda")
    # the scan's first component asks for DC table 3, which no segment defines
    damaged = bytearray(jpeg)
    damaged[scan + 6] = 0x31
    assert image_problem(bytes(damaged)) == "a scan uses DC Huffman table 3, which no segment before it defines"


def test_the_converted_model_names_its_image_input_in_its_metadata(classifier):
    folder, _, _ = classifier
    model = onnx.load(folder / "classifier.onnx")
    assert {prop.key: prop.value for prop in model.metadata_props}[IMAGE_INPUTS] == "image"
    assert [(value.name, value.type.tensor_type.elem_type) for value in model.graph.input] == [
        ("image", TensorProto.UINT8), ("image_length", TensorProto.INT64)]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--image", "224"], "--image 224: expected HEIGHTxWIDTH in pixels, such as 224x224"),
        (["--image", "0x32"], "--image 0x32: expected sides of at least 1 pixel"),
        (["--image", "32x32", "--mean", "0.5,0.5"], "--mean 0.5,0.5: expected three numbers R,G,B, such as "
                                                     "0.485,0.456,0.406"),
        (["--image", "32x32", "--std", "1,0,1"], "--std 1,0,1: a channel's standard deviation cannot be 0"),
        (["--mean", MEAN], "--mean: normalizes the images of --image (or of an image checkpoint), none is given"),
        (["--image", "64x64"], "--image 64x64: {cnn} takes images of 32x32 ([-1, 3, 32, 32])"),
    ],
)
def test_image_options_a_user_gets_wrong_are_one_line(tmp_path, capsys, args, error):
    conv_net(tmp_path / "cnn.onnx")
    write_images(tmp_path / "samples", ("rgb.png",))
    got = convert_error(capsys, tmp_path / "cnn.onnx", *args, "--samples", tmp_path / "samples",
                        "--out", tmp_path / "out.onnx")
    assert got == f"error: {error.format(cnn=tmp_path / 'cnn.onnx')}\n"
    assert not (tmp_path / "out.onnx").exists()


def test_image_samples_and_models_a_user_gets_wrong_are_one_line(tmp_path, capsys):
    conv_net(tmp_path / "cnn.onnx")
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "rows.npy", np.zeros((2, 3), np.float32))
    refuse = lambda model, samples, *more: convert_error(  # noqa: E731
        capsys, model, "--image", "32x32", "--samples", samples, *more, "--out", tmp_path / "out.onnx")
    assert refuse(tmp_path / "cnn.onnx", tmp_path / "empty") == (
        f"error: --samples {tmp_path}/empty: expected JPEG or PNG images (.jpg, .jpeg, .png); the folder has none\n")
    assert refuse(tmp_path / "cnn.onnx", tmp_path / "rows.npy") == (
        f"error: --samples {tmp_path}/rows.npy: with --image, expected a JPEG or PNG image or a folder of them, "
        "found a .npy file\n")
    assert refuse(tmp_path / "cnn.onnx", tmp_path / "missing.jpg") == (
        f"error: --samples {tmp_path}/missing.jpg: no such image file\n")
    (tmp_path / "cut.jpg").write_bytes(SAMPLE_IMAGES["full-colour.jpg"]()[:300])
    assert refuse(tmp_path / "cnn.onnx", tmp_path / "cut.jpg").startswith(
        f"error: --samples {tmp_path}/cut.jpg: ")
    (tmp_path / "fake.png").write_bytes(b"not an image at all")
    assert refuse(tmp_path / "cnn.onnx", tmp_path / "fake.png").startswith(
        f"error: --samples {tmp_path}/fake.png: Pillow cannot read it as an image: ")
    write_images(tmp_path / "samples", ("rgb.png",))
    graph = helper.make_graph([helper.make_node("Identity", ["rows"], ["same"])], "rows",
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("same", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "rows.onnx")
    assert refuse(tmp_path / "rows.onnx", tmp_path / "samples") == (
        f"error: --image: expected a model whose one input is a batch of RGB images, [N, 3, H, W] or [N, H, W, 3]; "
        f"{tmp_path}/rows.onnx takes [-1, 4]\n")
    assert refuse(tmp_path / "cnn.onnx", tmp_path / "samples", "--tokenizer", tmp_path / "tokenizer.json") == (
        "error: --image, --tokenizer: a model takes one kind of raw input; give one of them\n")


def test_a_scikit_learn_model_is_not_given_an_image_decoder(tmp_path, capsys):
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(features, labels), tmp_path / "iris.joblib")
    write_images(tmp_path / "samples", ("rgb.png",))
    assert convert_error(capsys, tmp_path / "iris.joblib", "--image", "32x32", "--samples", tmp_path / "samples",
                         "--out", tmp_path / "out.onnx") == (
        f"error: --image: {tmp_path}/iris.joblib takes its input as it was fitted; decoding or tokenizing in the "
        "graph is for a model that takes tensors (an .onnx, or a PyTorch module)\n")


@pytest.mark.slow
def test_an_image_model_answers_jpeg_through_the_local_stack_on_lambda_and_sagemaker(classifier, tmp_path):
    """The Lambda-faithful workers run it from the built layer, the SageMaker program from its own environment;
    the API passes image/jpeg and image/png bodies through as binary media types."""
    import urllib.request

    import tritonclient.http as triton
    from support import running_stack

    folder, images, served = classifier
    batch = np.array(list(images.values()), dtype=object)
    names = [name.decode() if isinstance(name, bytes) else name
             for name in served.run({"image": batch}, ["class_name"])["class_name"].ravel()]
    (tmp_path / "pets.onnx").write_bytes((folder / "classifier.onnx").read_bytes())
    config = tmp_path / "slimserve.toml"
    config.write_text('[app]\nname = "images"\n\n[defaults]\nauth = "none"\n\n'
                      '[models.pets]\nformat = "onnx"\nartifact = "pets.onnx"\n\n'
                      '[models.pets-gpu]\nformat = "onnx"\nartifact = "pets.onnx"\ntarget = "sagemaker"\n')
    with running_stack(config, tmp_path / "work") as stack:
        client = triton.InferenceServerClient(stack.gateway.url.removeprefix("http://"), network_timeout=60)
        for model in ("pets", "pets-gpu"):
            assert client.get_model_metadata(model)["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
            tensor = triton.InferInput("image", [len(batch)], "BYTES")
            tensor.set_data_from_numpy(batch, binary_data=True)
            answer = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("class_name", binary_data=False)],
                                  headers={"Content-Type": "application/octet-stream"})
            assert [item.decode() if isinstance(item, bytes) else item
                    for item in answer.as_numpy("class_name").ravel()] == names
            for (name, data), label in zip(images.items(), names):
                media_type = "image/png" if name.endswith(".png") else "image/jpeg"
                request = urllib.request.Request(f"{stack.gateway.url}/v2/models/{model}/infer", data=data,
                                                 method="POST", headers={"Content-Type": media_type})
                with urllib.request.urlopen(request, timeout=60) as response:
                    outputs = {output["name"]: output for output in json.loads(response.read())["outputs"]}
                assert outputs["class_name"]["data"] == [label]
            damaged = images["full-colour.jpg"][:200]
            request = urllib.request.Request(f"{stack.gateway.url}/v2/models/{model}/infer", data=damaged,
                                             method="POST", headers={"Content-Type": "image/jpeg"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            assert refused.value.code == 400
            assert json.loads(refused.value.read())["error"] == (
                "input 'image': image 0 is not a JPEG or PNG image the model can decode: it ends before its "
                "end-of-image marker (truncated)")


# A PyTorch image classifier saved whole, and its own answers on Pillow's pixels of the sample images.
TORCH_IMAGE_SCRIPT = """
import sys, numpy as np, torch
folder = sys.argv[1]
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                          torch.nn.Flatten(), torch.nn.Linear(6, 4))
torch.save(net, f"{folder}/net.pt")
with torch.no_grad():
    np.save(f"{folder}/expected.npy", net.eval()(torch.from_numpy(np.load(f"{folder}/pixels.npy"))).numpy())
"""


@pytest.mark.slow
def test_a_pytorch_module_takes_images_in_its_own_layout(tmp_path):
    """PyTorch modules are NCHW: the module is exported on Pillow's pixels, then put behind the decoder."""
    from support import run_in_extra_venv

    images = write_images(tmp_path / "images", ("rgb.png", "full-colour.jpg", "grey.png"))
    np.save(tmp_path / "pixels.npy", pillow_pixels(images.values()))
    saved = run_in_extra_venv("torch", "-c", TORCH_IMAGE_SCRIPT, str(tmp_path))
    assert saved.returncode == 0, saved.stderr[-3000:]
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    converted = run_in_extra_venv("torch", "-m", "slimserve", "convert", str(tmp_path / "net.pt"), "--samples",
                                  str(tmp_path / "images"), "--image", "32x32", "--mean", MEAN, "--std", STD,
                                  "--labels", str(tmp_path / "labels.txt"), "--out", str(tmp_path / "net.onnx"))
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert converted.stdout.startswith(f"wrote {tmp_path / 'net.onnx'}: checked on 3 samples, max |diff| ")
    expected = np.load(tmp_path / "expected.npy")
    answer = OnnxModel(tmp_path / "net.onnx").run({"image": np.array(list(images.values()), dtype=object)},
                                                  ["output", "class_name"])
    # PNG and 4:4:4 JPEG decode as Pillow does; the resize rounds unlike it by a level or two (6.8e-5 measured)
    np.testing.assert_allclose(answer["output"], expected, atol=1e-3)
    assert answer["class_name"].ravel().tolist() == [LABELS[index] for index in expected.argmax(axis=1)]
