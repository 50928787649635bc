"""The Prometheus endpoint of `turnlog serve` (docs/metrics.md).

Real processes: a scripted `turnlog worker`, and the service as a subprocess
on this test's PostgreSQL database with `--metrics-listen 127.0.0.1:0`. The
endpoint is scraped over HTTP before and after turns sent over gRPC.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from worker_processes import TurnlogProcess, WorkerProcess, printed_token, start_scripted_worker

from turnlog.api.server import run_server
from turnlog.auth.channel import credentialed_channel
from turnlog.cli import main
from turnlog.config import Settings
from turnlog.metrics import STAGES, observe_stage, parse_listen, stage_timer
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

SCRIPT: dict[str, Any] = {
    "model": "scripted-metrics",
    "replies": [
        {
            "match": "fail early",
            "text": "never",
            "fail_at_token": 0,
            "fail_reason": "ENGINE_INTERNAL",
        },
    ],
    "default": {"text": "Hello there, counted."},
}
# The metrics line comes first: the exporter starts before gRPC is served.
READY = re.compile(
    r"turnlog metrics on port (\d+).*?turnlog serving gRPC on (\S+):(\d+)", re.DOTALL
)
FAMILIES = {
    "turnlog_turn_stage_seconds": "histogram",
    "turnlog_turns_ended": "counter",
    "turnlog_turn_appends": "counter",
    "turnlog_turns_running": "gauge",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Service:
    target: str
    metrics_url: str
    token: str

    def scrape_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            assert response.status == 200
            return str(response.read().decode())

    def scrape(self) -> Samples:
        """Every sample of the exposition, by (name, sorted labels)."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(self.scrape_text())
            for s in family.samples
        }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def scripted_worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = start_scripted_worker(SCRIPT, tmp_path)
    yield worker
    worker.kill()


@pytest.fixture
def service(database_url: str, scripted_worker: WorkerProcess, tmp_path: Path) -> Iterator[Service]:
    process = TurnlogProcess(
        ["serve", "--worker", scripted_worker.target, "--metrics-listen", "127.0.0.1:0"],
        tmp_path / "serve.log",
        READY,
    )
    process.env = {
        "TURNLOG_DATABASE_URL": database_url,
        "TURNLOG_LISTEN": "127.0.0.1:0",
        "TURNLOG_DATA_DIR": str(tmp_path / "serve-data"),
    }
    found = process.start(timeout_s=60)
    try:
        yield Service(
            target=f"{found[2]}:{found[3]}",
            metrics_url=f"http://127.0.0.1:{found[1]}/metrics",
            token=printed_token((tmp_path / "serve.log").read_text(errors="replace")),
        )
    finally:
        assert process.terminate(15) == 0, process.log_tail()


def test_endpoint_serves_the_turn_metric_families(service: Service) -> None:
    text = service.scrape_text()
    for name, kind in FAMILIES.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {exposed} " in text
        assert f"# TYPE {exposed} {kind}\n" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: families[name].type for name in FAMILIES} == FAMILIES
    samples = service.scrape()
    # Every known series is there from the start, at zero.
    for stage in STAGES:
        assert ("turnlog_turn_stage_seconds_count", (("stage", stage),)) in samples
    for outcome in ("completed", "failed", "cancelled", "blocked", "interrupted"):
        assert value(samples, "turnlog_turns_ended_total", outcome=outcome) == 0
    for kind in ("begin", "flush", "end"):
        assert ("turnlog_turn_appends_total", (("kind", kind),)) in samples
    assert value(samples, "turnlog_turns_running") == 0
    # prometheus_client's own process collector comes along on the default registry.
    assert "process_cpu_seconds_total" in text


