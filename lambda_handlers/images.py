"""Encoded images as a model's graph takes them, and the checks that keep a bad one from its decoder.

A model converted with `--image` decodes JPEG and PNG inside its graph (onnxruntime-extensions' DecodeImage). ONNX
Runtime's Python binding carries string tensors as UTF-8 text only, so the graph cannot take the bytes as a string
tensor: it takes them as `NAME` (UINT8 [N, longest], each image's bytes zero-padded) and `NAME_length` (INT64 [N]),
and the model's metadata (IMAGE_INPUTS) names NAME. Clients see one BYTES input NAME of shape [-1].

The decoder's JPEG path uses libjpeg's default error handler, which ends the process (exit status 1) on a damaged
header, and a source that suspends, which loops for ever on some truncated files (onnxruntime-extensions 0.15.2,
operators/vision/image_decoder.hpp). So every JPEG is walked here first, segment by segment, against the rules
libjpeg enforces with a fatal error, to its end-of-image marker; what fails is refused as the client's mistake.
PNG is decoded under libpng's own error recovery; only its signature is checked here.
"""

import numpy as np

from .errors import InvalidInput

IMAGE_INPUTS = "slimserve.image_inputs"
"""The model metadata key naming its encoded-image inputs, comma-separated."""
LENGTH_SUFFIX = "_length"
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_START = b"\xff\xd8"
# Start-of-frame markers libjpeg decodes: baseline, extended sequential and progressive, Huffman-coded.
DECODED_FRAMES = {0xC0, 0xC1, 0xC2}
OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length: TEM, RST0-7
# Markers libjpeg reads past (application data, comments); any marker not named here ends it ("Unsupported marker").
SKIPPED = {*range(0xE0, 0xF0), 0xFE}
MAX_BLOCKS_IN_MCU = 10  # libjpeg's D_MAX_BLOCKS_IN_MCU
MAX_SIDE, MAX_PIXELS = 16384, 100 * 1024 * 1024  # the decoder's own limits


def image_inputs(metadata: dict[str, str]) -> tuple[str, ...]:
    return tuple(name for name in metadata.get(IMAGE_INPUTS, "").split(",") if name)


