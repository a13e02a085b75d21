"""Write a SentencePiece Unigram model (sentencepiece_model.proto's ModelProto) from a tokenizer.json's pieces, for
onnxruntime-extensions' SentencepieceTokenizer, which takes the serialized proto as an attribute.

The fields are written by hand: sentencepiece's own generated module (0.2.3) needs protobuf 7.36 at run time, and
skl2onnx needs protobuf below 7. The proto is stable and only the fields below are needed; the tests load the result
with the operator itself.
"""

import re
import struct

# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
UNIGRAM = 1
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One field: a varint (int, bool), a float (fixed32) or a length-delimited string, bytes or message."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, bool | int):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def unigram_model(
    pieces: list[tuple[str, float]], unk_id: int, control: set[int], byte_fallback: bool, charsmap: bytes
) -> bytes:
    """The serialized ModelProto: the pieces in id order (the unknown one, the control ones that text never becomes,
    the <0xNN> bytes where unknown letters fall back to them), and a normalizer that only applies `charsmap` and
    writes spaces as U+2581: no dummy prefix and no whitespace removal, which the graph does as tokenizers does."""

    def kind(index: int, piece: str) -> int:
        if index == unk_id:
            return UNKNOWN
        if index in control:
            return CONTROL
        return BYTE if byte_fallback and BYTE_PIECE.fullmatch(piece) else NORMAL

    encoded = b"".join(
        _field(1, _field(1, piece) + _field(2, float(score)) + _field(3, kind(index, piece)))
        for index, (piece, score) in enumerate(pieces)
    )
    trainer = (_field(3, UNIGRAM) + _field(4, len(pieces)) + _field(35, byte_fallback) + _field(40, unk_id)
               + _field(41, -1) + _field(42, -1) + _field(43, -1))  # fmt: skip
    normalizer = (_field(1, "user_defined" if charsmap else "identity") + _field(2, charsmap) + _field(3, False)
                  + _field(4, False) + _field(5, True))  # fmt: skip
    return encoded + _field(2, trainer) + _field(3, normalizer)
