"""The benchmark peers do the same work (issue 12, "Honest benchmarks"; bench/fair.py).

A ratio against a peer means something only if both sides do the same work: the same
flash-attention setting, end-of-generation banned the same way (in C, not by a Python
logits processor per token), every generated token counted, and the same server
settings. These tests check the pieces the benchmarks rely on, with the real model.
"""

from __future__ import annotations

import pytest

from tests.conftest import missing

#: Tokens asked for in the end-of-generation tests: far past where the model stops.
N_TOKENS = 24
#: A prompt the model answers in a few tokens and then ends (EOG), if allowed.
SHORT = "<|im_start|>user\nSay only the word yes.<|im_end|>\n<|im_start|>assistant\n"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        missing("llama-cpp-python (the bench extra)")
    return llama_cpp


@pytest.mark.llama
def test_lcp_eog_ban_in_c_counts_every_token(smollm2_path) -> None:
    llama_cpp = _llama_cpp()
    from bench.fair import eog_banned_llama

    free = llama_cpp.Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False)
    reply = free.create_completion(SHORT, max_tokens=N_TOKENS, temperature=0.0)
    assert reply["choices"][0]["finish_reason"] == "stop"  # unbanned, it ends early
    llm = eog_banned_llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False)
    chunks = list(llm.create_completion(SHORT, max_tokens=N_TOKENS, temperature=0.0, stream=True))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert llm.sampled == N_TOKENS
    # Llama.n_tokens misses the last sampled token (never decoded): the old count
    prompt_len = len(llm.tokenize(SHORT.encode(), add_bos=True, special=True))
    assert llm.n_tokens - prompt_len == N_TOKENS - 1
    chain = llm._init_sampler(temp=0.0)
    first = llama_cpp.llama_sampler_chain_get(chain.sampler, 0)
    assert llama_cpp.llama_sampler_name(first) == b"logit-bias"
    assert chain.custom_samplers == []  # no Python logits processor in the chain


@pytest.mark.llama
def test_lcp_eog_ban_keeps_greedy_tokens(smollm2_path) -> None:
    """Banning only EOG changes no other choice: the first tokens match an unbanned run."""
    _llama_cpp()
    import llama_cpp as lc
    from bench.fair import eog_banned_llama

    plain = lc.Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False)
    banned = eog_banned_llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False)
    prompt = "<|im_start|>user\nCount from one to ten.<|im_end|>\n<|im_start|>assistant\n"
    a = plain.create_completion(prompt, max_tokens=8, temperature=0.0)
    b = banned.create_completion(prompt, max_tokens=8, temperature=0.0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


@pytest.mark.llama
def test_our_flash_attention_is_read_from_libllama(smollm2_path) -> None:
    from bench.fair import our_flash_attn

    from inferd._fast import _llama as L

    # on a CPU build every op of this model runs on the CPU, which has flash attention
    assert our_flash_attn(str(smollm2_path)) is True
    assert L.recent_log() is not None  # the probe restored the logger and still works


def test_bridge_config_is_the_servers_settings() -> None:
    from bench.servers import N_BATCH, Settings, bridge_config

    from inferd.serve.config import parse_config

    s = Settings(
        '/m/a "b".gguf', conc=8, ctx_per_slot=1024, threads=2, gpu_layers=0, flash_attn=True
    )
    import tomllib

    cfg = parse_config(tomllib.loads(bridge_config(s, "split")))
    opts = cfg.backends[0].options
    assert cfg.backends[0].type == "llamacpp"
    assert opts == {
        "model": '/m/a "b".gguf',
        "n_ctx": 8 * 1024,
        "parallel": 8,
        "n_threads": 2,
        "n_batch": N_BATCH,
        "n_gpu_layers": 0,
        "kv_layout": "split",
    }
    # the A/B peer "bridge split thread" differs in that one key only (ADR 0034)
    thread = parse_config(tomllib.loads(bridge_config(s, "split", inline_steps=False)))
    assert thread.backends[0].options == {**opts, "inline_steps": False}


def test_llama_server_gets_the_same_settings(monkeypatch) -> None:
    import subprocess
    from pathlib import Path

    from bench import servers

    seen: list[list[str]] = []

    class FakePopen:
        def __init__(self, cmd, **kw) -> None:
            seen.append(cmd)

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    s = servers.Settings("m.gguf", 4, 1024, 2, 0, flash_attn=True)
    servers.start_llama_server(Path("llama-server"), s, 1234)
    cmd = seen[0]

    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert (flag("-np"), flag("-c"), flag("-t"), flag("-tb")) == ("4", "4096", "2", "2")
    assert (flag("-b"), flag("-ub"), flag("-fa")) == ("512", "512", "on")


def test_buffered_parsers_find_what_ours_find() -> None:
    from bench import bench_chat_parsers as b

    b._check_buffered()  # raises when a family's buffered peer misses a call or reasoning
    assert set(b.BUFFERED) == set(b.REPLIES) == set(b.FAMILIES)


def test_request_bodies_are_the_same_for_every_peer() -> None:
    from bench.http_load import chat_body

    greedy, sampled = chat_body(7, 32, False), chat_body(7, 32, True)
    assert greedy["ignore_eos"] is True and greedy["temperature"] == 0.0
    assert "seed" not in greedy
    assert sampled["seed"] == 7 and sampled["temperature"] == 0.8
    assert sampled["messages"] == greedy["messages"] != chat_body(8, 32, False)["messages"]


def test_a_rounds_shared_system_prompt_is_its_own_and_of_the_asked_length() -> None:
    from bench.http_load import chat_body, shared_system

    one, other = shared_system(1000, 400), shared_system(2000, 400)
    assert 400 <= len(one.split()) < 420 and one != other
    assert one.split(":")[0] == "Handbook 1000"  # the round's id opens it
    body = chat_body(3, 8, False, one)
    assert body["messages"][0] == {"role": "system", "content": one}
    assert body["messages"][1] == chat_body(3, 8, False)["messages"][0]


def test_speculative_bench_reads_chat_and_completion_chunks_alike() -> None:
    from bench.bench_speculative import _chunk_text, _function, completion_prompt

    assert _chunk_text({"delta": {"content": "a"}}) == "a"  # a chat chunk
    assert _chunk_text({"text": "b", "index": 0}) == "b"  # a completion chunk
    assert _chunk_text({"delta": {}, "finish_reason": "stop"}) == ""
    raw = completion_prompt("edit", 2)
    assert _function(variant=2) in raw and raw.endswith("Edited:\n```python\n")
    assert completion_prompt("chat", 1) != completion_prompt("chat", 2)


def test_bench_model_option_takes_a_catalog_name_or_a_path(smollm2_path) -> None:
    import argparse

    from bench.model_args import DEFAULT_LABEL, model_path

    assert model_path(argparse.Namespace(model="smollm2-135m")) == (
        str(smollm2_path),
        "smollm2-135m",
    )
    assert model_path(argparse.Namespace(model=str(smollm2_path))) == (
        str(smollm2_path),
        smollm2_path.name,
    )
    assert model_path(argparse.Namespace(model=None)) == (str(smollm2_path), DEFAULT_LABEL)
