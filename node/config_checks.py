"""Checks of a loaded configuration: each value in range, and the combinations that would
expose the node or start an engine that cannot run, refused with a message that names the
setting and says what it accepts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..scheduler.placement import MAX_REPLICAS, MAX_SLOTS, SPLITS
from ..scheduler.speculation import POLICY_MODES
from .models.chat_template import BUILTIN_TEMPLATES
from .models.model_kind import KINDS
from .setting_values import is_loopback_host, parse_size

if TYPE_CHECKING:
    from .config import NodeConfig

MIN_FORGET_AFTER_S = 2 * 3600.0
MIN_API_KEY_CHARS = 16
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


def validate(config: NodeConfig) -> None:
    for name in ("api_port", "data_port"):
        port = getattr(config, name)
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{name} {port} is not a TCP port (0-65535)")
    _check_engine_settings(config)
    if config.engine_load_timeout_s <= 0:
        raise ConfigError("engine_load_timeout_s must be positive")
    if config.compute_gflops is not None and not 0 < config.compute_gflops < 1e9:
        raise ConfigError(f"compute_gflops {config.compute_gflops} must be a positive number")
    if not 0 <= config.weight_share_mbps < 1e7:
        raise ConfigError(
            f"weight_share_mbps {config.weight_share_mbps} must be 0 (unpaced) or a positive rate"
        )
    if not MIN_FORGET_AFTER_S <= config.forget_gone_peers_after_s < 1e9:
        raise ConfigError(
            f"forget_gone_peers_after_s {config.forget_gone_peers_after_s} must be at least "
            f"{MIN_FORGET_AFTER_S:.0f} (live members of a big mesh republish only every hour or so)"
        )
    _check_api_settings(config)
    if config.max_memory is not None:
        try:
            parse_size(config.max_memory)
        except ValueError as err:
            raise ConfigError(f"max_memory {config.max_memory!r}: {err}") from None
    if config.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"log_level {config.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")


def _check_api_settings(config: NodeConfig) -> None:
    for origin in config.cors_origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ConfigError(
                f"cors_origins: {origin!r} is not an origin such as https://app.example "
                "(scheme and host, no path) or *"
            )
    if config.api_key is not None and len(config.api_key) < MIN_API_KEY_CHARS:
        raise ConfigError(f"api_key must have at least {MIN_API_KEY_CHARS} characters")
    if config.api_key is None and not is_loopback_host(config.api_host):
        raise ConfigError(
            f"the API would listen on {config.api_host}, reachable from the network: set an API "
            "key (--api-key or SHAREDLLM_API_KEY) that clients then send as "
            "'Authorization: Bearer KEY', or keep api_host at 127.0.0.1"
        )


def _check_engine_settings(config: NodeConfig) -> None:
    if config.context_size < 64:
        raise ConfigError(f"context_size {config.context_size} is too small (minimum 64)")
    if not 1 <= config.parallel_slots <= MAX_SLOTS:
        raise ConfigError(
            f"parallel_slots {config.parallel_slots} must be between 1 and {MAX_SLOTS}"
        )
    for name in ("min_replicas", "max_replicas"):
        count = getattr(config, name)
        if not 1 <= count <= MAX_REPLICAS:
            raise ConfigError(f"{name} {count} must be between 1 and {MAX_REPLICAS}")
    if config.min_replicas > config.max_replicas:
        raise ConfigError(
            f"min_replicas {config.min_replicas} is more than max_replicas {config.max_replicas}"
        )
    if not 1 <= config.default_max_tokens <= 1_000_000:
        raise ConfigError(
            f"default_max_tokens {config.default_max_tokens} must be between 1 and 1000000"
        )
    _check_chat_template(config.chat_template)
    if config.model_kind is not None and config.model_kind not in KINDS:
        raise ConfigError(f"model_kind {config.model_kind!r} is not one of {', '.join(KINDS)}")
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"threads {config.threads} must be at least 1")
    if config.split not in SPLITS:
        raise ConfigError(f"split {config.split!r} is not one of {', '.join(SPLITS)}")
    if config.speculation not in POLICY_MODES:
        raise ConfigError(
            f"speculation {config.speculation!r} is not one of {', '.join(POLICY_MODES)}"
        )


def _check_chat_template(template: str | None) -> None:
    if template is None or template in BUILTIN_TEMPLATES:
        return
    path = Path(template).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(BUILTIN_TEMPLATES))
        raise ConfigError(
            f"chat_template {template!r} is neither a built-in template ({known}) nor a file"
        )
