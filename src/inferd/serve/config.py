"""The daemon's TOML configuration: backends in priority order, limits, paths.

Example (``~/.config/inferd/config.toml``)::

    [daemon]
    socket = "/run/user/1000/inferd/infer.sock"   # default: see default_socket_path()
    max_concurrent = 16        # generations running at once
    max_queued = 64            # generations waiting for a slot; beyond: queue_full
    drain_timeout_s = 30       # SIGTERM: how long in-flight requests may still run
    # and every other limit of inferd.serve.admission.Limits (ADR 0010), e.g.
    max_connections = 512
    write_stall_timeout_s = 60

    [router]
    failure_threshold = 3
    failure_window_s = 60
    open_for_s = 30
    policy = "priority"        # or "least_loaded": [[backend]]s are replicas (ADR 0020)
    # affinity_prefix_chars = 2048   # least_loaded: keep a conversation on one replica
    # affinity_max_imbalance = 4     # ... unless it has this many more streams
    # health_interval_s = 5          # background probes (least_loaded: on by default)

    [[backend]]                # first = highest priority
    type = "llamacpp"
    model = "smollm2-135m"

    [[backend]]
    type = "openai"
    base_url = "http://127.0.0.1:8080/v1"
    model = "some-model"
    api_key_env = "UPSTREAM_API_KEY"   # the key itself never appears in this file

    [[backend]]
    type = "anthropic"         # Anthropic's Messages API (ADR 0014)
    model = "claude-sonnet-4-5"
    api_key_env = "ANTHROPIC_API_KEY"   # unset: INFERD_ANTHROPIC_API_KEY, ANTHROPIC_API_KEY

Why keys only by environment-variable name: a config file gets copied, committed and
pasted into bug reports; an environment variable name is safe in all three. So a key
is refused wherever it would sit in the file: ``api_key``, a credential-like header
(``Authorization``, ``X-Api-Key``, anything named like a key, token, secret or
password) and a ``user:password@`` in a URL; and ``BackendSpec``'s repr redacts what
could still hold one. Every other ``[[backend]]`` key is passed to the backend's
constructor as a keyword.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from inferd.backend import Backend
from inferd.errors import redact_url
from inferd.limits import echo
from inferd.serve.admission import (
    DEFAULT_MAX_CONCURRENT as DEFAULT_MAX_CONCURRENT,
)
from inferd.serve.admission import (
    DEFAULT_MAX_QUEUED as DEFAULT_MAX_QUEUED,
)
from inferd.serve.admission import Limits
from inferd.types import parse_keep_alive

#: Where ``inferd serve`` looks for its configuration when ``--config`` is not given.
DEFAULT_CONFIG_PATH = Path("~/.config/inferd/config.toml")
#: Seconds in-flight requests may still run after SIGTERM before they are cancelled.
DEFAULT_DRAIN_TIMEOUT_S = 30.0
#: Seconds the daemon waits for its backends to become ready before serving anyway.
DEFAULT_LOAD_TIMEOUT_S = 600.0

#: ``type`` in ``[[backend]]`` -> (module, class). Imported only when used.
BACKEND_TYPES: dict[str, tuple[str, str]] = {
    "mock": ("inferd.backends.mock", "Mock"),
    "llamacpp": ("inferd.backends.llamacpp", "LlamaCpp"),
    "openai": ("inferd.backends.openai_compat", "OpenAICompat"),
    "anthropic": ("inferd.backends.anthropic_compat", "AnthropicCompat"),
}


class ConfigError(Exception):
    """The configuration file is missing, not TOML, or names something wrong."""


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/inferd/infer.sock``, else a per-user directory under /tmp.

    XDG_RUNTIME_DIR is per-user, private and cleared at logout: the right home for a
    socket. Without it, ``/tmp/inferd-<uid>/`` (created 0700 by the daemon).
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "inferd" / "infer.sock"
    return Path("/tmp") / f"inferd-{os.getuid()}" / "infer.sock"


def admin_socket_path(socket_path: Path) -> Path:
    """The admin socket lives beside the inference socket."""
    return socket_path.with_name("admin.sock")


@dataclass
class BackendSpec:
    """One ``[[backend]]`` table: its type, constructor keywords, and key variable."""

    type: str
    options: dict[str, Any] = field(default_factory=dict)
    api_key_env: str | None = None

    def __repr__(self) -> str:
        # parse_config refuses keys in the file, but a spec can be built by hand: values
        # that could hold a credential are redacted here whatever their origin
        return (
            f"BackendSpec(type={self.type!r}, options={redact_options(self.options)!r}, "
            f"api_key_env={self.api_key_env!r})"
        )


#: Names (of headers and options) that hold credentials; matched case-insensitively.
SECRET_NAME = re.compile(r"auth|key|token|secret|passw|cookie|credential|session", re.I)
#: Option names that are never secrets although they match :data:`SECRET_NAME`.
_NOT_SECRET = frozenset({"api_key_env", "tokens", "max_tokens"})


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with header values, credential-named values and URL user-info hidden."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "headers" and isinstance(value, Mapping):
            out[name] = {h: "<redacted>" for h in value}
        elif SECRET_NAME.search(name) and name not in _NOT_SECRET:
            out[name] = "<redacted>"
        elif isinstance(value, str) and "://" in value:
            out[name] = redact_url(value)
        else:
            out[name] = value
    return out


@dataclass
class Config:
    socket: Path | None = None
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
    limits: Limits = field(default_factory=Limits)
    router: dict[str, Any] = field(default_factory=dict)
    backends: list[BackendSpec] = field(default_factory=list)
    #: ``[[model]]`` tables: named models loaded on demand (inferd.serve.models_pool)
    models: list[ModelSpec] = field(default_factory=list)
    #: ``[groups]``: a name -> model names in priority order (served through a Router)
    groups: dict[str, list[str]] = field(default_factory=dict)
    #: ``[pool]``: keep_alive, max_loaded_bytes, load_retry_s, default
    pool: dict[str, Any] = field(default_factory=dict)

    @property
    def max_concurrent(self) -> int:
        return self.limits.max_concurrent

    @property
    def max_queued(self) -> int:
        return self.limits.max_queued


_LIMIT_KEYS = {f.name for f in fields(Limits)}
_DAEMON_KEYS = {"socket", "drain_timeout_s", "load_timeout_s"} | _LIMIT_KEYS
_ROUTER_KEYS = {
    "failure_threshold",
    "failure_window_s",
    "open_for_s",
    # replicas behind one endpoint (docs/adr/0020-replicas-least-loaded-router.md)
    "policy",
    "affinity_prefix_chars",
    "affinity_max_imbalance",
    "health_interval_s",
    "health_timeout_s",
}


def _check_router(where: str, router: Mapping[str, Any]) -> None:
    """Refuse a bad ``[router]`` value at load, not at the first request."""
    from inferd.balance import LoadBalancer, check_affinity, check_policy, check_prefix_chars
    from inferd.health import DEFAULT_HEALTH_TIMEOUT_S, check_interval

    try:
        check_policy(router.get("policy", "priority"))
        check_prefix_chars(router.get("affinity_prefix_chars"))
        check_affinity(router.get("policy", "priority"), router.get("affinity_prefix_chars"))
        if "affinity_max_imbalance" in router:
            LoadBalancer(("x",), max_imbalance=router["affinity_max_imbalance"])
        check_interval(
            router.get("health_interval_s"),
            router.get("health_timeout_s", DEFAULT_HEALTH_TIMEOUT_S),
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: [router] {e}") from None


def add_router_arguments(parser: Any) -> None:
    """``--router-policy`` and ``--affinity-prefix-chars`` for the commands that build a
    Router from a config (``inferd serve``, ``inferd bridge --config``); ADR 0020."""
    parser.add_argument(
        "--router-policy",
        choices=("priority", "least_loaded"),
        default=None,
        help="how the [[backend]]s share requests: in order with failover, or as replicas "
        "by load (overrides [router] policy; docs/adr/0020-replicas-least-loaded-router.md)",
    )
    parser.add_argument(
        "--affinity-prefix-chars",
        type=int,
        default=None,
        metavar="N",
        help="least_loaded: keep a conversation on one replica by a hash of its first N "
        "characters (overrides [router] affinity_prefix_chars)",
    )


def router_overrides(args: Any) -> dict[str, Any]:
    """The ``[router]`` options :func:`add_router_arguments` parsed (``None``: not given)."""
    return {
        "policy": getattr(args, "router_policy", None),
        "affinity_prefix_chars": getattr(args, "affinity_prefix_chars", None),
    }


def override_router(cfg: Config, **options: Any) -> Config:
    """``cfg`` with command-line ``[router]`` options (those not ``None``) put over the
    file's, checked like the file's (``inferd serve --router-policy ...``)."""
    merged = {**cfg.router, **{k: v for k, v in options.items() if v is not None}}
    _check_router("command line", merged)
    cfg.router = merged
    return cfg


#: Command-line flags for the llamacpp context's knobs, named as llama-server's:
#: (flag, LlamaCppOptions key, type, help) (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
LLAMACPP_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--flash-attn", "flash_attn", str, "flash attention: auto, on or off"),
    ("--cache-type-k", "type_k", str, "K cache type: f16, q8_0, q4_0, ..."),
    ("--cache-type-v", "type_v", str, "V cache type (quantised needs flash attention)"),
    ("--batch-size", "n_batch", int, "logical batch (tokens per decode call)"),
    ("--ubatch-size", "n_ubatch", int, "physical batch (tokens per compute graph)"),
    ("--split-mode", "split_mode", str, "several GPUs: none, layer or row"),
    ("--main-gpu", "main_gpu", int, "the GPU for split_mode none"),
    ("--rope-scaling", "rope_scaling", str, "none, linear, yarn or longrope"),
    ("--rope-freq-base", "rope_freq_base", float, "RoPE base frequency (0: the model's)"),
    ("--rope-freq-scale", "rope_freq_scale", float, "RoPE frequency scale (0: the model's)"),
    ("--yarn-orig-ctx", "yarn_orig_ctx", int, "YaRN: the model's original context"),
    ("--yarn-ext-factor", "yarn_ext_factor", float, "YaRN extrapolation mix factor"),
    ("--yarn-attn-factor", "yarn_attn_factor", float, "YaRN magnitude scaling factor"),
    ("--yarn-beta-fast", "yarn_beta_fast", float, "YaRN low correction dim"),
    ("--yarn-beta-slow", "yarn_beta_slow", float, "YaRN high correction dim"),
)


def add_llamacpp_arguments(parser: Any) -> None:
    """The llamacpp context's knobs as flags (``inferd run``, ``inferd serve``): each
    sets the LlamaCppOptions key of the same meaning, checked where the backend is
    built, like the TOML key (ADR 0026)."""
    for flag, key, kind, text in LLAMACPP_FLAGS:
        parser.add_argument(flag, dest=f"knob_{key}", type=kind, default=None, help=text)
    parser.add_argument(
        "--no-kv-offload", action="store_true", help="keep the KV cache in host memory"
    )
    parser.add_argument("--mlock", action="store_true", help="keep the weights in RAM")
    parser.add_argument("--no-mmap", action="store_true", help="read the weights, do not map")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA adapter loaded at start (repeatable; scale default 1.0)",
    )
    parser.add_argument(
        "--draft",
        default=None,
        metavar="ngram|PATH",
        help="speculative decoding: 'ngram' (prompt lookup) or a draft model's GGUF "
        "(docs/adr/0027-speculative-decoding-batched.md)",
    )


def llamacpp_overrides(args: Any) -> dict[str, Any]:
    """The llamacpp options :func:`add_llamacpp_arguments` parsed (only those given)."""
    out = {
        key: getattr(args, f"knob_{key}")
        for _flag, key, _kind, _text in LLAMACPP_FLAGS
        if getattr(args, f"knob_{key}", None) is not None
    }
    if getattr(args, "no_kv_offload", False):
        out["offload_kqv"] = False
    if getattr(args, "mlock", False):
        out["use_mlock"] = True
    if getattr(args, "no_mmap", False):
        out["use_mmap"] = False
    loras = []
    for item in getattr(args, "lora", None) or ():
        path, sep, scale = item.rpartition(":")
        try:
            loras.append((path, float(scale)) if sep and path else (item, 1.0))
        except ValueError:
            loras.append((item, 1.0))  # a ':' inside the path, no scale
    if loras:
        out["lora"] = loras
    draft = getattr(args, "draft", None)
    if draft:
        out["draft"] = "ngram" if draft == "ngram" else {"path": draft}
    return out


def override_llamacpp(cfg: Config, options: Mapping[str, Any]) -> Config:
    """``cfg`` with command-line llamacpp options put over every llamacpp backend's and
    model's (``inferd serve --cache-type-k q8_0 ...``; ADR 0026)."""
    if options:
        for spec in [*cfg.backends, *(m.backend for m in cfg.models)]:
            if spec.type == "llamacpp":
                spec.options.update(options)
    return cfg


