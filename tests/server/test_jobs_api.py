"""The job server end to end, over HTTP, on the session's real local Ray cluster."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.runner import job_processes
from server.client import ApiError
from tests.conftest import Stack, tiny_spec
from tests.factories import read_sentiment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reviews(stack: Stack) -> str:
    return stack.data_file("reviews.csv", read_sentiment("amazon").iloc[:240])


def submit_and_wait(stack: Stack, spec: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    job = stack.client.submit(spec)
    return stack.client.wait(job["id"], timeout=timeout, interval=0.5)


def test_job_trains_registers_and_answers_predictions(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    job = submit_and_wait(stack, tiny_spec(tiny_model_dir, reviews, model_name="spine"))
    assert job["status"] == "SUCCEEDED", job["error"]

    epochs = stack.client.epochs(job["id"])
    assert [e["epoch"] for e in epochs] == [1, 2]
    for key in ("train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1"):
        assert 0 <= epochs[-1]["metrics"][key] < 10, key
    matrix = job["result"]["metrics"]["confusion_matrix"]
    assert sum(map(sum, matrix)) == 60  # a quarter of 240 rows held out for validation

    lines = [line["message"] for line in stack.client.log(job["id"])]
    assert any(line.startswith("epoch 2/2") for line in lines)
    assert "status RUNNING -> SUCCEEDED" in lines

    model = stack.client.model("spine")
    assert model["production_version"] == job["model_version"] == 1
    answer = stack.client.predict("spine", ["great phone", "it broke after a day"])
    assert answer["version"] == 1
    for prediction in answer["predictions"]:
        assert prediction["label"] in {"0", "1"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    version_dir = stack.settings.models_dir() / "spine" / job["id"]
    assert (version_dir / "encoder" / "model.safetensors").is_file()
    assert {"head.safetensors", "labels.json", "spec.json", "metrics.json"} <= {
        p.name for p in version_dir.iterdir()
    }
    assert model["versions"][0]["dataset_hash"] == stack.store.get_job(job["id"]).dataset_hash


def test_a_job_runs_in_the_process_started_ahead_of_it(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    def standby() -> Any:
        _, idle = job_processes(stack.settings)
        assert len(idle) <= 1, idle
        return idle[0] if idle else None

    stack.wait_for(lambda: standby() is not None, 120, "a job process started ahead")
    ahead = standby()
    job_id = stack.client.submit(
        tiny_spec(tiny_model_dir, reviews, model_name="ahead", hyperparameters={"epochs": 1})
    )["id"]
    stack.wait_for(lambda: job_id in job_processes(stack.settings)[0], 120, "the job's process")
    assert job_processes(stack.settings)[0][job_id] == ahead

    job = stack.client.wait(job_id, timeout=240)
    assert job["status"] == "SUCCEEDED", job["error"]
    # The process ends with its job, and a new one waits for the next.
    stack.wait_for(lambda: job_id not in job_processes(stack.settings)[0], 60, "the process to go")
    stack.wait_for(lambda: standby() not in (None, ahead), 120, "the next job's process")


def test_metrics_endpoint_counts_jobs_and_predictions(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    job = submit_and_wait(stack, tiny_spec(tiny_model_dir, reviews, model_name="counted"))
    stack.client.predict("counted", ["fine"])

    def scraped() -> str:
        return httpx.get(f"{stack.url}/metrics", headers=stack.auth, timeout=10).text

    stack.wait_for(
        lambda: 'tuneloop_predictions_total{model="counted",outcome="ok"}' in scraped(),
        30,
        "the prediction to reach the metrics hub",
    )
    text = scraped()
    assert job["status"] == "SUCCEEDED"
    assert 'tuneloop_jobs{state="SUCCEEDED"}' in text
    assert "tuneloop_job_duration_seconds_bucket" in text
    assert 'tuneloop_jobs_finished_total{state="FAILED",trigger="retrain"} 0.0' in text
    assert "tuneloop_prediction_latency_seconds_count" in text


@pytest.mark.parametrize(
    ("change", "status", "code", "quoted"),
    [
        ({"hyperparameters": {"epochs": -1}}, 422, "spec_invalid", "hyperparameters.epochs"),
        ({"base_model": "builtin:bert-huge"}, 422, "spec_invalid", "builtin:minilm"),
        ({"data": {"path": "../../etc/passwd"}}, 400, "path_refused", "../../etc/passwd"),
        ({"data": {"path": "absent.csv"}}, 400, "path_refused", "absent.csv"),
        ({"base_model": "hub:acme/model@v1"}, 422, "model_unavailable", "hub:acme/model@v1"),
    ],
)
def test_bad_specs_are_refused_with_the_field_named(
    stack: Stack,
    tiny_model_dir: Path,
    reviews: str,
    change: dict[str, Any],
    status: int,
    code: str,
    quoted: str,
) -> None:
    before = len(stack.client.jobs())
    with pytest.raises(ApiError) as caught:
        stack.client.submit(tiny_spec(tiny_model_dir, reviews, **change))
    assert (caught.value.status, caught.value.code) == (status, code)
    assert quoted in caught.value.message
    assert len(stack.client.jobs()) == before


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"sentence,label\nnice,1\nbad,0\n", "no column 'text'"),
        (b"text,label\n" + b"nice,1\n" * 8, "one class only"),
        (b"text,label\n", "no rows"),
        ("text,label\ncaf\xe9,1\nth\xe9,0\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_unusable_datasets_are_refused_before_queuing(
    stack: Stack, tiny_model_dir: Path, content: bytes, reason: str
) -> None:
    (stack.settings.resolved_data_root() / "bad.csv").write_bytes(content)
    with pytest.raises(ApiError) as caught:
        stack.client.submit(tiny_spec(tiny_model_dir, "bad.csv"))
    assert caught.value.status == 422 and reason in caught.value.message


def test_uploaded_dataset_is_listed_and_trainable_by_id(
    stack: Stack, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "upload.csv"
    read_sentiment("yelp").iloc[:120].to_csv(path, index=False)
    dataset = stack.client.upload(path, name="yelp sample")
    assert dataset["rows"] == 120
    assert dataset["id"] in {d["id"] for d in stack.client.datasets()}
    spec = tiny_spec(
        tiny_model_dir,
        "unused.csv",
        model_name="uploaded",
        data={"path": None, "dataset": dataset["id"]},
    )
    job = stack.client.submit(spec)
    assert job["status"] == "PENDING"
    stack.client.cancel(job["id"])


def test_failure_during_training_ends_failed_with_the_error(
    stack: Stack, tiny_model_dir: Path, reviews: str, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    job = submit_and_wait(stack, tiny_spec(broken, reviews, model_name="broken"))
    assert job["status"] == "FAILED"
    assert job["error"]
    messages = "\n".join(line["message"] for line in stack.client.log(job["id"]))
    assert job["error"] in messages
    assert stack.client.health()["status"] == "ok"


def test_cancel_stops_a_running_job(stack: Stack, tiny_model_dir: Path, reviews: str) -> None:
    spec = tiny_spec(
        tiny_model_dir, reviews, model_name="cancelled", hyperparameters={"epochs": 60}
    )
    job = stack.client.submit(spec)
    stack.wait_for(lambda: len(stack.client.epochs(job["id"])) >= 1, 120, "a first epoch")
    stack.client.cancel(job["id"])
    stack.wait_for(
        lambda: stack.client.job(job["id"])["status"] == "CANCELLED", 30, "the job to be cancelled"
    )
    done = len(stack.client.epochs(job["id"]))
    threading.Event().wait(5)
    assert len(stack.client.epochs(job["id"])) == done < 60


def test_jobs_wait_in_the_queue_while_the_cluster_is_full(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    heavy = {"resources": {"workers": 1, "cpus_per_worker": 3}}
    first = stack.client.submit(tiny_spec(tiny_model_dir, reviews, model_name="queued", **heavy))
    stack.wait_for(
        lambda: stack.client.job(first["id"])["status"] == "RUNNING", 60, "the first job to start"
    )
    second = stack.client.submit(tiny_spec(tiny_model_dir, reviews, model_name="queued", **heavy))
    stack.wait_for(
        lambda: any(
            "waiting for 3 CPU" in line["message"] for line in stack.client.log(second["id"])
        ),
        30,
        "the second job to wait",
    )
    assert stack.client.job(second["id"])["status"] == "PENDING"
    assert stack.client.wait(first["id"], timeout=240)["status"] == "SUCCEEDED"
    assert stack.client.wait(second["id"], timeout=240)["status"] == "SUCCEEDED"


def train_worker_pids() -> list[int]:
    """Ray Train worker processes under this session's raylet (other clusters may run here)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    parents: dict[int, int] = {}
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                workers.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue

    def under_raylet(pid: int) -> bool:
        while pid > 1:
            if pid == raylet:
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid in workers if under_raylet(pid)]


