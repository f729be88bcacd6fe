"""Store management: names and aliases per entry, ``rm`` by reference count, listings
read from GGUF headers; through the Python API and the ``inferd`` command line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from inferd import ModelLoadError, catalog, cli, hub, models
from inferd.gguf_meta import read_info, template_family

from .gguf_bytes import tiny_gguf
from .test_hub import QUANTS, hubsrv, make_gguf, store_files

__all__ = ["hubsrv"]  # the fixture, shared with test_hub


def test_names_and_aliases_share_one_entry(hubsrv, tmp_path):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF", names=["mine"])
    assert models.resolve("mine") == models.resolve("acme/model-GGUF:Q4_K_M") == entry.model_path
    assert catalog.aliases(catalog.get("mine")) == ["acme/model-GGUF:Q4_K_M"]
    hub.pull("hf://acme/model-GGUF:Q4_K_M", names=["again"])  # same files: specs merge
    assert {"hf://acme/model-GGUF", "hf://acme/model-GGUF:Q4_K_M"} <= set(
        catalog.get("again").record["specs"]
    )
    assert len(store_files(tmp_path)) == 1


def test_rm_keeps_files_another_name_uses(hubsrv, tmp_path):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF", names=["mine"])
    deleted, kept = catalog.remove("mine")
    assert deleted == [] and kept == [entry.model_path] and entry.model_path.exists()
    with pytest.raises(ModelLoadError, match="unknown model 'mine'"):
        models.resolve("mine")
    deleted, kept = catalog.remove("acme/model-GGUF:Q4_K_M")
    assert deleted == [entry.model_path] and kept == []
    assert store_files(tmp_path) == []
    with pytest.raises(ModelLoadError, match="no model named"):
        catalog.remove("acme/model-GGUF:Q4_K_M")


def test_shared_projector_stays_while_one_quant_uses_it(hubsrv, tmp_path):
    proj = make_gguf(arch="clip", padding=700)
    hubsrv.add_commit(
        "acme/vision",
        {
            "v-Q4_K_M.gguf": make_gguf(padding=900),
            "v-Q8_0.gguf": make_gguf(padding=1900),
            "mmproj-F16.gguf": proj,
        },
    )
    q4, q8 = hub.pull("hf://acme/vision:Q4_K_M"), hub.pull("hf://acme/vision:Q8_0")
    assert q4.mmproj_path == q8.mmproj_path and len(store_files(tmp_path)) == 3
    deleted, kept = catalog.remove(q4.name)
    assert deleted == [q4.model_path] and kept == [q4.mmproj_path]
    assert q8.mmproj_path.read_bytes() == proj and q8.present()
    catalog.remove(q8.name)
    assert store_files(tmp_path) == []


def test_rm_of_a_split_entry_removes_its_links(hubsrv, tmp_path):
    parts = {f"S-Q4_K_M-{i:05d}-of-00002.gguf": make_gguf(salt=bytes([i])) for i in (1, 2)}
    hubsrv.add_commit("acme/split", parts)
    entry = hub.pull("hf://acme/split")
    assert entry.model_path.is_symlink() and entry.present()
    catalog.remove(entry.name)
    assert store_files(tmp_path) == []
    assert list((tmp_path / "home" / "models" / "links").iterdir()) == []


def test_local_pull_with_a_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    src = tiny_gguf(tmp_path / "local.gguf", padding=500)
    assert cli.main(["pull", str(src), "--name", "short"]) == 0
    path = capsys.readouterr().out.strip()
    assert models.resolve("short") == models.resolve("local.gguf") == Path(path)


def test_cli_pull_models_show_rm(hubsrv, capsys):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    assert cli.main(["pull", "hf://acme/model-GGUF", "--name", "qwen3-4b"]) == 0
    out, err = capsys.readouterr()
    assert "acme/model-GGUF:Q4_K_M: default quantisation Q4_K_M" in out
    assert err == ""  # no progress bar when stderr is not a terminal
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("qwen3-4b"))
    for fact in ("Q4_K_M", "llama", "2.0K params", "ctx   2048", "template chatml", "tools hermes"):
        assert fact in row, (fact, row)
    assert cli.main(["show", "qwen3-4b"]) == 0
    out = capsys.readouterr().out
    assert "aliases: acme/model-GGUF:Q4_K_M" in out and "source: hf://acme/model-GGUF/" in out
    assert "context_length: 2048" in out and "parameters: 2048" in out
    assert cli.main(["rm", "qwen3-4b"]) == 0
    assert "0 file(s) deleted, 1 kept" in capsys.readouterr().out
    assert cli.main(["show", "qwen3-4b"]) == 1
    err = capsys.readouterr().err
    assert "no model named 'qwen3-4b'" in err and "acme/model-GGUF:Q4_K_M" in err


def test_cli_hub_errors_are_one_line(hubsrv, capsys):
    assert cli.main(["pull", "hf://nobody/nothing"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("inferd: error: nobody/nothing is not a model repo") and err.count("\n") == 1
    )


def test_listing_a_hostile_header_says_unreadable(hubsrv, tmp_path, capsys):
    hubsrv.add_commit("acme/model-GGUF", QUANTS)
    entry = hub.pull("hf://acme/model-GGUF")
    blob = entry.model_path
    blob.chmod(0o600)
    data = bytearray(blob.read_bytes())
    data[16:24] = struct.pack("<Q", 2**60)  # n_kv far beyond the file
    blob.write_bytes(bytes(data))
    assert cli.main(["models"]) == 0
    assert "unreadable" in capsys.readouterr().out


def test_metadata_of_the_real_smollm2(smollm2_path):
    info = read_info([smollm2_path])
    assert info.architecture == "llama" and info.context_length == 8192
    assert 100e6 < info.parameters < 200e6  # SmolLM2-135M
    assert info.file_type == "Q4_1"
    assert template_family(info.chat_template) == "chatml"
