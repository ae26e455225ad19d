#!/usr/bin/env python3
"""Write the seed corpus of tests/fuzz/fuzz_safetensors (tests/fuzz/corpus/, a few hundred bytes).

Files named valid_* must parse (tests/test_safetensors.cpp checks it); the others must be rejected.
framed_* files use the fuzzer's framed form, "<header JSON> 0xFF <data>" (the fuzzer computes the size
field, see tests/fuzz/fuzz_safetensors.cpp); framed_valid_* must parse in that form.
Deterministic: re-running rewrites identical files. Only the standard library is used.

    python3 scripts/make_fuzz_corpus.py            # writes tests/fuzz/corpus/
"""
import json
import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "corpus"


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes); laid out as HF does (header padded to 8)."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def framed(image):
    """The framed form of a file image: header JSON, 0xFF, data (no size field)."""
    (n,) = struct.unpack("<Q", image[:8])
    return image[8 : 8 + n] + b"\xff" + image[8 + n :]


def raw_header(header, data=b""):
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + data


MIXED = safetensors(
    [
        ("w.f64", "F64", [1], struct.pack("<d", 0.25)),
        ("w.f32", "F32", [2, 2], struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)),
        ("step", "I64", [], struct.pack("<q", 24914)),
        ("ids", "I32", [3], struct.pack("<3i", 1, -7, 151935)),
        ("w.bf16", "BF16", [2], struct.pack("<2H", 0x3F80, 0xC000)),
        ("w.f16", "F16", [3], struct.pack("<3H", 0x3C00, 0xC000, 0x7C00)),
        ("empty", "F16", [0, 4], b""),
        ("mask", "BOOL", [2], b"\x01\x00"),
    ],
    metadata={"format": "pt", "kd": "seed"},
)

FILES = {
    # Every common dtype, a scalar and an empty tensor, metadata.
    "valid_mixed.safetensors": MIXED,
    # The same, framed.
    "framed_valid_mixed.bin": framed(MIXED),
    # Rejected: overlapping byte ranges.
    "overlap.safetensors": raw_header(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        '"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
        bytes(8),
    ),
    # Rejected: data_offsets past the end of a truncated data buffer.
    "truncated.safetensors": safetensors([("t", "F32", [4], struct.pack("<4f", 1, 2, 3, 4))])[:-6],
    # Rejected: duplicate tensor name, and a shape product that overflows 64 bits.
    "duplicate_overflow.safetensors": raw_header(
        '{"d":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        '"d":{"dtype":"I64","shape":[4294967296,4294967296],"data_offsets":[0,1]}}',
        b"x",
    ),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.iterdir():
        if stale.is_file() and stale.name not in FILES:
            stale.unlink()
    total = 0
    for name, content in sorted(FILES.items()):
        (OUT / name).write_bytes(content)
        total += len(content)
        print(f"{OUT / name}: {len(content)} bytes")
    print(f"{len(FILES)} files, {total} bytes")


if __name__ == "__main__":
    main()