def test_killed_worker_resumes_from_the_last_checkpoint(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    spec = tiny_spec(tiny_model_dir, reviews, model_name="resumed", hyperparameters={"epochs": 40})
    job = stack.client.submit(spec)
    stack.wait_for(lambda: len(stack.client.epochs(job["id"])) >= 4, 120, "four epochs")
    # What a worker killed while copying a checkpoint leaves: a folder, newer than any other,
    # with its weights cut short and no state file. Made by hand, as no kill can be timed to
    # land inside that copy.
    cut_short = stack.settings.checkpoints_dir() / job["id"] / "checkpoint_9999-12-31_23-59-59"
    cut_short.mkdir(parents=True)
    (cut_short / "model.safetensors").write_bytes(b"\x00" * 100)
    workers = train_worker_pids()
    done_at_kill = len(stack.client.epochs(job["id"]))
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)

    done = stack.client.wait(job["id"], timeout=300)
    assert done["status"] == "SUCCEEDED", done["error"]
    resumed = [
        int(line["message"].rsplit(" ", 1)[1])
        for line in stack.client.log(job["id"])
        if line["message"].startswith("resumed from the checkpoint of epoch")
    ]
    # An epoch's metrics are stored just before its worker writes the checkpoint, and Ray
    # Train commits a written checkpoint when its controller next polls the worker (every
    # 0.2 s), so the last checkpoint committed at the kill is at most two epochs behind the
    # metrics: that epoch's, or one of the two before it. After four epochs' metrics, never
    # the first epoch.
    assert resumed and resumed[0] >= max(2, done_at_kill - 2), (resumed, done_at_kill)
    assert [e["epoch"] for e in stack.client.epochs(job["id"])] == list(range(1, 41))

    uninterrupted = submit_and_wait(stack, {**spec, "model_name": "uninterrupted"}, 300)
    assert uninterrupted["status"] == "SUCCEEDED", uninterrupted["error"]
    final = done["result"]["metrics"]["val_accuracy"]
    assert abs(final - uninterrupted["result"]["metrics"]["val_accuracy"]) <= 0.01


