"""Hostile images, audio and projectors: a clear error each, never a crash (issue 16).

A truncated JPEG, a PNG whose header claims 100k x 100k pixels (refused before anything of
that size is allocated: ``max_image_pixels``), a zero-byte file, random bytes sent as an
image, an SVG, two hours of audio (``max_audio_seconds``), audio over ``max_media_bytes``,
an image for a model without a projector: each is an ``InvalidRequest`` naming what was
wrong (the limits are inferd.media_limits'). A truncated JPEG is the subtle one: its
header is intact and stb_image decodes what is there without complaint (llama-mtmd-cli
answers it), so refusing it takes a check of the file's end. A projector that does not
match the model, or is no projector at all, is a ``ModelLoadError`` at load time.

Everything that reaches libmtmd runs in a child process (as tests/test_llamacpp_loader.py
does), so a segfault or an abort is a failed test naming the signal rather than a dead
test runner; the child also reports its peak memory, which must stay bounded. The image
path is fuzzed with hypothesis inside such a child.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest

from .conftest import missing

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
IMAGE = ROOT / "vendor" / "llama.cpp" / "tools" / "mtmd" / "test-1.jpeg"
#: Peak resident memory the child may reach: the tiny model, its projector, the hostile
#: files (22 MB the largest) and Python. A 100k x 100k RGB image decoded would be 30 GB;
#: two hours of audio decoded to 16 kHz float, 460 MB.
MAX_CHILD_RSS_MB = 1536
#: A child runs every case of a test: load (seconds) plus one-token replies.
CHILD_TIMEOUT_S = 600
#: Hypothesis examples of the image fuzz (each a one-token reply on the tiny model).
FUZZ_EXAMPLES = 60

_CHILD = textwrap.dedent("""
    import asyncio, inspect, json, resource, sys
    from inferd.errors import InferdError
    try:
        from inferd._fast import _llama
    except ImportError:
        print("NO-CORE"); sys.exit(0)
    if not hasattr(_llama, "Mtmd"):
        print("NO-CORE-MTMD"); sys.exit(0)
    from inferd.backends.llamacpp import LlamaCpp
    if "mmproj" not in inspect.signature(LlamaCpp).parameters:
        print("NO-MTMD"); sys.exit(0)
    from inferd.types import AudioBlock, Done, ImageBlock, Message, Request, TextBlock

    spec = json.loads(sys.argv[1])

    def outcome(e):
        return {"error": type(e).__name__, "message": str(getattr(e, "message", e))}

    def block(case):
        data = open(case["path"], "rb").read()
        if case["kind"] == "image":
            return ImageBlock(data=data, media_type=case["mime"])
        return AudioBlock(data=data, format=case["mime"])

    async def ask(b, case):
        req = Request((Message.user((block(case), TextBlock("What is it?"))),), max_tokens=1)
        events = [ev async for ev in b.generate(req)]
        assert sum(isinstance(e, Done) for e in events) == 1, events
        return {"ok": True}

    async def main():
        try:
            b = LlamaCpp(spec["model"], n_ctx=2048, n_threads=1, **spec["kwargs"])
        except InferdError as e:
            print(json.dumps({"load": outcome(e)})); return
        results = []
        try:
            for case in spec["cases"]:
                try:
                    results.append(await ask(b, case))
                except InferdError as e:
                    results.append(outcome(e))
            if spec.get("fuzz"):
                results.append(await fuzz(b, spec["fuzz"]))
        finally:
            b.close()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(json.dumps({"results": results, "rss_mb": rss_mb}))

    async def fuzz(b, n):
        from hypothesis import given, settings, HealthCheck, strategies as st
        seeds = [open(p, "rb").read() for p in spec["seeds"]]
        seen = {"ok": 0, "refused": 0}
        loop = asyncio.get_running_loop()

        def one(data, mime):
            req = Request((Message.user((ImageBlock(data=data, media_type=mime),
                                          TextBlock("?"))),), max_tokens=1)
            async def go():
                return [ev async for ev in b.generate(req)]
            try:
                events = asyncio.run_coroutine_threadsafe(go(), loop).result(120)
            except InferdError as e:
                assert type(e).__name__ == "InvalidRequest", e
                seen["refused"] += 1
            else:
                assert sum(isinstance(e, Done) for e in events) == 1, events
                seen["ok"] += 1

        mutated = st.builds(
            lambda s, cuts: bytes(_mutate(bytearray(s), cuts)),
            st.sampled_from(seeds),
            st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
        )

        def _mutate(buf, cuts):
            for pos, val in cuts:
                if buf:
                    buf[pos % len(buf)] = val
            return buf

        @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(mutated, st.binary(max_size=4096),
                         st.builds(lambda s, k: s[:k], st.sampled_from(seeds),
                                   st.integers(0, 4096))),
               st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp"]))
        def prop(data, mime):
            one(data, mime)

        await loop.run_in_executor(None, prop)
        return {"fuzz": seen}

    asyncio.run(main())
