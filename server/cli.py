"""The ``tuneloop`` command: the local stack, jobs, datasets, models and predictions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from jobs.logs import configure_logging
from jobs.settings import Settings, get_settings
from server.auth import Scope, generate_token
from server.client import ApiError, Client, find_token

app = typer.Typer(
    help="tuneloop: fine-tune pretrained models on Ray, serve and watch them.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Submit, list, follow and cancel jobs.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
models_app = typer.Typer(help="List models, their versions, and promote one.", no_args_is_help=True)
tokens_app = typer.Typer(help="Create, list and revoke API tokens (admin).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")
app.add_typer(tokens_app, name="tokens")
console = Console()
err = Console(stderr=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", help="API URL; TUNELOOP_URL or the local stack's by default.")
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="API token; TUNELOOP_TOKEN or the local stack's admin token file by default.",
        show_default=False,
    ),
]


def api_url(url: str | None) -> str:
    settings = get_settings()
    return (
        url or os.environ.get("TUNELOOP_URL") or (f"http://{settings.api_host}:{settings.api_port}")
    )


def client(url: str | None, token: str | None) -> Client:
    # One command makes few requests; with no keep-alive nothing needs closing afterwards.
    token = token or find_token(get_settings().admin_token_file())
    return Client(api_url(url), token=token, keep_alive=False)


def fail(exc: ApiError) -> typer.Exit:
    err.print(f"[red]error[/red] {exc.status} {exc.code}: {exc.message}")
    return typer.Exit(code=1)


@app.command()
def up() -> None:
    """Start the local stack: a Ray head, the API, the runner and the predictor."""
    from server.local import up as start

    settings = get_settings()
    configure_logging(settings)
    with console.status("starting Ray and the tuneloop application"):
        url = start(settings)
    console.print(f"tuneloop is up at [bold]{url}[/bold] (API docs at {url}/docs)")
    console.print(f"state lives in {settings.home}")
    console.print(
        f"admin token in {settings.admin_token_file()} (readable by you only); the CLI uses it "
        "unless given --token or TUNELOOP_TOKEN"
    )


@app.command()
def down() -> None:
    """Stop the local stack; jobs, datasets and models stay in the home folder."""
    from server.local import down as stop

    stop(get_settings())
    console.print("tuneloop is down")


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML or JSON spec.")],
    follow_job: Annotated[
        bool, typer.Option("--follow", help="Follow the job to its end.")
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Submit a job spec file."""
    try:
        job = client(url, token).submit(spec)
    except ApiError as exc:
        raise fail(exc) from None
    console.print(f"submitted [bold]{job['id']}[/bold] ({job['status']})")
    if follow_job:
        follow(job["id"], url, token)


@jobs_app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List jobs, newest first."""
    try:
        jobs = client(url, token).jobs(status=status)
    except ApiError as exc:
        raise fail(exc) from None
    table = Table("id", "model", "status", "trigger", "version", "created")
    for job in jobs:
        table.add_row(
            job["id"],
            job["model_name"],
            job["status"],
            job["trigger"],
            str(job["model_version"] or ""),
            job["created_at"][:19],
        )
    console.print(table)


@jobs_app.command("show")
def show(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Show one job as JSON, with its epoch metrics."""
    c = client(url, token)
    try:
        job = c.job(job_id)
        job["epochs"] = c.epochs(job_id)
    except ApiError as exc:
        raise fail(exc) from None
    console.print_json(json.dumps(job))


