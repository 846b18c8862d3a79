"""The `citybridge` command: `citybridge serve` runs the middleware; every option is also a CITYBRIDGE_* variable."""
from __future__ import annotations

import click

from .config import Settings, load_settings

_FIELDS = Settings.model_fields


def _help(name: str) -> str:
    field = _FIELDS[name]
    return f"{field.description} [env CITYBRIDGE_{name.upper()}; default {field.default}]"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="citybridge")
def main() -> None:
    """CityBridge: smart-city IoT middleware with an NGSI-LD context broker."""


@main.command()
@click.option("--config", "config_file", envvar="CITYBRIDGE_CONFIG", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of settings (same names as the options) [env CITYBRIDGE_CONFIG]")
@click.option("--host", default=None, help=_help("host"))
@click.option("--port", type=int, default=None, help=_help("port"))
@click.option("--store", default=None, help=_help("store"))
@click.option("--max-body-bytes", type=int, default=None, help=_help("max_body_bytes"))
@click.option("--default-limit", type=int, default=None, help=_help("default_limit"))
@click.option("--max-limit", type=int, default=None, help=_help("max_limit"))
@click.option("--context-timeout", type=float, default=None, help=_help("context_timeout"))
@click.option("--notify-timeout", type=float, default=None, help=_help("notify_timeout"))
@click.option("--notify-max-attempts", type=int, default=None, help=_help("notify_max_attempts"))
@click.option("--notify-backoff-max", type=float, default=None, help=_help("notify_backoff_max"))
@click.option("--notify-join-backlog", type=int, default=None, help=_help("notify_join_backlog"))
@click.option("--notify-process/--no-notify-process", default=None, help=_help("notify_process"))
@click.option("--log-level", default=None, help=_help("log_level"))
@click.option("--workers", type=int, default=None, help=_help("workers"))
@click.option("--mqtt-enabled/--no-mqtt", default=None, help=_help("mqtt_enabled"))
@click.option("--mqtt-url", default=None, help=_help("mqtt_url"))
@click.option("--mqtt-client-id", default=None, help=_help("mqtt_client_id"))
@click.option("--mqtt-shared-group", default=None, help=_help("mqtt_shared_group"))
@click.option("--mqtt-tls-ca", default=None, help=_help("mqtt_tls_ca"))
@click.option("--mqtt-version", type=click.Choice(["5", "3.1.1"]), default=None, help=_help("mqtt_version"))
@click.option("--mqtt-embedded", type=click.Choice(["auto", "never"]), default=None, help=_help("mqtt_embedded"))
@click.option("--max-payload-bytes", type=int, default=None, help=_help("max_payload_bytes"))
@click.option("--profiles-dir", default=None, help=_help("profiles_dir"))
@click.option("--ingest-batch-max", type=int, default=None, help=_help("ingest_batch_max"))
@click.option("--ingest-batch-wait", type=float, default=None, help=_help("ingest_batch_wait"))
# history, InfluxDB and the temporal API (issue 5)
@click.option("--temporal-limit", type=int, default=None, help=_help("temporal_limit"))
@click.option("--history/--no-history", default=None, help=_help("history"))
@click.option("--temporal-source", type=click.Choice(["store", "influxdb"]), default=None, help=_help("temporal_source"))
@click.option("--influx-url", default=None, help=_help("influx_url"))
@click.option("--influx-version", type=click.Choice(["auto", "1", "2"]), default=None, help=_help("influx_version"))
@click.option("--influx-database", default=None, help=_help("influx_database"))
@click.option("--influx-retention-policy", default=None, help=_help("influx_retention_policy"))
@click.option("--influx-username", default=None, help=_help("influx_username"))
@click.option("--influx-password", default=None, help=_help("influx_password"))
@click.option("--influx-org", default=None, help=_help("influx_org"))
@click.option("--influx-bucket", default=None, help=_help("influx_bucket"))
@click.option("--influx-token", default=None, help=_help("influx_token"))
@click.option("--influx-precision", type=click.Choice(["s", "ms", "us", "ns"]), default=None,
              help=_help("influx_precision"))
@click.option("--influx-tags", default=None, help=_help("influx_tags"))
@click.option("--influx-batch-size", type=int, default=None, help=_help("influx_batch_size"))
@click.option("--influx-flush-interval", type=float, default=None, help=_help("influx_flush_interval"))
@click.option("--influx-forward/--no-influx-forward", default=None, help=_help("influx_forward"))
@click.option("--influx-max-backlog", type=int, default=None, help=_help("influx_max_backlog"))
@click.option("--influx-instances/--no-influx-instances", default=None, help=_help("influx_instances"))
def serve(config_file: str | None, **options) -> None:
    """Run the middleware (HTTP API on --host:--port)."""
    import uvicorn

    from .app import create_app
    from .logs import setup_logging

    settings = load_settings(config_file, **options)
    log_config = setup_logging(settings.log_level)
    if settings.workers > 1:
        import os
        os.environ.update({f"CITYBRIDGE_{k.upper()}": str(v) for k, v in settings.model_dump().items()})
        uvicorn.run("middleware.app:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_config=log_config, access_log=False)
        return
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=log_config,
                access_log=False, http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