def override_rpc(cfg: Config, servers: str | None) -> Config:
    """``cfg`` with every llamacpp backend and model split over ``servers`` (``inferd serve
    --rpc host:port,...``; checked where the backend is built, like the TOML key;
    docs/adr/0019-rpc-backend.md)."""
    if servers:
        specs = [*cfg.backends, *(m.backend for m in cfg.models)]
        for spec in specs:
            if spec.type == "llamacpp":
                spec.options["rpc_servers"] = servers
    return cfg


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and check a config file; ``ConfigError`` says what is wrong and where."""
    p = Path(path if path is not None else DEFAULT_CONFIG_PATH).expanduser()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} not found; create it with at least one [[backend]] table, "
            "or pass --config"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return parse_config(data, where=str(p))


def _positive(where: str, name: str, value: Any, *, integer: bool) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    least = 0 if name == "max_queued" or not integer else 1
    if isinstance(value, bool) or not ok_type or value < least:
        kind = f"an integer >= {least}" if integer else "a non-negative number"
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}")
    return value


def parse_config(data: Mapping[str, Any], *, where: str = "config") -> Config:
    # [bridge]: the HTTP bridge's own settings, read by inferd.serve.bridge (ADR 0028)
    unknown = set(data) - {"daemon", "router", "backend", "model", "groups", "pool", "bridge"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {sorted(unknown)}; "
            "expected [daemon], [router], [[backend]], [[model]], [groups], [pool], [bridge]"
        )
    cfg = Config()
    daemon = data.get("daemon", {})
    if not isinstance(daemon, Mapping):
        raise ConfigError(f"{where}: [daemon] must be a table")
    bad = set(daemon) - _DAEMON_KEYS
    if bad:
        raise ConfigError(
            f"{where}: unknown [daemon] key(s) {sorted(bad)}; known: {sorted(_DAEMON_KEYS)}"
        )
    if "socket" in daemon:
        cfg.socket = Path(str(daemon["socket"])).expanduser()
    for name in ("drain_timeout_s", "load_timeout_s"):
        if name in daemon:
            setattr(cfg, name, float(_positive(where, name, daemon[name], integer=False)))
    try:
        cfg.limits = Limits(**{k: v for k, v in daemon.items() if k in _LIMIT_KEYS})
    except ValueError as e:
        raise ConfigError(f"{where}: [daemon] {e}") from None
    router = data.get("router", {})
    if not isinstance(router, Mapping) or set(router) - _ROUTER_KEYS:
        raise ConfigError(f"{where}: [router] accepts only {sorted(_ROUTER_KEYS)}")
    _check_router(where, router)
    cfg.router = dict(router)
    if "model" in data:
        _parse_models(cfg, data, where)
        return cfg
    backends = data.get("backend", [])
    if not isinstance(backends, list) or not backends:
        raise ConfigError(f"{where}: no [[backend]] tables; configure at least one backend")
    for i, table in enumerate(backends):
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: backend #{i + 1} must be a table")
        opts = dict(table)
        kind = opts.pop("type", None)
        if kind not in BACKEND_TYPES:
            raise ConfigError(
                f"{where}: backend #{i + 1} has type {kind!r}; "
                f"expected one of {sorted(BACKEND_TYPES)}"
            )
        if "api_key" in opts:
            raise ConfigError(
                f"{where}: backend #{i + 1} has api_key in the file; put the key in an "
                "environment variable and name it with api_key_env instead"
            )
        _refuse_inline_secrets(f"{where}: backend #{i + 1}", opts)
        key_env = opts.pop("api_key_env", None)
        if key_env is not None and (not isinstance(key_env, str) or not key_env):
            raise ConfigError(f"{where}: backend #{i + 1}: api_key_env must be a variable name")
        cfg.backends.append(BackendSpec(kind, opts, key_env))
    return cfg


@dataclass
class ModelSpec:
    """One ``[[model]]`` table: a named model the daemon loads on first use.

    ``source`` (llamacpp only) is a store name, a ``.gguf`` path or an ``hf://`` source,
    resolved by :func:`inferd.models.resolve` when the model is first loaded;
    ``keep_alive`` (seconds, negative = never unload) and ``memory_bytes`` (overrides
    the file + KV estimate) are ``None`` for the pool's defaults
    (docs/adr/0015-several-models-load-on-demand.md).
    """

    name: str
    backend: BackendSpec
    source: str | None = None
    keep_alive: float | None = None
    memory_bytes: int | None = None


#: Longest model or group name (it is echoed in errors and listed by ``/v1/models``).
MAX_MODEL_NAME_CHARS = 128
#: ``[pool]`` keys (their defaults live in :mod:`inferd.serve.models_pool`).
_POOL_KEYS = {"keep_alive", "max_loaded_bytes", "load_retry_s", "default"}


def _parse_models(cfg: Config, data: Mapping[str, Any], where: str) -> None:
    """``[[model]]``, ``[groups]`` and ``[pool]``: names unique, groups name models."""
    if "backend" in data:
        raise ConfigError(
            f"{where}: [[backend]] and [[model]] do not mix; list upstreams as [[model]] "
            'tables with type = "openai" and a name'
        )
    tables = data["model"]
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{where}: [[model]] must be one or more tables")
    seen: dict[str, int] = {}
    for i, table in enumerate(tables):
        spec = _model_spec(f"{where}: model #{i + 1}", table)
        if spec.name in seen:
            raise ConfigError(
                f"{where}: model name {spec.name!r} is configured twice (model "
                f"#{seen[spec.name] + 1} and #{i + 1}); each [[model]] needs its own name"
            )
        seen[spec.name] = i
        cfg.models.append(spec)
    cfg.groups = _parse_groups(where, data.get("groups", {}), set(seen))
    pool = data.get("pool", {})
    if not isinstance(pool, Mapping) or set(pool) - _POOL_KEYS:
        raise ConfigError(f"{where}: [pool] accepts only {sorted(_POOL_KEYS)}")
    cfg.pool = dict(pool)
    if "keep_alive" in pool:
        cfg.pool["keep_alive"] = _keep_alive(f"{where}: [pool]", pool["keep_alive"])
    for name in ("max_loaded_bytes", "load_retry_s"):
        if name in pool:
            _positive(f"{where}: [pool]", name, pool[name], integer=name == "max_loaded_bytes")
    default = pool.get("default")
    if default is not None and default not in seen and default not in cfg.groups:
        raise ConfigError(
            f"{where}: [pool] default {echo(default)} is not a model or group; "
            f"choose one of {sorted(seen) + sorted(cfg.groups)}"
        )


def _keep_alive(where: str, value: Any) -> float | None:
    try:
        return parse_keep_alive(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _model_spec(where: str, table: Any) -> ModelSpec:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    opts = dict(table)
    name = opts.pop("name", None)
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_MODEL_NAME_CHARS:
        raise ConfigError(
            f"{where}: needs a name (a non-empty string of at most {MAX_MODEL_NAME_CHARS} "
            "characters): requests pick the model by it"
        )
    kind = opts.pop("type", "llamacpp")
    source = opts.pop("source", None)
    keep_alive = _keep_alive(f"{where} ({name})", opts.pop("keep_alive", None))
    memory = opts.pop("memory_bytes", None)
    if memory is not None:
        _positive(f"{where} ({name})", "memory_bytes", memory, integer=True)
    if kind == "llamacpp" and (not isinstance(source, str) or not source):
        raise ConfigError(
            f"{where} ({name}): needs source = a store name, a .gguf path or hf://owner/repo"
        )
    if kind == "llamacpp" and "model" in opts:
        raise ConfigError(f"{where} ({name}): give the file as source, not model")
    if kind != "llamacpp" and source is not None:
        raise ConfigError(f"{where} ({name}): source is for llamacpp models only")
    spec = parse_config({"backend": [{"type": kind, **opts}]}, where=f"{where} ({name})")
    return ModelSpec(name, spec.backends[0], source, keep_alive, memory)


def _parse_groups(where: str, groups: Any, models: set[str]) -> dict[str, list[str]]:
    """``[groups] chat = ["local", "cloud"]``: each member a configured model, in order."""
    if not isinstance(groups, Mapping):
        raise ConfigError(f"{where}: [groups] must be a table of name = [model names]")
    out: dict[str, list[str]] = {}
    for name, members in groups.items():
        if name in models:
            raise ConfigError(f"{where}: group {name!r} has the name of a model; rename one")
        if (
            not isinstance(members, list)
            or not members
            or len(set(map(str, members))) != len(members)
        ):
            raise ConfigError(f"{where}: group {name!r} must list distinct model names")
        unknown = [m for m in members if m not in models]
        if unknown:
            raise ConfigError(
                f"{where}: group {name!r} names unknown model(s) {echo(unknown)}; "
                f"models are {sorted(models)}"
            )
        out[str(name)] = [str(m) for m in members]
    return out


def _refuse_inline_secrets(where: str, opts: Mapping[str, Any]) -> None:
    """A credential in a header or in a URL's user-info is refused like ``api_key``."""
    headers = opts.get("headers")
    if headers is not None and not isinstance(headers, Mapping):
        raise ConfigError(f"{where}: headers must be a table of name = value")
    for name in headers or ():
        if SECRET_NAME.search(str(name)):
            raise ConfigError(
                f"{where}: header {echo(str(name), 40)} looks like a credential; a key "
                "never sits in the config file: put it in an environment variable and "
                "name it with api_key_env"
            )
    for name, value in opts.items():
        if isinstance(value, str) and "://" in value:
            try:
                userinfo = urlsplit(value).netloc.rpartition("@")[0]
            except ValueError:
                continue
            if userinfo:
                raise ConfigError(
                    f"{where}: {name} carries a user:password@ part "
                    f"({redact_url(value)} without it); put the key in an environment "
                    "variable and name it with api_key_env"
                )


