"""Settings: defaults, an optional YAML file (CITYBRIDGE_CONFIG) and CITYBRIDGE_* environment variables, in that order."""
from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the middleware; each is also the environment variable CITYBRIDGE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="CITYBRIDGE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(1026, description="port of the HTTP API (1026, as Orion-LD)")
    store: str = Field("sqlite:///citybridge-data/citybridge.db",
                       description="context store: sqlite:///<path> (embedded) or postgresql://user@host/db")
    max_body_bytes: int = Field(8 * 1024 * 1024, description="largest accepted request body; larger gets 413")
    default_limit: int = Field(20, description="page size of queries without limit=")
    max_limit: int = Field(1000, description="largest limit= accepted; larger gets 403 TooManyResults")
    context_timeout: float = Field(5.0, description="seconds to wait for a remote @context")
    context_cache_ttl: float = Field(3600.0, description="seconds a fetched remote @context is kept")
    notify_timeout: float = Field(10.0, description="seconds to wait for a notification endpoint (unless its own timeout is set)")
    notify_max_attempts: int = Field(20, description="delivery attempts of a notification before it is recorded as failed")
    notify_backoff_max: float = Field(60.0, description="longest wait, in seconds, between two delivery attempts")
    log_level: str = Field("info", description="debug, info, warning or error")
    workers: int = Field(1, description="uvicorn worker processes; they share the store (SQLite in WAL mode or PostgreSQL)")


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Settings from the YAML file (if any), then the environment, then explicit overrides (e.g. CLI options)."""
    path = config_file or os.environ.get("CITYBRIDGE_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config file must be a YAML mapping of setting: value")
        file_values = {k.replace("-", "_"): v for k, v in loaded.items()}
    env_settings = Settings()
    merged = {**file_values, **{k: getattr(env_settings, k) for k in env_settings.model_fields_set}}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**merged)
