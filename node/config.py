"""Node configuration: defaults, then a TOML file, then environment variables, then flags.

Each layer overrides the one before it, so a user can keep settings in the file and still
change one for a single run. Every value is validated once, as it is loaded (`config_checks`),
so the rest of the node can trust a `NodeConfig`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import platformdirs

from ..scheduler.replica_demand import DEFAULT_MAX_REPLICAS
from .config_checks import ConfigError, validate
from .engine.options import check_engine_args
from .setting_values import parse_size

APP_NAME = "sharedllm"
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 9337
# An answer with no limit of its own stops here: small models may otherwise go on until the
# context is full (minutes on a laptop).
DEFAULT_MAX_TOKENS = 256
ENV_PREFIX = "SHAREDLLM_"
_MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 8  # names gossiped per model: every node reads them
MAX_ALIAS_CHARS = 128


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start. Paths are absolute once loaded."""

    data_dir: Path
    cache_dir: Path
    engine_dir: Path | None = None
    # An archive from `engine pack` to install when no engine is found (instead of building).
    engine_archive: Path | None = None
    # With no engine found: join the mesh and take a member's build of this platform (opt-in).
    engine_from_mesh: bool = False
    model: Path | None = None
    model_name: str | None = None
    # What the model is for: text, embedding or rerank. Unset: what its GGUF says.
    model_kind: str | None = None
    # Other names clients may use for this node's model (e.g. the name a tool insists on).
    model_aliases: tuple[str, ...] = ()
    # A request naming a model the mesh does not know is refused (404) even when the mesh
    # offers only one model; by default it goes to that one, as llama-server does.
    strict_model_names: bool = False
    api_host: str = DEFAULT_API_HOST
    api_port: int = DEFAULT_API_PORT
    # The data plane's TCP port (rpc tunnels, API forwarding, weights). Unset: the mesh port
    # + 1 (any free port when the mesh port is 0).
    data_port: int | None = None
    # Announce this node and look for members on the LAN by mDNS (on the mesh's non-loopback
    # interfaces only; a node on 127.0.0.1 never multicasts).
    mdns: bool = True
    # Act as a circuit relay (libp2p circuit relay v2) for members that cannot be reached
    # directly (behind NATs): members only, each circuit paced and bounded (README says how).
    relay: bool = False
    # Ask the router to forward the mesh and data ports by UPnP, and advertise its public
    # address (only when the node listens on a network, not on loopback alone).
    upnp: bool = True
    # Copy split models' rpc tunnels in C (native_relay.c, built on first start) rather than
    # in Python; off, or where it cannot be built, they take the Python path.
    native_relay: bool = True
    # Let an engine built with our sealed transport seal rpc tunnels itself, the node handing
    # it each authenticated connection (no relay in between); off, the native relay copies them.
    engine_seals: bool = True
    context_size: int = 4096
    # Requests this node's model engine runs at once (continuous batching), each with a KV
    # cache of context_size tokens; the planner gives fewer when memory is short.
    parallel_slots: int = 4
    # Speculative decoding of this node's models (the lowest holder's setting counts): "ngram"
    # drafts from n-grams of the text (llama.cpp's ngram-mod), several tokens per round trip
    # where text repeats; "draft" with a draft model on the primary; "auto" lets the planner
    # choose by what drafts yielded; "off".
    speculation: str = "auto"
    # A small model of the same vocabulary that drafts for this node's model when it leads.
    # Unset: the embedded default model, where it is already here and matches.
    draft_model: Path | None = None
    # How this node's models are split: by the "planner", or in proportion to each node's
    # "memory" as llama.cpp does (to compare the two). The lowest holder's setting counts.
    split: str = "planner"
    # Placements of this node's model at once, on disjoint nodes, where memory allows: demand
    # picks the count between these two (the settings of the holder with the lowest peer id
    # count).
    min_replicas: int = 1
    max_replicas: int = DEFAULT_MAX_REPLICAS
    # The chat template of the model this node offers: a llama.cpp built-in name or a Jinja
    # file. Unset: the file's own, else the built-in one of the model's family.
    chat_template: str | None = None
    # Tokens an answer may have when the request sets no limit (its engine stops there).
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    # Extra llama-server arguments for this node's model, from an allow-list (engine/options).
    engine_args: tuple[str, ...] = ()
    threads: int | None = None
    engine_load_timeout_s: float = 600.0
    log_level: str = "info"
    max_memory: str | None = None  # e.g. "6GiB": the most this node lends to models
    # Announce this RPC protocol version instead of the engine's (to try mixed-version meshes:
    # the planner never places nodes of different RPC versions together).
    rpc_protocol: str | None = None
    # Announce this compute speed (GFLOP/s) instead of the measured one: to favour a machine the
    # quick benchmark underrates, or to spare one that has other work.
    compute_gflops: float | None = None
    # Workers holding the model file fill their rpc-server weight cache from it before a load.
    prefill_weights: bool = True
    # Pace for the weights this node sends to workers without the model file (Mbit/s, 0 for
    # unpaced), so that a fetch leaves room for the serving traffic on the same links.
    weight_share_mbps: float = 800.0
    # Required to bind the API anywhere but loopback: clients send it as `Authorization: Bearer`
    # (OpenAI's clients) or `x-api-key` (Anthropic's).
    api_key: str | None = None
    # Web pages of these origins ("*": any) may call the API from a browser (CORS).
    cors_origins: tuple[str, ...] = ()
    # Members gone (dead, left or silent) this long are forgotten, and their old states refused.
    forget_gone_peers_after_s: float = 24 * 3600.0

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.toml"