def test_promotion_swaps_versions_without_failed_requests(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    first = submit_and_wait(stack, tiny_spec(tiny_model_dir, reviews, model_name="swapped"))
    second = submit_and_wait(
        stack,
        tiny_spec(tiny_model_dir, reviews, model_name="swapped", serving={"promote": "never"}),
    )
    assert (first["model_version"], second["model_version"]) == (1, 2)
    assert stack.client.model("swapped")["production_version"] == 1

    seen: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as http:
            while not stop.is_set():
                response = http.post("/v1/models/swapped/predict", json={"inputs": ["ok"]})
                if response.status_code == 200:
                    seen.append(response.json()["version"])
                else:
                    errors.append(response.text)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    stack.wait_for(lambda: len(seen) >= 20, 60, "traffic on v1")
    stack.client.promote("swapped", 2)
    stack.wait_for(lambda: seen[-1] == 2 and seen.count(2) >= 20, 60, "traffic on v2")
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert seen[0] == 1 and seen[-1] == 2


def test_openapi_docs_describe_every_route(stack: Stack) -> None:
    schema = httpx.get(f"{stack.url}/openapi.json", timeout=10).json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/log",
        "/v1/jobs/{job_id}/metrics",
        "/v1/datasets",
        "/v1/models",
        "/v1/models/{name}/predict",
        "/healthz",
        "/metrics",
    ):
        assert path in schema["paths"], path
    assert httpx.get(f"{stack.url}/docs", timeout=10).status_code == 200


def test_unknown_job_and_model_are_404(stack: Stack) -> None:
    for call in (
        lambda: stack.client.job("job-missing"),
        lambda: stack.client.predict("no-such-model", ["x"]),
    ):
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 404


def test_concurrent_submissions_with_one_idempotency_key_make_one_job(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    spec = tiny_spec(tiny_model_dir, reviews, model_name="idempotent")
    headers = {"Idempotency-Key": "submit-once-7"}

    def submit() -> httpx.Response:
        with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=60) as http:
            return http.post("/v1/jobs", json=spec, headers=headers)

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: submit(), range(10)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1

    other = {**spec, "hyperparameters": {**spec["hyperparameters"], "epochs": 3}}
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=60) as http:
        refused = http.post("/v1/jobs", json=other, headers=headers)
    assert refused.status_code == 409
    assert refused.json()["error"]["field"] == "Idempotency-Key"
    stack.client.cancel(responses[0].json()["id"])
