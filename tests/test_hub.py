"""Pulls from the Hugging Face Hub: the real ``huggingface_hub`` client against a local
Hub (tests/hub_server.py) through ``HF_ENDPOINT``; small valid GGUFs made here."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from inferd import ModelLoadError, catalog, hub, models

from .hub_server import HubServer

TOKEN = "hf_test_token"


def _str(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def make_gguf(
    *,
    arch: str = "llama",
    ctx: int = 2048,
    ftype: int = 15,
    template: str = "{% for m in messages %}<|im_start|>{{ m.content }}<tool_call>{% endfor %}",
    dims: tuple[int, ...] = (64, 32),
    padding: int = 2000,
    salt: bytes = b"",
) -> bytes:
    """A GGUF file the store's header walk accepts: metadata, one tensor, its data."""
    kv = [
        _str("general.architecture") + struct.pack("<I", 8) + _str(arch),
        _str(f"{arch}.context_length") + struct.pack("<II", 4, ctx),
        _str("general.file_type") + struct.pack("<II", 4, ftype),
        _str("tokenizer.chat_template") + struct.pack("<I", 8) + _str(template),
    ]
    tensor = _str("w") + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
    tensor += struct.pack("<IQ", 0, 0)  # type F32, offset 0
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv) + tensor
    head += b"\0" * (-len(head) % 32)
    data = hashlib.sha256(salt + arch.encode()).digest() * (padding // 32 + 1)
    return head + data[:padding]


@pytest.fixture
def hubsrv(tmp_path, monkeypatch):
    """A local Hub, HF_ENDPOINT pointing at it, HF caches and the store under tmp."""
    import huggingface_hub.constants as hfc

    with HubServer(token=TOKEN) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(hfc, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
        yield srv


def store_files(tmp_path: Path) -> list[str]:
    d = tmp_path / "home" / "models"
    return sorted(p.name for p in d.glob("sha256-*.gguf")) if d.exists() else []


def index(tmp_path: Path) -> dict:
    import orjson

    p = tmp_path / "home" / "models" / "names.json"
    return orjson.loads(p.read_bytes()) if p.exists() else {}


QUANTS = {
    "Model-Q8_0.gguf": make_gguf(ftype=7, padding=8000),
    "Model-Q4_K_M.gguf": make_gguf(ftype=15, padding=4000),
    "Model-Q2_K.gguf": make_gguf(ftype=10, padding=2000),
    "README.md": b"# a model\n",
}


def test_default_quant_is_q4_k_m_and_reused_without_network(hubsrv, tmp_path):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF")
    assert entry.name == "acme/model-GGUF:Q4_K_M"
    assert "default quantisation Q4_K_M" in entry.record["chosen"]
    assert entry.model_path.read_bytes() == QUANTS["Model-Q4_K_M.gguf"]
    assert (
        entry.model_path.name
        == f"sha256-{hashlib.sha256(QUANTS['Model-Q4_K_M.gguf']).hexdigest()}.gguf"
    )
    assert len(hubsrv.gets("/Model-Q4_K_M.gguf")) == 1 and not hubsrv.gets("/Model-Q8_0.gguf")
    before = len(hubsrv.requests)
    assert models.resolve("hf://acme/model-GGUF") == entry.model_path  # from the store
    assert models.resolve("acme/model-GGUF:Q4_K_M") == entry.model_path  # by its name
    assert len(hubsrv.requests) == before
    again = hub.pull("hf://acme/model-GGUF:Q4_K_M")  # lists the repo, downloads nothing
    assert again.model_path == entry.model_path
    assert len(hubsrv.gets("/Model-Q4_K_M.gguf")) == 1
    assert not list((tmp_path / "home" / "models" / ".partial").iterdir())


def test_without_q4_k_m_the_smallest_4bit_file(hubsrv):
    hubsrv.add_commit(
        "acme/other",
        {
            "x-Q8_0.gguf": make_gguf(padding=1000),
            "x-Q4_0.gguf": make_gguf(padding=6000),
            "x-IQ4_XS.gguf": make_gguf(padding=3000),
        },
    )
    entry = hub.pull("hf://acme/other")
    assert entry.name == "acme/other:IQ4_XS"
    assert "smallest 4-bit" in entry.record["chosen"]


def test_named_quant_case_insensitive_and_unknown_quant_lists_choices(hubsrv):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF:q8_0")
    assert entry.model_path.read_bytes() == QUANTS["Model-Q8_0.gguf"]
    assert entry.record["quant"] == "Q8_0"
    with pytest.raises(
        ModelLoadError, match=r"no Q5_K_M file; quantisations there: Q2_K, Q4_K_M, Q8_0"
    ):
        hub.pull("hf://acme/model-GGUF:Q5_K_M")


def test_exact_file_in_a_folder(hubsrv):
    data = make_gguf(padding=1500, salt=b"exact")
    hubsrv.add_commit(
        "acme/deep",
        {"sub/dir/weird-name.gguf": data, "other-Q4_K_M.gguf": QUANTS["Model-Q4_K_M.gguf"]},
    )
    entry = hub.pull("hf://acme/deep/sub/dir/weird-name.gguf")
    assert entry.model_path.read_bytes() == data
    assert entry.record["files"][0]["path"] == "sub/dir/weird-name.gguf"
    assert entry.name == "acme/deep/sub/dir/weird-name.gguf"  # "-name" is no quantisation
    assert entry.record["quant"] is None
    with pytest.raises(ModelLoadError, match=r"has no file sub/nope\.gguf"):
        hub.pull("hf://acme/deep/sub/nope.gguf")


def test_split_model_is_one_entry_loaded_through_named_links(hubsrv, tmp_path):
    parts = {
        f"big/Big-Q4_K_M-{i:05d}-of-00003.gguf": make_gguf(salt=bytes([i]), dims=(10, i))
        for i in (1, 2, 3)
    }
    hubsrv.add_commit("acme/big", {**parts, "big/Big-Q8_0.gguf": make_gguf(padding=100)})
    entry = hub.pull("hf://acme/big:Q4_K_M")
    assert [f["path"] for f in entry.record["files"]] == list(parts)
    assert len(store_files(tmp_path)) == 3
    link = entry.model_path
    assert link.name == "Big-Q4_K_M-00001-of-00003.gguf"
    for name, data in parts.items():  # llama.cpp finds parts 2..3 beside part 1, by name
        assert (link.parent / Path(name).name).read_bytes() == data
    assert models.resolve("acme/big:Q4_K_M") == link
    assert entry.info().parameters == 10 * 1 + 10 * 2 + 10 * 3
    assert catalog.model_bytes(link) == sum(map(len, parts.values())) > link.stat().st_size
    assert catalog.entry_for_path(link).name == entry.name
    # asking for part 2 by path still brings the whole model
    again = hub.pull("hf://acme/big/big/Big-Q4_K_M-00002-of-00003.gguf")
    assert len(again.record["files"]) == 3


def test_mmproj_comes_along(hubsrv):
    proj = make_gguf(arch="clip", padding=700)
    hubsrv.add_commit(
        "acme/vision", {"v-Q4_K_M.gguf": make_gguf(padding=900), "mmproj-v-F16.gguf": proj}
    )
    entry = hub.pull("hf://acme/vision")
    assert entry.name == "acme/vision:Q4_K_M"  # the projector is never the model
    assert entry.mmproj_path is not None and entry.mmproj_path.read_bytes() == proj
    assert entry.record["mmproj"]["path"] == "mmproj-v-F16.gguf"


def test_revision_pins_a_commit(hubsrv):
    old = make_gguf(padding=500, salt=b"old")
    first = hubsrv.add_commit("acme/m", {"m-Q4_K_M.gguf": old})
    hubsrv.add_commit("acme/m", {"m-Q4_K_M.gguf": make_gguf(padding=500, salt=b"new")})
    pinned = hub.pull(f"hf://acme/m:Q4_K_M@{first}")
    assert pinned.model_path.read_bytes() == old
    assert pinned.record["revision"] == first
    latest = hub.pull("hf://acme/m:Q4_K_M")
    assert latest.model_path.read_bytes() != old
    assert models.resolve(f"hf://acme/m:Q4_K_M@{first}") == pinned.model_path
    with pytest.raises(ModelLoadError, match="has no revision"):
        hub.pull("hf://acme/m@0123456789abcdef0123456789abcdef01234567")


def test_wrong_sha256_is_refused_and_store_unchanged(hubsrv, tmp_path):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    hubsrv.tamper.add("Model-Q4_K_M.gguf")
    with pytest.raises(ModelLoadError, match="does not match the Hub's digest"):
        hub.pull("hf://acme/model-GGUF")
    assert store_files(tmp_path) == [] and index(tmp_path) == {}
    assert not list((tmp_path / "home" / "models" / ".partial").glob("*.ok"))
    hubsrv.tamper.clear()
    assert hub.pull("hf://acme/model-GGUF").model_path.read_bytes() == QUANTS["Model-Q4_K_M.gguf"]


#: huggingface_hub writes what it received in 10 MiB pieces, so a drop is resumable once
#: a piece has arrived: the resume tests use a 12 MiB file and cut it after 11 MiB.
BIG = make_gguf(padding=12 * 1024 * 1024, salt=b"big")
CUT = 11 * 1024 * 1024


def _ranges(hubsrv: HubServer) -> list[str | None]:
    return [r[2] for r in hubsrv.gets("/cdn/" + hashlib.sha256(BIG).hexdigest())]


def test_dropped_connection_resumes_with_a_range_request(hubsrv):
    hubsrv.add_commit("acme/big-GGUF", {"Big-Q4_K_M.gguf": BIG})
    hubsrv.drop_after["Big-Q4_K_M.gguf"] = CUT
    entry = hub.pull("hf://acme/big-GGUF")
    assert entry.model_path.read_bytes() == BIG
    ranges = _ranges(hubsrv)
    assert ranges[0] is None and ranges[1] is not None
    start = int(ranges[1].removeprefix("bytes=").split("-")[0])
    assert 0 < start <= CUT  # it asked only for the rest


def test_interrupted_pull_leaves_store_unchanged_and_next_pull_resumes(hubsrv, tmp_path):
    hubsrv.add_commit("acme/big-GGUF", {"Big-Q4_K_M.gguf": BIG})
    hubsrv.drop_after["Big-Q4_K_M.gguf"] = CUT
    hubsrv.fail_after_drop.add("Big-Q4_K_M.gguf")  # the retry gets a 500: the pull fails
    with pytest.raises(ModelLoadError, match="500"):
        hub.pull("hf://acme/big-GGUF")
    assert store_files(tmp_path) == [] and index(tmp_path) == {}
    [part] = (tmp_path / "home" / "models" / ".partial").glob("*.part")
    have = part.stat().st_size
    assert 0 < have <= CUT
    entry = hub.pull("hf://acme/big-GGUF")
    assert entry.model_path.read_bytes() == BIG
    assert _ranges(hubsrv)[-1] == f"bytes={have}-"
    assert not list(part.parent.iterdir())


def test_gated_repo_names_hf_token_and_never_shows_it(hubsrv, monkeypatch, tmp_path):
    hubsrv.add_commit("corp/gated", {"g-Q4_K_M.gguf": make_gguf(padding=300)}, gated=True)
    with pytest.raises(ModelLoadError, match=r"gated or private.*set HF_TOKEN") as e:
        hub.pull("hf://corp/gated")
    assert "401" in e.value.message
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    with pytest.raises(ModelLoadError, match="token in HF_TOKEN has no access") as e:
        hub.pull("hf://corp/gated")
    assert "hf_wrong_secret_value" not in e.value.message and store_files(tmp_path) == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    entry = hub.pull("hf://corp/gated")
    assert entry.model_path.exists()
    assert hubsrv.gets("/g-Q4_K_M.gguf")[-1][3]  # the Hub saw the token ...
    assert not any(r[3] for r in hubsrv.gets("/cdn/" + entry.record["sha256"]))  # the CDN never
    assert TOKEN not in (tmp_path / "home" / "models" / "names.json").read_text()


def test_repo_without_gguf_lists_what_is_there(hubsrv):
    hubsrv.add_commit("acme/st", {"model.safetensors": b"\0" * 64, "config.json": b"{}"})
    with pytest.raises(
        ModelLoadError,
        match=r"holds no GGUF model file; the repo has: model\.safetensors, config\.json",
    ):
        hub.pull("hf://acme/st")


def test_not_a_repo_and_bad_sources(hubsrv):
    with pytest.raises(ModelLoadError, match="nobody/nothing is not a model repo"):
        hub.pull("hf://nobody/nothing")
    with pytest.raises(ModelLoadError, match="not a Hub source"):
        models.resolve("hf://just-one-part")
    with pytest.raises(ModelLoadError, match="not a Hub source"):
        hub.parse("hf://a/b/../../etc/passwd.gguf")


def test_non_gguf_file_with_a_matching_digest_is_refused(hubsrv, tmp_path):
    hubsrv.add_commit("acme/fake", {"fake-Q4_K_M.gguf": b"<html>not a model</html>" * 10})
    with pytest.raises(ModelLoadError, match="not a GGUF model"):
        hub.pull("hf://acme/fake")
    assert store_files(tmp_path) == []


def test_offline_uses_the_store_only(hubsrv, monkeypatch):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hubsrv.requests)
    assert hub.pull("hf://acme/model-GGUF").model_path == entry.model_path
    assert models.pull("hf://acme/model-GGUF") == entry.model_path
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        hub.pull("hf://acme/model-GGUF:Q8_0")
    assert len(hubsrv.requests) == before


def test_progress_reports_download_and_verify(hubsrv):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    seen: list[tuple[str, int, int]] = []
    hub.pull("hf://acme/model-GGUF", progress=lambda *a: seen.append(a))
    size = len(QUANTS["Model-Q4_K_M.gguf"])
    assert ("download", size, size) in seen and ("verify", size, size) in seen


def test_store_private_and_partial_dir_private(hubsrv, tmp_path):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF")
    assert os.stat(entry.model_path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "home" / "models" / ".partial").st_mode & 0o777 == 0o700
    assert catalog.find_source("hf://acme/model-GGUF") is not None


def test_concurrent_pulls_of_one_model_both_succeed(hubsrv, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    hubsrv.add_commit("acme/big-GGUF", {"Big-Q4_K_M.gguf": BIG})
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda n: hub.pull("hf://acme/big-GGUF", names=[n]), ["a", "b"])
    assert a.model_path == b.model_path and a.model_path.read_bytes() == BIG
    assert len(store_files(tmp_path)) == 1 and {"a", "b"} <= set(index(tmp_path))
    assert list((tmp_path / "home" / "models" / ".partial").iterdir()) == []  # no litter


def _wait_for_flock_waiter(limit_s: float = 60.0) -> None:
    """Block until a thread of this process waits for a flock (/proc/locks lists it as
    ``N: -> FLOCK ... PID``; the pid, not the inode, which overlay filesystems renumber)."""
    import time

    me = str(os.getpid())
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with open("/proc/locks") as fh:
            rows = [ln.split() for ln in fh]
        if any(r[1:3] == ["->", "FLOCK"] and r[5] == me for r in rows if len(r) > 5):
            return
        time.sleep(0.01)
    raise AssertionError(f"no pull waited for the part file's lock within {limit_s} s")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_a_pull_that_waited_on_a_discarded_download_fetches_afresh(hubsrv, tmp_path):
    """The interleaving CI once hit: pull B waits for the part file's lock while pull A
    holds it, then A's download is discarded (the file unlinked) and the lock released.
    B must not write to the vanished path; it opens a new part and downloads itself."""
    import fcntl
    import threading

    hubsrv.add_commit("acme/big-GGUF", {"Big-Q4_K_M.gguf": BIG})
    partial = catalog.store() / hub.PARTIAL_DIR
    partial.mkdir(mode=0o700)
    part = partial / f"{hashlib.sha256(BIG).hexdigest()}.part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # pull A, mid-download
    got: dict[str, object] = {}

    def pull_b() -> None:
        try:
            got["entry"] = hub.pull("hf://acme/big-GGUF")
        except BaseException as e:  # reported by the assertions below
            got["error"] = e

    b = threading.Thread(target=pull_b)
    b.start()
    _wait_for_flock_waiter()
    part.unlink()  # A's download failed its digest check and was discarded
    os.close(fd)
    b.join(120)
    assert not b.is_alive() and "error" not in got, got.get("error")
    assert got["entry"].model_path.read_bytes() == BIG
    assert len(_ranges(hubsrv)) == 1 and list(partial.iterdir()) == []


def test_a_verified_part_waits_for_the_next_pull_when_a_later_part_fails(hubsrv, tmp_path):
    parts = {f"P-Q4_K_M-{i:05d}-of-00002.gguf": make_gguf(salt=bytes([i])) for i in (1, 2)}
    hubsrv.add_commit("acme/parts", parts)
    hubsrv.tamper.add("P-Q4_K_M-00002-of-00002.gguf")
    with pytest.raises(ModelLoadError, match="does not match"):
        hub.pull("hf://acme/parts")
    assert store_files(tmp_path) == [] and index(tmp_path) == {}
    hubsrv.tamper.clear()
    hub.pull("hf://acme/parts")
    assert len(hubsrv.gets("P-Q4_K_M-00001-of-00002.gguf")) == 1  # part 1 was not fetched again
    assert len(store_files(tmp_path)) == 2


def _split_smollm2(src: Path, out: Path, max_tensors: int) -> list[Path]:
    """SmolLM2 rewritten as split GGUF parts with llama.cpp's own gguf-py writer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "vendor" / "llama.cpp" / "gguf-py"))
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch, split_max_tensors=max_tensors)
    copy_with_new_metadata(reader, writer, {}, [])
    return sorted(out.parent.glob(out.stem + "-*-of-*.gguf"))


@pytest.mark.llama
@pytest.mark.slow
async def test_split_model_pulled_from_the_hub_loads_and_generates(smollm2_path, hubsrv, tmp_path):
    from .conftest import require_llama_core

    require_llama_core()
    try:  # the bench extra brings numpy for the vendored gguf-py writer
        import numpy  # noqa: F401
    except ImportError:
        from .conftest import missing

        missing("numpy (for the vendored gguf-py writer)")
    from inferd import Request
    from inferd.backends.llamacpp import LlamaCpp

    parts = _split_smollm2(smollm2_path, tmp_path / "split" / "Smol-Q4_1.gguf", 100)
    assert len(parts) == 3
    hubsrv.add_commit("acme/smol-split", {p.name: p.read_bytes() for p in parts})
    path = models.resolve("hf://acme/smol-split:Q4_1")
    assert path.name == "Smol-Q4_1-00001-of-00003.gguf"
    request = Request.chat("Say hello.", max_tokens=8, temperature=0.0)
    texts = []
    for model in (path, smollm2_path):  # the split model answers as the whole one does
        async with LlamaCpp(model, n_ctx=256, n_threads=1) as b:
            events = [ev async for ev in b.generate(request)]
        texts.append("".join(getattr(e, "text", "") for e in events[:-1]))
    assert texts[0] and texts[0] == texts[1]


def test_the_local_hub_speaks_the_clients_protocol(hubsrv, tmp_path):
    """The stand-in answers huggingface_hub's own listing and download calls (so the
    pulls above meet the protocol the real Hub speaks, headers included)."""
    from huggingface_hub import HfApi, hf_hub_download

    commit = hubsrv.add_commit("acme/model-GGUF", QUANTS)
    api = HfApi(endpoint=hubsrv.url)
    want = hashlib.sha256(QUANTS["Model-Q4_K_M.gguf"]).hexdigest()
    tree = {f.path: f for f in api.list_repo_tree("acme/model-GGUF")}
    assert tree["Model-Q4_K_M.gguf"].lfs.sha256 == want and tree["README.md"].lfs is None
    [info] = api.get_paths_info("acme/model-GGUF", ["Model-Q4_K_M.gguf"], revision=commit)
    assert info.size == len(QUANTS["Model-Q4_K_M.gguf"])
    got = hf_hub_download(
        "acme/model-GGUF", "Model-Q4_K_M.gguf", endpoint=hubsrv.url, cache_dir=tmp_path / "c"
    )
    assert Path(got).read_bytes() == QUANTS["Model-Q4_K_M.gguf"]
    assert commit in got  # it read X-Repo-Commit


def test_most_files_per_entry_is_enforced(hubsrv, monkeypatch):
    parts = {f"T-Q4_K_M-{i:05d}-of-00003.gguf": make_gguf(salt=bytes([i])) for i in (1, 2, 3)}
    hubsrv.add_commit("acme/many", parts)
    monkeypatch.setattr(hub, "MAX_FILES_PER_ENTRY", 3)
    with pytest.raises(ModelLoadError, match="has 3 parts; at most 3"):
        hub.pull("hf://acme/many")
    monkeypatch.setattr(hub, "MAX_FILES_PER_ENTRY", 4)
    assert len(hub.pull("hf://acme/many").record["files"]) == 3


def test_too_little_disk_is_refused_before_downloading(hubsrv, monkeypatch, tmp_path):
    import shutil as sh

    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    real = sh.disk_usage
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(ModelLoadError, match=r"needs 4320 more bytes and the store's disk has 100"):
        hub.pull("hf://acme/model-GGUF")
    assert store_files(tmp_path) == [] and not hubsrv.gets(
        "/cdn/" + hashlib.sha256(QUANTS["Model-Q4_K_M.gguf"]).hexdigest()
    )


def test_a_hostile_listing_never_names_a_path(hubsrv, tmp_path):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    hubsrv.listed_sha256["Model-Q4_K_M.gguf"] = "../../../escaped"
    with pytest.raises(ModelLoadError, match=r"listed no valid sha256 for 'Model-Q4_K_M\.gguf'"):
        hub.pull("hf://acme/model-GGUF")
    assert (
        not (tmp_path / "escaped.part").exists()
        and not (tmp_path / "home" / "escaped.part").exists()
    )
    assert store_files(tmp_path) == []