""")


def run_child(model: Path, cases: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Run ``cases`` against ``LlamaCpp(model, **kwargs)`` in a child; its JSON report."""
    spec = {"model": str(model), "cases": cases, "kwargs": {}, **extra}
    spec["kwargs"] = {k: str(v) for k, v in spec["kwargs"].items()}
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=env,
    )
    assert p.returncode == 0, f"the child crashed (exit {p.returncode}):\n{p.stderr[-3000:]}"
    last = p.stdout.strip().splitlines()[-1]
    if last == "NO-CORE":
        missing("the compiled llama.cpp core inferd._fast._llama")
    if last == "NO-CORE-MTMD":
        missing("libmtmd in the compiled core (inferd._fast._llama.Mtmd)")
    if last == "NO-MTMD":  # the engine is part of the package: its absence is a failure
        pytest.fail("LlamaCpp takes no mmproj (the libmtmd engine of issue 16 is missing)")
    return json.loads(last)


# ---------------------------------------------------------------- hostile files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming ``width`` x ``height`` RGB, one tiny IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav_u8(seconds: int, rate: int) -> bytes:
    """A valid mono 8-bit PCM WAV of ``seconds`` of silence (``rate`` bytes a second)."""
    n = seconds * rate
    head = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
    return head + fmt + b"data" + struct.pack("<I", n) + b"\x80" * n


def small_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'


def hostile_files() -> dict[str, tuple[str, str, bytes]]:
    """name -> (kind, media type or format, bytes)."""
    return {
        "png_100k_by_100k": ("image", "image/png", png_header_only(100_000, 100_000)),
        "zero_bytes": ("image", "image/png", b""),
        "random_bytes": ("image", "image/png", os.urandom(4096)),
        "svg": ("image", "image/svg+xml", SVG),
        # 2 kHz: 14 MB, under max_media_bytes, so that max_audio_seconds is what refuses it
        "two_hours_of_audio": ("audio", "wav", wav_u8(2 * 3600, 2000)),
        "audio_over_max_media_bytes": ("audio", "wav", wav_u8(45 * 60, 8000)),
    }


def _cases(folder: Path, files: dict[str, tuple[str, str, bytes]]) -> list[dict[str, Any]]:
    cases = []
    for name, (kind, mime, data) in files.items():
        path = folder / name
        path.write_bytes(data)
        cases.append({"name": name, "kind": kind, "mime": mime, "path": str(path)})
    return cases


#: What each refusal's message must mention (lower-cased), so that it says what was wrong.
MUST_MENTION = {
    "png_100k_by_100k": ("max_image_pixels",),
    "zero_bytes": ("image", "empty"),
    "random_bytes": ("image",),
    "svg": ("svg",),
    "two_hours_of_audio": ("max_audio_seconds",),
    "audio_over_max_media_bytes": ("max_media_bytes",),
}


@pytest.mark.slow
def test_hostile_media_are_clear_refusals_in_bounded_memory(synth_vision, tmp_path):
    files = hostile_files()
    files["control_png"] = ("image", "image/png", small_png())
    report = run_child(
        synth_vision.model, _cases(tmp_path, files), kwargs={"mmproj": synth_vision.mmproj}
    )
    assert "load" not in report, report
    results = dict(zip(files, report["results"], strict=True))
    assert results.pop("control_png") == {"ok": True}  # the harness can succeed
    for name, got in results.items():
        assert got.get("error") == "InvalidRequest", (name, got)
        msg = got["message"].lower()
        assert any(word in msg for word in MUST_MENTION[name]), (name, got)
    assert report["rss_mb"] < MAX_CHILD_RSS_MB, report


