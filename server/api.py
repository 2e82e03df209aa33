"""The REST routes under /v1: thin, each validating its input and calling one function."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray.serve.exceptions import BackPressureError

from jobs.data import DataCatalog
from jobs.errors import Overloaded, TooLarge
from jobs.runner import wake_runner
from jobs.settings import Settings
from jobs.spec import JobSpec, parse_spec
from jobs.store import ApiToken, Feedback, JobStatus, Store
from jobs.submission import submit_job
from server.auth import BearerAuth, document_scopes, expiry, issue_token
from server.errors import install_error_handlers
from server.limits import BodyLimit, BodyLimits
from server.schemas import (
    MAX_SQL_INT,
    DatasetImportIn,
    DatasetList,
    DatasetOut,
    DriftReportList,
    DriftReportOut,
    FeedbackIn,
    FeedbackOut,
    Health,
    JobList,
    JobLogOut,
    JobMetricsOut,
    JobOut,
    ModelList,
    ModelOut,
    PredictIn,
    PredictOut,
    PromoteIn,
    TokenCreated,
    TokenIn,
    TokenList,
    TokenOut,
    TrialList,
)

log = logging.getLogger(__name__)

# As many images as PredictIn takes inputs.
MAX_PREDICT_FILES = 256


class Services:
    """What the routes work with, made once per API replica."""

    def __init__(self, settings: Settings, store: Store, predictor: Any, metrics: Any) -> None:
        self.settings = settings
        self.store = store
        self.catalog = DataCatalog(settings, store)
        self.predictor = predictor
        self.metrics = metrics


_services: Services | None = None


def set_services(value: Services) -> None:
    """Give the routes their services; the Serve ingress calls this once per replica."""
    global _services
    _services = value


def services(_: Request) -> Services:
    if _services is None:
        raise RuntimeError("the API's services were not set up; set_services was never called")
    return _services


def find_token(token_id: str) -> ApiToken | None:
    if _services is None:
        raise RuntimeError("the API's services were not set up; set_services was never called")
    return _services.store.find_token(token_id)


def body_limits() -> BodyLimits:
    """The body limits of this replica's settings; the defaults until the services are set."""
    settings = _services.settings if _services is not None else Settings()
    return BodyLimits(json_bytes=settings.max_json_bytes, upload_bytes=settings.max_upload_bytes)