# Settings a user may put in the TOML file or the environment, with their parsers.
_SETTING_TYPES: dict[str, type] = {
    "engine_dir": Path,
    "engine_archive": Path,
    "engine_from_mesh": bool,
    "model": Path,
    "draft_model": Path,
    "model_name": str,
    "model_kind": str,
    "model_aliases": tuple,
    "strict_model_names": bool,
    "api_host": str,
    "api_port": int,
    "data_port": int,
    "mdns": bool,
    "relay": bool,
    "upnp": bool,
    "native_relay": bool,
    "engine_seals": bool,
    "context_size": int,
    "parallel_slots": int,
    "speculation": str,
    "split": str,
    "min_replicas": int,
    "max_replicas": int,
    "chat_template": str,
    "default_max_tokens": int,
    "engine_args": list,
    "threads": int,
    "engine_load_timeout_s": float,
    "log_level": str,
    "cache_dir": Path,
    "max_memory": str,
    "rpc_protocol": str,
    "compute_gflops": float,
    "prefill_weights": bool,
    "weight_share_mbps": float,
    "api_key": str,
    "cors_origins": tuple,
    "forget_gone_peers_after_s": float,
}


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME))


def load_config(
    *,
    data_dir: Path | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Builds the effective configuration from file, environment and flag overrides."""
    env = os.environ if environ is None else environ
    chosen_data_dir = data_dir or _env_path(env, "DATA_DIR") or default_data_dir()
    config = NodeConfig(
        data_dir=chosen_data_dir.expanduser().resolve(), cache_dir=default_cache_dir()
    )
    file_path = config_file or _env_path(env, "CONFIG") or config.config_file
    if config_file is not None and not file_path.exists():
        raise ConfigError(f"config file {file_path} does not exist")
    config = _apply(config, _read_toml(file_path), source=str(file_path))
    config = _apply(config, _read_env(env), source="environment")
    config = _apply(config, {k: v for k, v in (overrides or {}).items() if v is not None}, "flags")
    validate(config)
    return config


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(ENV_PREFIX + name)
    return Path(value) if value else None


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_CONFIG_BYTES + 1)
        if len(raw) > _MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over {_MAX_CONFIG_BYTES} bytes")
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    node_table = data.get("node", data)
    if not isinstance(node_table, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    return {k: v for k, v in node_table.items() if not isinstance(v, dict)}


def _read_env(env: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in _SETTING_TYPES:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            found[name] = value
    return found


def _apply(config: NodeConfig, values: Mapping[str, Any], source: str) -> NodeConfig:
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in _SETTING_TYPES:
            known = ", ".join(sorted(_SETTING_TYPES))
            raise ConfigError(f"{source}: unknown setting {key!r} (known: {known})")
        changes[key] = _coerce(key, raw, source)
    return replace(config, **changes)


def _coerce(key: str, raw: Any, source: str) -> Any:
    wanted = _SETTING_TYPES[key]
    try:
        if wanted is Path:
            if not isinstance(raw, str | Path) or str(raw) == "":
                raise ValueError("expected a path")
            return Path(raw).expanduser().resolve()
        if wanted is int:
            if isinstance(raw, bool | float):
                raise ValueError("expected an integer")
            return int(raw)
        if wanted is bool:
            return _boolean(raw)
        if wanted is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if wanted is tuple:
            return _names(raw)
        if wanted is list:
            words = raw.split() if isinstance(raw, str) else raw
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise ValueError("expected a list of arguments")
            return check_engine_args(words)
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    except ValueError as err:  # EngineOptionError too
        raise ConfigError(f"{source}: setting {key!r} = {raw!r}: {err}") from None


def _names(raw: Any) -> tuple[str, ...]:
    """A list of names: a TOML array of strings, or one string of comma-separated names."""
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of names")
    names = tuple(dict.fromkeys(name.strip() for name in items if name.strip()))
    if len(names) > MAX_ALIASES or any(len(name) > MAX_ALIAS_CHARS for name in names):
        raise ValueError(f"at most {MAX_ALIASES} names of {MAX_ALIAS_CHARS} characters each")
    return names


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def setting_names() -> list[str]:
    """The names a user can set, for help texts and docs."""
    return sorted(_SETTING_TYPES)