def wait_for_samples(
    service: Service, done: Callable[[Samples], bool], timeout_s: float = 10.0
) -> Samples:
    """Scrapes until `done` holds (a turn's counters move just after its reply)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = service.scrape()
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


async def test_turns_move_the_turn_metrics(service: Service) -> None:
    before = service.scrape()
    async with credentialed_channel(service.target, service.token) as channel:
        stub = sgrpc.ConversationServiceStub(channel)
        names = []
        for i in range(2):
            created = await stub.CreateConversation(
                spb.CreateConversationRequest(request_id=f"c{i}", system_prompt="Be brief."),
                timeout=15,
            )
            names.append(created.conversation.name)
        statuses = []
        for name, content, request_id in [
            (names[0], "hi", "1"),
            (names[0], "and again", "2"),
            (names[1], "hello", "1"),
            (names[1], "fail early", "2"),
        ]:
            sent = await stub.SendMessage(
                spb.SendMessageRequest(
                    input=spb.TurnInput(conversation=name, content=content, request_id=request_id)
                ),
                timeout=30,
            )
            statuses.append(sent.turn.status)
    assert statuses == [pb.TURN_STATUS_COMPLETED] * 3 + [pb.TURN_STATUS_FAILED]

    def moved(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    def count(samples: Samples, stage: str) -> float:
        return moved(samples, "turnlog_turn_stage_seconds_count", stage=stage)

    after = wait_for_samples(
        service,
        lambda s: (
            count(s, "turn") >= 4
            and moved(s, "turnlog_turns_ended_total", outcome="failed") >= 1
            and value(s, "turnlog_turns_running") == 0
        ),
    )
    ended = {
        outcome: moved(after, "turnlog_turns_ended_total", outcome=outcome)
        for outcome in ("completed", "failed", "cancelled", "blocked", "interrupted")
    }
    assert ended == {"completed": 3, "failed": 1, "cancelled": 0, "blocked": 0, "interrupted": 0}
    # SendMessage has no streaming client: no text is flushed mid-turn, each
    # turn commits twice (TurnStarted, then its end).
    appends = {
        k: moved(after, "turnlog_turn_appends_total", kind=k) for k in ("begin", "flush", "end")
    }
    assert appends == {"begin": 4, "flush": 0, "end": 4}
    stages = {stage: count(after, stage) for stage in STAGES}
    # Turns may find their conversation's state in this process's cache: at
    # most one load each.
    assert 0 <= stages.pop("load") <= 4
    # The failed turn got no text delta: three first tokens, three generations.
    assert stages == {
        "request_guardrails": 4,
        "context": 4,
        "begin_append": 4,
        "first_token": 3,
        "generation": 3,
        "end_append": 4,
        "tools": 0,
        "turn": 4,
    }
    turn_seconds = moved(after, "turnlog_turn_stage_seconds_sum", stage="turn")
    parts = sum(
        moved(after, "turnlog_turn_stage_seconds_sum", stage=stage)
        for stage in ("request_guardrails", "begin_append", "end_append")
    )
    assert 0 < parts < turn_seconds
    assert value(after, "turnlog_turns_running") == 0


def test_stage_timer_and_observe_stage_record_into_the_histogram() -> None:
    def count(stage: str) -> float:
        got = REGISTRY.get_sample_value("turnlog_turn_stage_seconds_count", {"stage": stage})
        return got or 0.0

    def total(stage: str) -> float:
        got = REGISTRY.get_sample_value("turnlog_turn_stage_seconds_sum", {"stage": stage})
        return got or 0.0

    before_count, before_sum = count("tools"), total("tools")
    with stage_timer("tools"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), stage_timer("tools"):  # errors are timed too
        raise RuntimeError("boom")
    observe_stage("tools", 0.5)
    assert count("tools") - before_count == 3
    assert 0.51 <= total("tools") - before_sum < 1.5
    bucket = REGISTRY.get_sample_value(
        "turnlog_turn_stage_seconds_bucket", {"stage": "tools", "le": "0.25"}
    )
    assert bucket is not None
    assert bucket >= 2


@pytest.mark.parametrize(
    "listen", ["9464", "127.0.0.1", ":9464", "127.0.0.1:http", "127.0.0.1:70000", "[::1]:"]
)
def test_metrics_listen_rejects_a_malformed_address(
    listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--metrics-listen", listen])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --metrics-listen" in err
    assert f"{listen!r} is not HOST:PORT" in err


def test_parse_listen_accepts_host_port() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("localhost:9464") == ("localhost", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)


async def test_malformed_metrics_listen_from_the_environment_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TURNLOG_METRICS_LISTEN is checked when serve starts, before the event log opens."""
    monkeypatch.delenv("TURNLOG_DATABASE_URL", raising=False)
    monkeypatch.setenv("TURNLOG_DATA_DIR", str(tmp_path / "never-created"))
    monkeypatch.setenv("TURNLOG_METRICS_LISTEN", "localhost")
    settings = Settings.from_env()
    assert settings.metrics_listen == "localhost"
    with caplog.at_level(logging.ERROR, logger="turnlog.conversation.server"):
        assert await run_server(settings, listen="127.0.0.1:0") == 2
    assert "cannot serve metrics on localhost" in caplog.text
    assert "is not HOST:PORT" in caplog.text
    assert not settings.data_dir.exists()