def run_blocking(function: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Database and file work runs off the event loop so one slow query stalls no one else."""
    return asyncio.to_thread(function, *args, **kwargs)


router = APIRouter(prefix="/v1")


@router.post("/jobs", status_code=201, response_model=JobOut, tags=["jobs"])
async def create_job(
    request: Request,
    document: Annotated[
        dict[str, Any],
        Body(
            description="A job spec.",
            examples=[{"model_name": "reviews", "data": {"dataset": "ds-..."}}],
        ),
    ],
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> JobOut:
    spec: JobSpec = parse_spec(document)
    s = services(request)
    job = await run_blocking(
        submit_job,
        store=s.store,
        settings=s.settings,
        spec=spec,
        idempotency_key=idempotency_key,
    )
    await run_blocking(wake_runner)
    return JobOut.of(job)


@router.get("/jobs", response_model=JobList, tags=["jobs"])
async def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    model_name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    jobs = await run_blocking(
        services(request).store.list_jobs, status=status, model_name=model_name, limit=limit
    )
    return JobList(jobs=[JobOut.of(job) for job in jobs])


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
async def get_job(request: Request, job_id: str) -> JobOut:
    return JobOut.of(await run_blocking(services(request).store.get_job, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
async def cancel_job(request: Request, job_id: str) -> JobOut:
    return JobOut.of(await run_blocking(services(request).store.request_cancel, job_id))


@router.get("/jobs/{job_id}/log", response_model=JobLogOut, tags=["jobs"])
async def job_log(
    request: Request,
    job_id: str,
    after: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> JobLogOut:
    store = services(request).store
    await run_blocking(store.get_job, job_id)
    lines = await run_blocking(store.read_log, job_id, after_id=after, limit=limit)
    return JobLogOut.of(job_id, lines)


@router.get("/jobs/{job_id}/metrics", response_model=JobMetricsOut, tags=["jobs"])
async def job_metrics(request: Request, job_id: str) -> JobMetricsOut:
    store = services(request).store
    await run_blocking(store.get_job, job_id)
    return JobMetricsOut.of(job_id, await run_blocking(store.epoch_metrics, job_id))


@router.get("/jobs/{job_id}/trials", response_model=TrialList, tags=["jobs"])
async def job_trials(request: Request, job_id: str) -> TrialList:
    """A search job's trials, live while it runs; an empty list for any other job."""
    store = services(request).store
    job = await run_blocking(store.get_job, job_id)
    return TrialList.of(job, await run_blocking(store.list_trials, job_id))


@router.post("/datasets", status_code=201, response_model=DatasetOut, tags=["datasets"])
async def upload_dataset(
    request: Request,
    file: Annotated[
        UploadFile, File(description="CSV, JSONL or Parquet, or a zip of image class folders.")
    ],
    name: Annotated[str | None, Form(max_length=255)] = None,
) -> DatasetOut:
    s = services(request)
    if file.size is not None and file.size > s.settings.max_upload_bytes:
        raise TooLarge(
            f"upload is {file.size} bytes; the limit is {s.settings.max_upload_bytes}", field="file"
        )
    dataset = await run_blocking(
        s.catalog.save_upload, file.file, file.filename or "upload", name=name
    )
    return DatasetOut.of(dataset)


@router.post("/datasets/import", status_code=201, response_model=DatasetOut, tags=["datasets"])
async def import_dataset(request: Request, body: DatasetImportIn) -> DatasetOut:
    """Fetch a dataset from an https URL; private, loopback and metadata addresses are refused."""
    catalog = services(request).catalog
    return DatasetOut.of(await run_blocking(catalog.import_url, body.url, name=body.name))


@router.get("/datasets", response_model=DatasetList, tags=["datasets"])
async def list_datasets(request: Request) -> DatasetList:
    datasets = await run_blocking(services(request).store.list_datasets)
    return DatasetList(datasets=[DatasetOut.of(d) for d in datasets])


@router.get("/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> ModelList:
    store = services(request).store
    models = await run_blocking(store.list_models)
    return ModelList(models=[ModelOut.of(m) for m in models])


@router.get("/models/{name}", response_model=ModelOut, tags=["models"])
async def get_model(request: Request, name: str) -> ModelOut:
    store = services(request).store
    model = await run_blocking(store.get_model, name)
    return ModelOut.of(model, await run_blocking(store.list_versions, name))


@router.post("/models/{name}/promote", response_model=ModelOut, tags=["models"])
async def promote_model(request: Request, name: str, body: PromoteIn) -> ModelOut:
    store = services(request).store
    await run_blocking(store.set_production, name, body.version)
    log.info("model %s: v%d promoted by request", name, body.version)
    return ModelOut.of(
        await run_blocking(store.get_model, name), await run_blocking(store.list_versions, name)
    )


@router.post(
    "/models/{name}/feedback", status_code=202, response_model=FeedbackOut, tags=["monitoring"]
)
async def feedback(request: Request, name: str, body: FeedbackIn) -> FeedbackOut:
    store = services(request).store
    await run_blocking(store.get_model, name)
    rows = [
        Feedback(model_name=name, prediction_id=item.prediction_id, label=item.label)
        for item in body.labels
    ]
    rows += [Feedback(model_name=name, text=item.text, label=item.label) for item in body.rows]
    await run_blocking(store.add_feedback, rows)
    return FeedbackOut(model=name, accepted=len(rows))


@router.get("/models/{name}/drift", response_model=DriftReportList, tags=["monitoring"])
async def drift_reports(
    request: Request, name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> DriftReportList:
    store = services(request).store
    await run_blocking(store.get_model, name)
    reports = await run_blocking(store.list_drift_reports, name, limit)
    return DriftReportList(reports=[DriftReportOut.model_validate(r) for r in reports])


@router.get("/drift/{report_id}", response_model=DriftReportOut, tags=["monitoring"])
async def drift_report(request: Request, report_id: str) -> DriftReportOut:
    report = await run_blocking(services(request).store.get_drift_report, report_id)
    return DriftReportOut.model_validate(report)


@router.get("/drift/{report_id}/report", tags=["monitoring"], response_class=Response)
async def drift_report_document(
    request: Request, report_id: str, format: Literal["html", "json"] = "html"
) -> Response:
    """The Evidently report of a drift check: HTML for a browser, or its JSON."""
    s = services(request)
    report = await run_blocking(s.store.get_drift_report, report_id)
    path = s.settings.resolved_artifact_root() / "reports" / f"{report.id}.{format}"
    media = "text/html" if format == "html" else "application/json"
    return Response(await run_blocking(path.read_bytes), media_type=media)


@router.post("/models/{name}/predict", response_model=PredictOut, tags=["models"])
async def predict(request: Request, name: str, body: PredictIn) -> PredictOut:
    return await _predict(request, name, body.inputs, "inputs")


async def _predict(
    request: Request, name: str, inputs: list[str] | list[bytes], field: str
) -> PredictOut:
    try:
        result = await services(request).predictor.predict.remote(name, inputs, field)
    except BackPressureError as exc:
        raise Overloaded(
            f"the predictor is at capacity ({exc.message}); retry after the Retry-After seconds"
        ) from None
    return PredictOut.model_validate(result)


@router.post("/models/{name}/predict/upload", response_model=PredictOut, tags=["models"])
async def predict_upload(
    request: Request,
    name: str,
    files: Annotated[list[UploadFile], File(description="Image files, one prediction each.")],
) -> PredictOut:
    """Classify uploaded image files, answered in the order they were sent."""
    limit = services(request).settings.max_upload_bytes
    if not 1 <= len(files) <= MAX_PREDICT_FILES:
        raise TooLarge(f"send 1 to {MAX_PREDICT_FILES} files, not {len(files)}", field="files")
    contents = []
    for index, upload in enumerate(files):
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(
                f"file {index} is over the limit of {limit} bytes", field=f"files[{index}]"
            )
        contents.append(data)
    return await _predict(request, name, contents, "files")


@router.post("/tokens", status_code=201, response_model=TokenCreated, tags=["tokens"])
async def create_token(request: Request, body: TokenIn) -> TokenCreated:
    """A new token; the response is the only place its plain text ever appears."""
    row, plain = await run_blocking(
        issue_token,
        services(request).store,
        name=body.name,
        scope=body.scope,
        expires_at=expiry(body.expires_in_days),
        created_by=request.state.token.id,
    )
    return TokenCreated(**TokenOut.model_validate(row).model_dump(), token=plain)


@router.get("/tokens", response_model=TokenList, tags=["tokens"])
async def list_tokens(request: Request) -> TokenList:
    tokens = await run_blocking(services(request).store.list_tokens)
    return TokenList(tokens=[TokenOut.model_validate(t) for t in tokens])


@router.delete("/tokens/{token_id}", response_model=TokenOut, tags=["tokens"])
async def revoke_token(request: Request, token_id: str) -> TokenOut:
    token = await run_blocking(services(request).store.revoke_token, token_id)
    log.info("token %s revoked by %s", token_id, request.state.token.id)
    return TokenOut.model_validate(token)


operations = APIRouter(tags=["operations"])


@operations.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    await run_blocking(services(request).store.count_jobs_by_status)
    return Health(status="ok", database="ok")


@operations.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body = await run_blocking(services(request).metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def build_api() -> FastAPI:
    """The FastAPI application with every route; Serve wraps it as the ingress."""
    app = FastAPI(
        title="tuneloop",
        version="0.1.0",
        description="Fine-tuning jobs, model versions and predictions. Every route but /healthz, "
        "/docs and /openapi.json needs a bearer token; each names its scope (x-tuneloop-scope).",
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limits=body_limits)
    app.include_router(router)
    app.include_router(operations)
    document_scopes(app)
    app.add_middleware(BearerAuth, find=find_token)
    return app