@pytest.mark.slow
def test_truncated_jpeg_is_refused(synth_vision, tmp_path):
    jpeg = IMAGE.read_bytes()
    files = {"truncated_jpeg": ("image", "image/jpeg", jpeg[: len(jpeg) // 3])}
    report = run_child(
        synth_vision.model, _cases(tmp_path, files), kwargs={"mmproj": synth_vision.mmproj}
    )
    (got,) = report["results"]
    assert got.get("error") == "InvalidRequest", got
    assert "image" in got["message"].lower(), got


@pytest.mark.slow
def test_image_for_a_model_without_a_projector_is_refused(synth_vision, tmp_path):
    files = {"png": ("image", "image/png", small_png())}
    report = run_child(synth_vision.model, _cases(tmp_path, files))
    (got,) = report["results"]
    assert got.get("error") == "InvalidRequest", got
    assert any(w in got["message"].lower() for w in ("projector", "mmproj", "vision")), got


@pytest.mark.slow
def test_projector_of_another_width_is_a_model_load_error(synth_vision, tmp_path):
    """mtmd refuses a projector whose output width is not the model's: a ModelLoadError at
    construction, not a crash."""
    from bench.synth_vision import TextShape, write_projector

    wrong = tmp_path / "wrong-width.gguf"
    write_projector(wrong, TextShape().hidden * 2)
    report = run_child(synth_vision.model, [], kwargs={"mmproj": wrong})
    assert report.get("load", {}).get("error") == "ModelLoadError", report


@pytest.mark.slow
@pytest.mark.parametrize(
    "content", [b"", b"GGUF", b"not a projector at all" * 100], ids=["empty", "magic", "text"]
)
def test_projector_that_is_no_projector_is_a_model_load_error(synth_vision, tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    report = run_child(synth_vision.model, [], kwargs={"mmproj": bad})
    assert report.get("load", {}).get("error") == "ModelLoadError", report


@pytest.mark.slow
def test_text_model_given_as_projector_is_a_model_load_error(synth_vision):
    report = run_child(synth_vision.model, [], kwargs={"mmproj": synth_vision.model})
    assert report.get("load", {}).get("error") == "ModelLoadError", report


@pytest.mark.slow
def test_fuzzed_images_are_refused_or_answered_never_a_crash(synth_vision, tmp_path):
    """Mutated and truncated PNG/JPEG bytes and random bytes under every image media
    type: each request is an InvalidRequest or a normal reply with one Done."""
    seeds = []
    for name, data in (("seed.png", small_png()), ("seed.jpg", IMAGE.read_bytes()[:20000])):
        (tmp_path / name).write_bytes(data)
        seeds.append(str(tmp_path / name))
    report = run_child(
        synth_vision.model,
        [],
        kwargs={"mmproj": synth_vision.mmproj},
        fuzz=FUZZ_EXAMPLES,
        seeds=seeds,
    )
    (got,) = report["results"]
    seen = got["fuzz"]
    assert seen["ok"] + seen["refused"] >= FUZZ_EXAMPLES // 2, seen
    assert seen["refused"] > 0, seen  # random bytes are among the examples
    assert report["rss_mb"] < MAX_CHILD_RSS_MB, report


# ---------------------------------------------------------------- helpers themselves


def test_crafted_files_are_what_they_claim(monkeypatch):
    """The hostile files are well formed where it matters: the PNG's IHDR claims 100k x
    100k with a valid CRC, the WAV's header says two hours."""
    from PIL import Image

    png = png_header_only(100_000, 100_000)
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (100_000, 100_000)
    assert zlib.crc32(png[12:29]) & 0xFFFFFFFF == struct.unpack(">I", png[29:33])[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert Image.open(io.BytesIO(png)).size == (100_000, 100_000)  # header-only read
    wav = wav_u8(7200, 2000)
    rate, n = struct.unpack("<I", wav[24:28])[0], struct.unpack("<I", wav[40:44])[0]
    assert n / rate == 7200
