"""Settings: defaults, an optional YAML file (CITYBRIDGE_CONFIG) and CITYBRIDGE_* environment variables, in that order."""
from __future__ import annotations

import os
from typing import Any, Literal

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
    temporal_limit: int = Field(1000, description="most instances per attribute in one temporal response; more "
                                "gives 206 Partial Content with a Content-Range (clause 6.3.10)")
    context_timeout: float = Field(5.0, description="seconds to wait for a remote @context")
    context_cache_ttl: float = Field(3600.0, description="seconds a fetched remote @context is kept")
    notify_timeout: float = Field(10.0, description="seconds to wait for a notification endpoint (unless its own timeout is set)")
    notify_max_attempts: int = Field(20, description="delivery attempts of a notification before it is recorded as failed")
    notify_backoff_max: float = Field(60.0, description="longest wait, in seconds, between two delivery attempts")
    notify_join_backlog: int = Field(10, description="when a delivery read finds at least this many queued "
                                     "notifications of one subscription (its endpoint is slower than its updates), "
                                     "consecutive ones of distinct entities are sent joined in one notification "
                                     "(0: never)")
    notify_process: bool = Field(True, description="deliver notifications from a child process of its own, so "
                                 "that sending them takes no CPU from the API and ingest (false: this process sends "
                                 "them; an in-memory SQLite store always does)")
    log_level: str = Field("info", description="debug, info, warning or error")
    workers: int = Field(1, description="uvicorn worker processes; they share the store (SQLite in WAL mode or PostgreSQL)")
    mqtt_enabled: bool = Field(True, description="ingest device uplinks over MQTT (IoT Agent JSON topics and profile topics)")
    mqtt_url: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker: mqtt://[user:pass@]host:port or mqtts://...")
    mqtt_client_id: str = Field("citybridge-ingest", description="fixed MQTT client id of the persistent session "
                                "(-1, -2, ... appended for further processes on one machine)")
    mqtt_shared_group: str = Field("", description="shared subscription group ($share/<group>/...) so several "
                                   "workers split the uplinks; 'citybridge' when workers > 1 and this is empty")
    mqtt_tls_ca: str = Field("", description="CA certificate file to verify an mqtts:// broker (system CAs if empty)")
    mqtt_version: str = Field("5", description="MQTT protocol version: 5 or 3.1.1 (the embedded broker speaks 3.1.1)")
    mqtt_embedded: str = Field("auto", description="auto: start an embedded broker (amqtt) on loopback when none "
                               "answers at mqtt_url; never: just keep retrying the configured broker")
    max_payload_bytes: int = Field(64 * 1024, description="largest uplink payload; larger ones are dead-lettered")
    profiles_dir: str = Field("device-profiles", description="folder of device profiles (*.yaml)")
    ingest_batch_max: int = Field(1000, description="most uplinks committed together in one batch")
    ingest_batch_wait: float = Field(0.02, description="seconds an uplink waits for others to fill its batch")
    history: bool = Field(True, description="record every attribute change in the history table (the temporal API "
                          "and InfluxDB forwarding read it)")
    influx_url: str = Field("", description="InfluxDB to forward history to, e.g. http://127.0.0.1:8086 (empty: off)")
    influx_version: Literal["auto", "1", "2"] = Field("auto", description="InfluxDB API: 1 (/write line protocol, database + retention "
                                "policy + user/password), 2 (influxdb-client: org, bucket, token; also InfluxDB 3.x "
                                "and other servers of the v2 write API), or auto: 2 when influx_token or influx_bucket "
                                "is set, else 1")
    influx_database: str = Field("citybridge", description="InfluxDB 1.x database (created when missing)")
    influx_retention_policy: str = Field("", description="InfluxDB 1.x retention policy (empty: the database default)")
    influx_username: str = Field("", description="InfluxDB 1.x user (empty: no authentication)")
    influx_password: str = Field("", description="InfluxDB 1.x password")
    influx_org: str = Field("", description="InfluxDB 2.x organisation (name or id)")
    influx_bucket: str = Field("", description="InfluxDB 2.x bucket (3.x: the database); empty: influx_database")
    influx_token: str = Field("", description="InfluxDB 2.x/3.x API token")
    influx_precision: Literal["s", "ms", "us", "ns"] = Field("us", description="timestamp precision of the points: s, ms, us or ns (times "
                                  "are cut to it; the temporal API from InfluxDB needs us or ns)")
    influx_tags: str = Field("", description="static tags added to every point: key=value,key=value")
    influx_batch_size: int = Field(5000, description="most history rows sent to InfluxDB in one write")
    influx_flush_interval: float = Field(0.5, description="seconds the oldest unsent row may wait for a batch to "
                                         "fill before a smaller batch is sent")
    influx_forward: bool = Field(True, description="run the forwarder in this process (with several processes on one "
                                 "store, let exactly one forward; the others still apply the backlog bound)")
    influx_max_backlog: int = Field(2_000_000, description="most history rows that may wait unsent to InfluxDB; at "
                                    "the bound NGSI-LD writes get 503 with Retry-After and MQTT uplinks are not "
                                    "acknowledged until the backlog drains (0: no bound)")
    influx_instances: bool = Field(False, description="also write each history row in full (JSON, measurement "
                                   "citybridge_instances) so the temporal API can be answered from InfluxDB; on "
                                   "when temporal_source is influxdb")
    temporal_source: Literal["store", "influxdb"] = Field("store", description="where the temporal API reads history: store (the history "
                                 "table) or influxdb (InfluxDB 1.x /query, the citybridge_instances measurement)")


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
