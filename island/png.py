"""A minimal PNG writer (8-bit RGB, no interlace) with zlib and struct only, and the
procedural picture the `image` backend paints.

The picture is deterministic in (prompt, seed, steps, width, height): each colour channel
is a smooth cyclic palette indexed by the sum of a column profile and a row profile (sums
of a few sinusoids whose frequencies and phases come from the prompt and seed; more
steps add harmonics, i.e. detail). Rows are produced with `bytes.translate` and slice
assignment, so a 1536x1536 image takes milliseconds, not seconds, in pure Python.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from collections.abc import Iterable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_rgb(width: int, height: int, rows: Iterable[bytes], *, level: int = 6) -> bytes:
    """A PNG from `height` rows of `3 * width` bytes (R, G, B per pixel)."""
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise ValueError("width and height must be positive")
    comp = zlib.compressobj(level)
    parts: list[bytes] = []
    n = 0
    for row in rows:
        if len(row) != 3 * width:
            raise ValueError(f"row {n} has {len(row)} bytes, expected {3 * width}")
        parts.append(comp.compress(b"\x00" + row))  # filter type 0 (None)
        n += 1
    if n != height:
        raise ValueError(f"{n} rows given, expected {height}")
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, deflate, no filter/interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def read_png_header(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, checking the signature and the IHDR CRC."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError("first chunk is not IHDR")
    body = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    if zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF != crc:
        raise ValueError("bad IHDR CRC")
    width, height = struct.unpack(">II", body[:8])
    return width, height


def _profile(rng: random.Random, length: int, harmonics: int) -> bytes:
    """A smooth periodic 0..255 profile of `length` samples."""
    waves = [(rng.uniform(0.5, 3.0) * (h + 1), rng.uniform(0, 2 * math.pi), 1.0 / (h + 1)) for h in range(harmonics)]
    norm = sum(a for _, _, a in waves)
    out = bytearray(length)
    for i in range(length):
        t = 2 * math.pi * i / length
        v = sum(a * math.sin(f * t + p) for f, p, a in waves) / norm  # -1..1
        out[i] = int((v + 1) * 127.5) & 0xFF
    return bytes(out)


def _palette(rng: random.Random) -> bytes:
    """A smooth cyclic 256-entry intensity palette for one channel."""
    k = rng.choice((1, 2, 3))
    phase = rng.uniform(0, 2 * math.pi)
    lo, hi = rng.uniform(0, 60), rng.uniform(180, 255)
    return bytes(int(lo + (hi - lo) * (0.5 + 0.5 * math.sin(2 * math.pi * k * i / 256 + phase))) for i in range(256))


def procedural_png(prompt: str, seed: int, width: int, height: int, steps: int) -> bytes:
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    rng = random.Random(digest)
    harmonics = 1 + min(6, max(0, steps) // 8)
    channels = []
    for _ in range(3):
        palette = _palette(rng)
        cols = _profile(rng, width, harmonics)
        rows = _profile(rng, height, harmonics)
        tables = [bytes(palette[(v + shift) & 0xFF] for v in range(256)) for shift in range(256)]
        channels.append((cols, rows, tables))

    def gen_rows() -> Iterable[bytes]:
        buf = bytearray(3 * width)
        for y in range(height):
            for c, (cols, rows, tables) in enumerate(channels):
                buf[c::3] = cols.translate(tables[rows[y]])
            yield bytes(buf)

    return png_rgb(width, height, gen_rows())