def pack(name: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """A BYTES array of encoded images as the graph takes them: each checked, zero-padded to the longest."""
    items = images.reshape(-1)
    for index, item in enumerate(items):
        if not isinstance(item, (bytes, bytearray)):
            raise InvalidInput(f"input {name!r}: image {index} is {type(item).__name__}, not the bytes of an image")
        problem = image_problem(bytes(item))
        if problem:
            raise InvalidInput(
                f"input {name!r}: image {index} is not a JPEG or PNG image the model can decode: {problem}"
            )
    lengths = np.array([len(item) for item in items], dtype=np.int64)
    padded = np.zeros((len(items), int(lengths.max(initial=0))), dtype=np.uint8)
    for row, item in zip(padded, items):
        row[: len(item)] = np.frombuffer(item, dtype=np.uint8)
    return {name: padded, f"{name}{LENGTH_SUFFIX}": lengths}


def image_problem(data: bytes) -> str | None:
    """Why the decoder must not see `data`, or None for a PNG or a JPEG that is whole and well formed."""
    if data.startswith(PNG_SIGNATURE):
        return None
    if not data.startswith(JPEG_START):
        return f"it starts with {data[:8]!r}, neither JPEG's {JPEG_START!r} nor PNG's {PNG_SIGNATURE!r}"
    try:
        return _JpegWalk(data).problem()
    except IndexError:
        return "it ends before its end-of-image marker (truncated)"
    except _Malformed as error:
        return str(error)


class _JpegWalk:
    """A JPEG's segments in order; the entropy-coded data of each scan is skipped to the next marker."""

    def __init__(self, data: bytes):
        self.data, self.position = data, 2
        self.components: dict[int, tuple[int, int, int]] = {}  # id -> horizontal, vertical sampling, quant table
        self.progressive = False
        self.tables: set[tuple[str, int]] = set()  # ("dc" | "ac" | "quant", number)

    def problem(self) -> str | None:
        scans = 0
        while True:
            marker = self._marker()
            if marker == 0xD9:
                return None if scans else "it ends before any scan of image data"
            if marker == 0xD8:
                return "it has a second start-of-image marker"
            if marker in STANDALONE:
                continue
            segment = self._segment()
            if marker in OTHER_FRAMES:
                return (
                    f"its coding (start-of-frame 0x{marker:02X}: lossless, hierarchical or arithmetic) is not decoded"
                )
            found = None
            if marker not in (*DECODED_FRAMES, 0xC4, 0xDB, 0xDD, 0xDA, *SKIPPED):
                found = f"it has a marker 0x{marker:02X} the decoder does not take"
            elif marker in DECODED_FRAMES:
                found = self._frame(segment, marker)
            elif marker == 0xC4:
                found = self._huffman_tables(segment)
            elif marker == 0xDB:
                found = self._quantization_tables(segment)
            elif marker == 0xDD and len(segment) != 2:
                found = "its restart interval segment is not 2 bytes"
            elif marker == 0xDA:
                found = self._scan(segment)
                scans += 1
                self._skip_entropy_coded_data()
            if found:
                return found

    def _marker(self) -> int:
        if self.data[self.position] != 0xFF:
            raise _Malformed(f"byte {self.position} is 0x{self.data[self.position]:02X} where a marker must start")
        while self.data[self.position] == 0xFF:  # fill bytes
            self.position += 1
        marker = self.data[self.position]
        self.position += 1
        return marker

    def _segment(self) -> bytes:
        length = int.from_bytes(self.data[self.position : self.position + 2], "big")
        if length < 2:
            raise _Malformed(f"a segment at byte {self.position} claims {length} bytes")
        end = self.position + length
        if end > len(self.data):
            raise IndexError
        segment, self.position = self.data[self.position + 2 : end], end
        return segment

    def _frame(self, segment: bytes, marker: int) -> str | None:
        if self.components:
            return "it has a second start-of-frame segment"
        if len(segment) < 6:
            return "its start-of-frame segment is short"
        precision, count = segment[0], segment[5]
        height, width = (int.from_bytes(segment[i : i + 2], "big") for i in (1, 3))
        if precision != 8:
            return f"its samples have {precision} bits; 8 are decoded"
        if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or width * height > MAX_PIXELS:
            return f"its frame is {width}x{height} pixels; up to {MAX_SIDE} a side and {MAX_PIXELS} in all are decoded"
        if count not in (1, 3) or len(segment) != 6 + 3 * count:
            return f"its frame has {count} colour components; 1 (grey) or 3 (colour) are decoded"
        for offset in range(6, 6 + 3 * count, 3):
            identifier, sampling, table = segment[offset], segment[offset + 1], segment[offset + 2]
            horizontal, vertical = sampling >> 4, sampling & 0x0F
            if not (1 <= horizontal <= 4 and 1 <= vertical <= 4) or table > 3 or identifier in self.components:
                return f"its frame's component {identifier} has sampling {horizontal}x{vertical}, table {table}"
            self.components[identifier] = (horizontal, vertical, table)
        most_h = max(h for h, _, _ in self.components.values())
        most_v = max(v for _, v, _ in self.components.values())
        if any(most_h % h or most_v % v for h, v, _ in self.components.values()):
            return "its components' sampling factors do not divide the largest (fractional sampling)"
        self.progressive = marker == 0xC2
        return None

    def _huffman_tables(self, segment: bytes) -> str | None:
        offset = 0
        while offset < len(segment):
            kind, number = segment[offset] >> 4, segment[offset] & 0x0F
            counts = segment[offset + 1 : offset + 17]
            values = segment[offset + 17 : offset + 17 + sum(counts)]
            if kind > 1 or number > 3 or len(counts) < 16 or sum(counts) > 256 or len(values) < sum(counts):
                return "its Huffman table segment is malformed"
            code = 0
            longest = max((length for length, count in enumerate(counts, start=1) if count), default=0)
            for length, count in enumerate(counts[:longest], start=1):
                code += count
                if code >= 1 << length:
                    return "a Huffman table has more codes than its code lengths allow"
                code <<= 1
            if kind == 0 and any(value > 15 for value in values):
                return "a DC Huffman table holds a value past 15"
            self.tables.add(("ac" if kind else "dc", number))
            offset += 17 + sum(counts)
        return None

    def _quantization_tables(self, segment: bytes) -> str | None:
        offset = 0
        while offset < len(segment):
            precision, number = segment[offset] >> 4, segment[offset] & 0x0F
            size = 64 * (precision + 1)
            if precision > 1 or number > 3 or offset + 1 + size > len(segment):
                return "its quantization table segment is malformed"
            self.tables.add(("quant", number))
            offset += 1 + size
        return None

    def _scan(self, segment: bytes) -> str | None:
        if not self.components:
            return "a scan comes before its start-of-frame segment"
        count = segment[0] if segment else 0
        if not 1 <= count <= len(self.components) or len(segment) != 4 + 2 * count:
            return "its start-of-scan segment is malformed"
        start, end, approximation = segment[1 + 2 * count], segment[2 + 2 * count], segment[3 + 2 * count]
        high, low = approximation >> 4, approximation & 0x0F
        identifiers = [segment[1 + 2 * i] for i in range(count)]
        if any(identifier not in self.components for identifier in identifiers) or len(set(identifiers)) != count:
            return "a scan names a component its frame does not have, or one twice"
        members = [self.components[identifier] for identifier in identifiers]
        if count > 1 and sum(h * v for h, v, _ in members) > MAX_BLOCKS_IN_MCU:
            return f"a scan's sampling needs more than {MAX_BLOCKS_IN_MCU} blocks a unit"
        missing = [f"quantization table {table}" for _, _, table in members if ("quant", table) not in self.tables]
        # a sequential scan decodes with both tables of each component; a progressive one with those its band needs
        needs_dc = not self.progressive or (start == 0 and not high)
        needs_ac = not self.progressive or start > 0
        for i in range(count):
            tables = segment[2 + 2 * i]
            if needs_dc and ("dc", tables >> 4) not in self.tables:
                missing.append(f"DC Huffman table {tables >> 4}")
            if needs_ac and ("ac", tables & 0x0F) not in self.tables:
                missing.append(f"AC Huffman table {tables & 0x0F}")
        if missing:
            return f"a scan uses {missing[0]}, which no segment before it defines"
        if self.progressive:
            dc = start == 0
            if (dc and end != 0) or (not dc and (start > end or end > 63 or count != 1)):
                return "a progressive scan's spectral selection is invalid"
            if (high and low != high - 1) or low > 13:
                return "a progressive scan's successive approximation is invalid"
        return None

    def _skip_entropy_coded_data(self) -> None:
        """To the next marker: 0xFF then a byte that is neither 0 (a stuffed 0xFF) nor a restart marker."""
        data, position = self.data, self.position
        while True:
            position = data.find(b"\xff", position)
            if position < 0:
                raise IndexError
            following = data[position + 1]  # IndexError at the end: no marker after the scan
            if following != 0 and not 0xD0 <= following <= 0xD7:
                self.position = position
                return
            position += 2


class _Malformed(Exception):
    """A JPEG whose segments cannot be told apart."""
