"""The tuneloop Serve application: the REST ingress, the predictor, the runner, the monitor and
the metrics hub.

``build_app`` is what ``tuneloop up`` runs locally and what a KubeRay RayService names in its
Serve config (``import_path: server.app:build_app``).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from prometheus_client import CollectorRegistry, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from jobs.logs import configure_logging
from jobs.runner import ensure_runner
from jobs.settings import Settings, get_settings
from jobs.store import Store
from monitoring.metrics import JobsCollector, ensure_hub
from monitoring.monitor import ensure_monitor
from server.api import Services, build_api, set_services
from server.auth import bootstrap_tokens
from server.predictor import Predictor

log = logging.getLogger(__name__)

APP_NAME = "tuneloop"
api = build_api()


def metrics_exposition(store: Store) -> Any:
    """Event metrics from the hub, then job metrics read from the store now."""
    jobs_registry = CollectorRegistry(auto_describe=False)
    jobs_registry.register(JobsCollector(store))

    def exposition() -> bytes:
        events = ray.get(ensure_hub().exposition.remote(), timeout=10)
        return bytes(events) + generate_latest(jobs_registry)

    return exposition


# The ingress waits on the database and the predictor; it needs no CPU of its own reserved.
@serve.deployment(name="Api", max_ongoing_requests=200, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ApiIngress:
    def __init__(self, predictor: DeploymentHandle, settings: dict[str, Any]) -> None:
        parsed = Settings.model_validate(settings)
        configure_logging(parsed)
        parsed.ensure_dirs()
        store = Store.open(parsed.resolved_database_url())
        # Tokens are left out of the Serve config the settings came in; read them from this
        # replica's own environment.
        bootstrap_tokens(store, get_settings())
        ensure_hub()
        ensure_runner(parsed)
        ensure_monitor(parsed)
        set_services(Services(parsed, store, predictor, metrics_exposition(store)))
        log.info("API ready; database %s", store.engine.url.render_as_string(hide_password=True))


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application; ``args`` override settings read from TUNELOOP_* variables."""
    settings = Settings.model_validate({**Settings().model_dump(), **(args or {})})
    document = settings.model_dump(mode="json")
    # Bounded queue: past it the handle refuses at once (503 from the API) rather than holding
    # every waiting request in memory.
    predictor = Predictor.options(
        ray_actor_options={"num_cpus": settings.predictor_cpus},
        max_queued_requests=settings.predict_max_queued_requests,
    )
    return ApiIngress.bind(predictor.bind(document), document)
