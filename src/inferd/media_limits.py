"""Limits on images and audio a request may carry, checked before libmtmd decodes them.

Why our own header reads (docs/adr/0028-media-through-libmtmd.md): stb_image allocates
``width * height * channels`` from the header before it has seen a pixel, so a 60-byte
PNG claiming 100000 x 100000 pixels costs 30 GB. We read the dimensions ourselves
(PNG, JPEG, GIF, BMP) and refuse what is over :data:`MAX_IMAGE_PIXELS`, and refuse what
is not one of those formats (SVG, random bytes, a zero-byte file) with a message naming
the problem, before mtmd sees the bytes. Audio is bounded by its bytes, by the length
its headers promise (WAV and FLAC headers, MP3 frame headers walked) before decoding,
and by its decoded length after (:data:`MAX_AUDIO_SECONDS`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from inferd.errors import InvalidRequest

#: Largest image, in pixels (width x height), a request may carry: 8192 x 4096. Larger
#: images are downscaled by every projector anyway; the limit bounds the decoder's memory.
MAX_IMAGE_PIXELS = 8192 * 4096
#: Longest audio clip, in seconds of decoded sound.
MAX_AUDIO_SECONDS = 600.0
#: Largest encoded image or audio file, in bytes.
MAX_MEDIA_BYTES = 20 * 1024 * 1024
#: Image formats whose header we read (what stb_image decodes among common formats).
IMAGE_FORMATS = ("png", "jpeg", "gif", "bmp")
#: Audio formats miniaudio decodes (detected by magic bytes, as mtmd does).
AUDIO_FORMATS = ("wav", "mp3", "flac")


@dataclass(frozen=True)
class MediaLimits:
    """The limits one backend applies (defaults: the module constants)."""

    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    max_media_bytes: int = MAX_MEDIA_BYTES

    def __post_init__(self) -> None:
        for key in ("max_image_pixels", "max_media_bytes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequest(f"{key}={v!r} must be an integer >= 1")
        v = self.max_audio_seconds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise InvalidRequest(f"max_audio_seconds={v!r} must be a number of seconds > 0")


def _png(b: bytes) -> tuple[int, int] | None:
    if b[:8] != b"\x89PNG\r\n\x1a\n" or len(b) < 24 or b[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", b[16:24])


def _gif(b: bytes) -> tuple[int, int] | None:
    if b[:6] not in (b"GIF87a", b"GIF89a") or len(b) < 10:
        return None
    return struct.unpack("<HH", b[6:10])


def _bmp(b: bytes) -> tuple[int, int] | None:
    if b[:2] != b"BM" or len(b) < 26:
        return None
    w, h = struct.unpack("<ii", b[18:26])
    return abs(w), abs(h)


#: JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT/JPG/DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(b: bytes) -> tuple[int, int] | None:
    """Walk the marker segments to the first SOF (the frame's size)."""
    if b[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", b[i + 2 : i + 4])
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return w, h
        if length < 2:
            return None
        i += 2 + length
    return None


_READERS = {"png": _png, "jpeg": _jpeg, "gif": _gif, "bmp": _bmp}


def _jpeg_scan(b: bytes) -> int:
    """Offset of the first start-of-scan marker (the entropy-coded data), or -1."""
    i = 2
    while i + 4 <= len(b) and b[i] == 0xFF:
        marker = b[i + 1]
        if marker == 0xFF or marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:
            return i
        i += 2 + struct.unpack(">H", b[i + 2 : i + 4])[0]
    return -1


def is_complete(fmt: str, data: bytes) -> bool:
    """Whether the file ends as its format says: stb_image decodes a truncated JPEG or
    GIF without complaint (the missing part comes out grey), so a cut file is refused
    here. JPEG: an end-of-image marker after the first scan (entropy-coded data cannot
    hold one); PNG: an IEND chunk; GIF: the trailer byte; BMP: the size its header
    gives. Trailing bytes after the end are allowed."""
    if fmt == "jpeg":
        sos = _jpeg_scan(data)
        return sos >= 0 and data.find(b"\xff\xd9", sos) >= 0
    if fmt == "png":
        return data.find(b"IEND", 33) >= 0
    if fmt == "gif":
        return data.rstrip(b"\x00").endswith(b";")
    if fmt == "bmp":
        return struct.unpack("<I", data[2:6])[0] <= len(data)
    return True


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` from the header, or None when it is none of
    :data:`IMAGE_FORMATS` (or the header is cut short)."""
    for name, read in _READERS.items():
        got = read(data)
        if got is not None:
            return name, got[0], got[1]
    return None


def audio_format(data: bytes) -> str | None:
    """The container mtmd's magic-byte test would find (WAV, MP3, FLAC), or None."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MP3_KBPS = {
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}


def _wav_seconds(b: bytes) -> float | None:
    """Walk the RIFF chunks to ``fmt `` (byte rate) and ``data`` (size)."""
    i, rate = 12, 0
    while i + 8 <= len(b):
        kind, size = b[i : i + 4], struct.unpack("<I", b[i + 4 : i + 8])[0]
        if kind == b"fmt " and i + 20 <= len(b):
            rate = struct.unpack("<I", b[i + 16 : i + 20])[0]
        elif kind == b"data":
            return size / rate if rate else None
        i += 8 + size + (size & 1)
    return None


def _flac_seconds(b: bytes) -> float | None:
    """STREAMINFO (the first metadata block): sample rate and total samples."""
    if len(b) < 26:
        return None
    v = int.from_bytes(b[18:26], "big")
    rate, total = v >> 44, v & ((1 << 36) - 1)
    return total / rate if rate and total else None


def _mp3_seconds(b: bytes) -> float | None:
    """Walk the MPEG layer III frame headers (after an ID3v2 tag); past anything that
    is not a frame, the rest of the file is counted at the frames' average size."""
    i = 0
    if b[:3] == b"ID3" and len(b) >= 10:
        i = 10 + ((b[6] & 0x7F) << 21 | (b[7] & 0x7F) << 14 | (b[8] & 0x7F) << 7 | b[9] & 0x7F)
    start, seconds, frames = i, 0.0, 0
    while i + 4 <= len(b) and b[i] == 0xFF and b[i + 1] & 0xE0 == 0xE0:
        ver, layer = (b[i + 1] >> 3) & 3, (b[i + 1] >> 1) & 3
        kbps_i, rate_i, pad = b[i + 2] >> 4, (b[i + 2] >> 2) & 3, (b[i + 2] >> 1) & 1
        if layer != 1 or ver == 1 or rate_i == 3 or kbps_i in (0, 15):
            break
        rate = _MP3_RATES[ver][rate_i]
        kbps = _MP3_KBPS[3 if ver == 3 else 2][kbps_i]
        size = (144 if ver == 3 else 72) * kbps * 1000 // rate + pad
        seconds += (1152 if ver == 3 else 576) / rate
        frames += 1
        i += size
    if not frames:
        return None
    rest = max(0, len(b) - i)
    return seconds + seconds * rest / max(1, i - start)


def audio_seconds(data: bytes) -> float | None:
    """Seconds of sound the header(s) promise, before decoding; None when unknown."""
    fmt = audio_format(data)
    if fmt == "wav":
        return _wav_seconds(data)
    if fmt == "flac":
        return _flac_seconds(data)
    if fmt == "mp3":
        return _mp3_seconds(data)
    return None


def _check_bytes(data: bytes, what: str, limits: MediaLimits) -> None:
    if not data:
        raise InvalidRequest(f"{what} is empty (0 bytes)")
    if len(data) > limits.max_media_bytes:
        raise InvalidRequest(
            f"{what} is {len(data)} bytes; max_media_bytes is {limits.max_media_bytes}"
        )


def check_image(data: bytes, what: str, limits: MediaLimits = MediaLimits()) -> None:
    """``InvalidRequest`` naming the problem unless ``data`` is a PNG/JPEG/GIF/BMP within
    the limits (``what`` names the block in messages, e.g. ``messages[0] image 1``)."""
    _check_bytes(data, what, limits)
    if b"<svg" in data[:1024].lower():
        raise InvalidRequest(f"{what} is an SVG; send a raster image ({', '.join(IMAGE_FORMATS)})")
    got = image_size(data)
    if got is None:
        raise InvalidRequest(
            f"{what} is not an image this backend decodes (its header is none of "
            f"{', '.join(IMAGE_FORMATS)})"
        )
    fmt, w, h = got
    if w < 1 or h < 1:
        raise InvalidRequest(f"{what}: the {fmt} header says {w}x{h} pixels")
    if w * h > limits.max_image_pixels:
        raise InvalidRequest(
            f"{what}: the {fmt} header says {w}x{h} = {w * h} pixels; max_image_pixels is "
            f"{limits.max_image_pixels}"
        )
    if not is_complete(fmt, data):
        raise InvalidRequest(f"{what}: the {fmt} file is truncated (its end is missing)")


def check_audio(data: bytes, what: str, limits: MediaLimits = MediaLimits()) -> None:
    """``InvalidRequest`` unless ``data`` looks like WAV/MP3/FLAC within max_media_bytes
    and, as far as its headers tell, max_audio_seconds."""
    _check_bytes(data, what, limits)
    if audio_format(data) is None:
        raise InvalidRequest(
            f"{what} is not audio this backend decodes (expected {', '.join(AUDIO_FORMATS)})"
        )
    seconds = audio_seconds(data)
    if seconds is not None:  # refused before decoding; checked again after
        check_audio_seconds(seconds, what, limits)


def check_audio_seconds(seconds: float, what: str, limits: MediaLimits = MediaLimits()) -> None:
    """After decoding: ``InvalidRequest`` when the clip is longer than allowed."""
    if seconds > limits.max_audio_seconds:
        raise InvalidRequest(
            f"{what} is {seconds:.1f} s of audio; max_audio_seconds is {limits.max_audio_seconds:g}"
        )