@jobs_app.command("log")
def log_lines(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Print a job's log."""
    try:
        for line in client(url, token).log(job_id):
            console.print(
                f"{line['at'][:19]} {line['level']:<7} {line['message']}",
                markup=False,
                highlight=False,
            )
    except ApiError as exc:
        raise fail(exc) from None


@jobs_app.command("cancel")
def cancel(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Cancel a queued or running job."""
    try:
        job = client(url, token).cancel(job_id)
    except ApiError as exc:
        raise fail(exc) from None
    console.print(
        f"{job_id}: {job['status']}" + (" (cancel requested)" if job["cancel_requested"] else "")
    )


@jobs_app.command("follow")
def follow(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Follow a job: a progress bar over its epochs, its log lines and its epoch metrics."""
    try:
        job = watch_job(client(url, token), job_id)
    except ApiError as exc:
        raise fail(exc) from None
    if job["status"] != "SUCCEEDED":
        raise typer.Exit(code=1)


def watch_job(c: Client, job_id: str) -> dict[str, Any]:
    """Show a job's progress until it ends; return it as it ended."""
    job = c.job(job_id)
    if job["spec"].get("search"):
        return watch_search(c, job_id)
    total = int(job["spec"]["hyperparameters"]["epochs"])
    seen_log = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(job_id, total=total)
        for job in c.follow(job_id):
            for line in c.log(job_id, after=seen_log):
                seen_log = line["id"]
                progress.console.print(f"  {line['message']}", markup=False, highlight=False)
            progress.update(
                task, completed=len(c.epochs(job_id)), description=f"{job_id} {job['status']}"
            )
    print_epochs(c.epochs(job_id))
    if job["status"] == "SUCCEEDED":
        metrics = (job.get("result") or {}).get("metrics", {})
        console.print(
            f"[green]SUCCEEDED[/green]: {job['model_name']} v{job['model_version']}, "
            f"validation accuracy {metrics.get('val_accuracy', float('nan')):.4f}"
        )
    else:
        console.print(f"[red]{job['status']}[/red]: {job.get('error') or ''}")
    return job


def print_epochs(epochs: list[dict[str, Any]]) -> None:
    if not epochs:
        return
    keys = ["train_loss", "val_loss", "val_accuracy", "val_f1"]
    table = Table("epoch", *keys)
    for row in epochs:
        table.add_row(
            str(row["epoch"]), *(f"{row['metrics'].get(k, float('nan')):.4f}" for k in keys)
        )
    console.print(table)


@jobs_app.command("trials")
def trials(
    job_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until the search ends.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show a search job's trials: the values each tried, its state, epochs and best metric."""
    c = client(url, token)
    try:
        if watch:
            job = watch_search(c, job_id)
        else:
            console.print(trials_table(c.job(job_id), c.trials(job_id)))
            return
    except ApiError as exc:
        raise fail(exc) from None
    if job["status"] != "SUCCEEDED":
        raise typer.Exit(code=1)


def watch_search(c: Client, job_id: str) -> dict[str, Any]:
    """Show a search as a live table of its trials, with its log lines, until it ends."""
    job = c.job(job_id)
    seen_log = 0
    with Live(trials_table(job, c.trials(job_id)), console=console, auto_refresh=False) as live:
        for job in c.follow(job_id):
            for line in c.log(job_id, after=seen_log):
                seen_log = line["id"]
                live.console.print(f"  {line['message']}", markup=False, highlight=False)
            live.update(trials_table(job, c.trials(job_id)), refresh=True)
    if job["status"] == "SUCCEEDED":
        search = job["result"]["search"]
        console.print(
            f"[green]SUCCEEDED[/green]: {job['model_name']} v{job['model_version']} from trial "
            f"{search['best_trial']}, {search['metric']} {search['best_metric']:.4f}"
        )
    else:
        console.print(f"[red]{job['status']}[/red]: {job.get('error') or ''}")
    return job


def trials_table(job: dict[str, Any], found: dict[str, Any]) -> Table:
    """A row per trial: its state, the values it tried, epochs and best metric; * marks the best."""
    paths = sorted((job["spec"].get("search") or {}).get("space", {}))
    table = Table(
        "trial",
        "state",
        *(path.split(".")[-1] for path in paths),
        "epochs",
        found["metric"] or "metric",
        title=f"{job['id']} {job['status']}",
    )
    for trial in found["trials"]:
        best = trial["best_metric"]
        table.add_row(
            trial["trial_id"] + (" *" if trial["is_best"] else ""),
            trial["state"],
            *(shown(trial["config"].get(path)) for path in paths),
            str(len(trial["curve"])),
            "" if best is None else f"{best:.4f}",
        )
    return table


def shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@datasets_app.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    name: Annotated[str | None, typer.Option(help="A name to show.")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a CSV, JSONL or Parquet file; prints its dataset id."""
    try:
        dataset = client(url, token).upload(path, name=name)
    except ApiError as exc:
        raise fail(exc) from None
    console.print(f"{dataset['id']}  {dataset['rows']} rows  {dataset['name']}")


@datasets_app.command("list")
def list_datasets(url: UrlOption = None, token: TokenOption = None) -> None:
    """List uploaded datasets."""
    try:
        datasets = client(url, token).datasets()
    except ApiError as exc:
        raise fail(exc) from None
    table = Table("id", "name", "format", "rows", "bytes")
    for d in datasets:
        table.add_row(d["id"], d["name"], d["format"], str(d["rows"]), str(d["size_bytes"]))
    console.print(table)


@models_app.command("list")
def list_models(url: UrlOption = None, token: TokenOption = None) -> None:
    """List models and their production versions."""
    try:
        models = client(url, token).models()
    except ApiError as exc:
        raise fail(exc) from None
    table = Table("model", "production", "created")
    for m in models:
        table.add_row(m["name"], str(m["production_version"] or "-"), m["created_at"][:19])
    console.print(table)


@models_app.command("show")
def show_model(name: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """List a model's versions with their validation accuracy."""
    try:
        model = client(url, token).model(name)
    except ApiError as exc:
        raise fail(exc) from None
    table = Table("version", "job", "val_accuracy", "parent", "production")
    for v in model["versions"]:
        table.add_row(
            str(v["version"]),
            v["job_id"] or "",
            f"{v['metrics'].get('val_accuracy', float('nan')):.4f}",
            str(v["parent_version"] or ""),
            "yes" if v["version"] == model["production_version"] else "",
        )
    console.print(table)


@models_app.command("promote")
def promote(name: str, version: int, url: UrlOption = None, token: TokenOption = None) -> None:
    """Make a version the one that answers predictions."""
    try:
        client(url, token).promote(name, version)
    except ApiError as exc:
        raise fail(exc) from None
    console.print(f"{name}: v{version} is in production")


@app.command()
def predict(
    name: str,
    texts: Annotated[list[str], typer.Argument(help="Texts to classify, or with --images files.")],
    images: Annotated[
        bool, typer.Option("--images", help="The arguments are image files to upload.")
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Classify texts or image files with a model's production version."""
    try:
        if images:
            answer = client(url, token).predict_files(name, [Path(text) for text in texts])
        else:
            answer = client(url, token).predict(name, texts)
    except ApiError as exc:
        raise fail(exc) from None
    for text, prediction in zip(texts, answer["predictions"], strict=True):
        best = prediction["probabilities"][prediction["label"]]
        console.print(
            f"{prediction['label']} ({best:.2f}) v{answer['version']}  {text}",
            markup=False,
            highlight=False,
        )


@tokens_app.command("create")
def create_token(
    name: Annotated[str, typer.Option(help="Who or what will use it.")],
    scope: Annotated[
        Scope, typer.Option(help="read; submit (also read); admin (everything).")
    ] = Scope.READ,
    expires_in_days: Annotated[
        int | None, typer.Option(help="Days until it stops working; never if not given.")
    ] = None,
    save: Annotated[
        Path | None,
        typer.Option(help="Write the token to this new file, readable by you only, not stdout."),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Create a token. It is shown once, now: only a digest of it is kept."""
    if save is not None and save.exists():
        err.print(f"[red]error[/red] --save {save}: the file exists; name a new one")
        raise typer.Exit(code=1)
    try:
        made = client(url, token).create_token(name, scope.value, expires_in_days=expires_in_days)
    except ApiError as exc:
        raise fail(exc) from None
    expires = made["expires_at"][:19] if made["expires_at"] else "never"
    err.print(f"token {made['id']} ({made['name']}, scope {made['scope']}, expires {expires})")
    if save is None:
        typer.echo(made["token"])  # alone on stdout, for a pipe or a file
        return
    descriptor = os.open(save, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(made["token"] + "\n")
    err.print(f"written to {save}")


@tokens_app.command("list")
def list_tokens(url: UrlOption = None, token: TokenOption = None) -> None:
    """List tokens: never the tokens themselves, which are not kept."""
    try:
        tokens = client(url, token).tokens()
    except ApiError as exc:
        raise fail(exc) from None
    table = Table(
        Column("id", no_wrap=True, min_width=12),
        "name",
        "scope",
        "state",
        "created",
        Column("created by", no_wrap=True, min_width=12),
    )
    for t in tokens:
        state, created = token_state(t), t["created_at"][:10]
        table.add_row(t["id"], t["name"], t["scope"], state, created, t["created_by"] or "")
    console.print(table)


def token_state(token: dict[str, Any]) -> str:
    if token["revoked_at"]:
        return f"revoked {token['revoked_at'][:10]}"
    if token["expires_at"]:
        return f"until {token['expires_at'][:10]}"
    return "active"


@tokens_app.command("revoke")
def revoke_token(token_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Revoke a token by its id; it is refused from the next request on."""
    try:
        revoked = client(url, token).revoke_token(token_id)
    except ApiError as exc:
        raise fail(exc) from None
    console.print(f"{revoked['id']} ({revoked['name']}) revoked at {revoked['revoked_at'][:19]}")


@tokens_app.command("generate")
def generate() -> None:
    """Print a new random token without asking any server, for TUNELOOP_ADMIN_TOKEN or
    TUNELOOP_METRICS_TOKEN; the API stores its digest when it starts with it."""
    typer.echo(generate_token())


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="Folder with the sentiment files.")] = Path(
        "tests/data/sentiment"
    ),
    keep_running: Annotated[bool, typer.Option(help="Leave the local stack up.")] = False,
) -> None:
    """Start the local stack and fine-tune MiniLM on product reviews through the REST API."""
    from server.demo import run_demo

    settings: Settings = get_settings()
    configure_logging(settings)
    run_demo(settings, data, console, keep_running=keep_running)


def main() -> None:
    # `ray start` turns token authentication on and keeps the token in ~/.ray. Ray reads the
    # mode once, when it is imported, so it must be set before anything imports ray.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    app()
