"""Images and audio through libmtmd, checked against llama.cpp's own tools (issue 16).

The model is the synthetic pair of ``bench/synth_vision.py`` (a LLaVA-style CLIP + MLP
projector and Ultravox's audio encoder, random weights): no download, and the pipeline must
be exact. Greedy with EOS ignored, our tokens must equal ``llama-mtmd-cli``'s and
``llama-server --mmproj``'s for the same files, image (``tools/mtmd/test-1.jpeg``) and
audio (``test-2.mp3``).

First the peers alone: the pair loads in llama.cpp's tools, and the media changes the
answer (a projector whose output were ignored would pass a differential test trivially).
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

MTMD_DIR = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "tools" / "mtmd"
IMAGE = MTMD_DIR / "test-1.jpeg"
AUDIO = MTMD_DIR / "test-2.mp3"
PROMPT = "Describe it."
#: Tokens generated per differential run: enough to cover several decode steps past the
#: media, small enough for a loaded 2-core box.
N_PREDICT = 24
#: A peer run (load + encode + decode of the tiny model) takes seconds; generous for CI.
PEER_TIMEOUT_S = 300


def png_bytes(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """A plain RGB PNG of one colour (a second image, unlike test-1.jpeg)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def mtmd_cli(binary: Path, pair, *media: str, n_predict: int = N_PREDICT) -> str:
    """The text ``llama-mtmd-cli`` prints for PROMPT (greedy, EOS ignored, 2 threads)."""
    cmd = [
        str(binary),
        "-m",
        str(pair.model),
        "--mmproj",
        str(pair.mmproj),
        *media,
        "-p",
        PROMPT,
        "-n",
        str(n_predict),
        "--temp",
        "0",
        "--ignore-eos",
        "-t",
        "2",
        "-c",
        "2048",
    ]
    p = subprocess.run(cmd, capture_output=True, timeout=PEER_TIMEOUT_S)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")[-3000:]
    return p.stdout.decode("utf-8", "replace")


@pytest.mark.slow
def test_peer_loads_the_pair_and_media_changes_the_answer(
    llama_mtmd_cli_bin, synth_vision, tmp_path
):
    other = tmp_path / "red.png"
    other.write_bytes(png_bytes(40, 30, (200, 10, 10)))
    with_image = mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--image", str(IMAGE))
    with_other = mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--image", str(other))
    with_audio = mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--audio", str(AUDIO))
    answers = [with_image, with_other, with_audio]
    assert all(a.strip() for a in answers), answers
    assert len(set(answers)) == 3, answers
    # deterministic: the same image gives the same answer
    assert mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--image", str(IMAGE)) == with_image