def build_backend(
    spec: BackendSpec, index: int | None = 0, progress: Callable[[float], Any] | None = None
) -> Backend:
    """Import the backend class lazily and construct it from the spec's keywords.

    The one place a backend is built from a spec: the daemon's and the bridge's config
    (``build_backends``) and ``inferd run``'s flags (``index=None``: errors then name the
    backend's type, not a config table). The backend checks its own settings (for
    llamacpp, :class:`inferd.backends.llamacpp.options.LlamaCppOptions`). ``progress``
    (a fraction 0..1) is passed to backends that load something big (llamacpp) unless
    the config set its own.
    """
    module_name, cls_name = BACKEND_TYPES[spec.type]
    label = f"{spec.type} backend" if index is None else f"backend #{index + 1} ({spec.type})"
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{label}: cannot import {module_name}.{cls_name}: {e}") from None
    kwargs = dict(spec.options)
    if spec.api_key_env is not None:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise ConfigError(
                f"{label}: environment variable {spec.api_key_env} (api_key_env) is not set"
            )
        kwargs["api_key"] = key
    if progress is not None and spec.type == "llamacpp" and "progress" not in kwargs:
        kwargs["progress"] = progress
    if spec.type == "mock" and "tokens" in kwargs:
        kwargs["tokens"] = tuple(kwargs["tokens"])
    try:
        return cls(**kwargs)  # type: ignore[no-any-return]
    except TypeError as e:
        # e names the bad keyword, never its value, so the key cannot leak here
        raise ConfigError(f"{label}: bad setting: {e}") from None
    except Exception as e:  # any constructor failure is a config problem
        msg = getattr(e, "message", None) or str(e)
        if spec.api_key_env is not None and kwargs.get("api_key"):
            msg = msg.replace(kwargs["api_key"], "<redacted>")
        raise ConfigError(f"{label}: {type(e).__name__}: {msg}") from None


def build_backends(
    cfg: Config, progress: Callable[[int, float], Any] | None = None
) -> list[Backend]:
    """All configured backends, in priority order.

    ``progress(index, fraction)`` follows the loading (the daemon's admin status shows
    it). Runs blocking constructors: call it in a worker thread from async code.
    """
    built: list[Backend] = []
    for i, spec in enumerate(cfg.backends):
        one = None if progress is None else (lambda f, i=i: progress(i, f))
        built.append(build_backend(spec, i, one))
        if progress is not None:
            progress(i, 1.0)
    return built
