"""The Grafana dashboard and the Prometheus alert rules in deploy/: promtool checks the rules
and runs scenarios of each alert; every query parses; every metric and label they use is one
a real service's /metrics exports; the docs' metrics table says exactly what is exported."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final, cast

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.harness import service as h
from tests.harness.registry import free_port
from tests.harness.sinks import RedisListSink
from worker.engine import planner
from worker.maintenance.gc import GcResult
from worker.maintenance.report import GcReport, MaintenanceMetrics
from worker.notify.runtime import counting
from worker.queue import news
from worker.queue.context import WorkerContext
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.keys import Keys
from worker.store.metrics import WorkerMetrics
from worker.store.state import State

ROOT: Final = Path(__file__).resolve().parent.parent
RULES: Final = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "regsweep.json"
OPERATIONS: Final = ROOT / "docs" / "operations.md"
#: Labels Prometheus adds to every scraped series, and its own ``up``.
SCRAPE_LABELS: Final = frozenset({"job", "instance"})
PROMETHEUS_OWN: Final = {"up": SCRAPE_LABELS}
#: What the dashboard's variables stand for when its queries are checked.
DASHBOARD_VARIABLES: Final = {"$__rate_interval": "5m", "$job": "regsweep", "${job}": "regsweep"}
TOKEN: Final = "dash-token-Q9"


def promtool() -> str:
    """promtool from PATH, else where scripts/setup puts it."""
    found = shutil.which("promtool") or str(Path(sys.executable).with_name("promtool"))
    assert Path(found).exists(), "promtool missing: run scripts/setup"
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression with the variables filled in) of every query."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            out.append((panel["title"], expr))
    return out


# --------------------------------------------------------------------------- promtool


def test_alert_rules_pass_promtool() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yaml."""
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@dataclass
class Scenario:
    """Input series, and at each time which alerts of ``alert`` fire (labels beyond the
    rule's own)."""

    alert: str
    series: dict[str, str]
    expect: dict[str, list[dict[str, str]]]
    interval: str = "1m"
    extra: dict[str, Any] = field(default_factory=dict)


SERIES: Final = 'job="regsweep", instance="svc:8000"'
LABELS: Final = {"job": "regsweep", "instance": "svc:8000"}

SCENARIOS: Final = [
    Scenario("RegsweepServiceDown", {f"up{{{SERIES}}}": "1 1 1 0x10"}, {"4m": [], "12m": [LABELS]}),
    # Never scraped as job regsweep at all: absent() fires, with the job it looked for.
    Scenario(
        "RegsweepServiceDown",
        {'up{job="other", instance="x"}': "1x20"},
        {"10m": [{"job": "regsweep"}]},
    ),
    Scenario(
        "RegsweepRegistryLeftReadOnly",
        {f"regsweep_gc_switch_back_failures_total{{{SERIES}}}": "0 0 0 1 1x40"},
        {"2m": [], "5m": [LABELS], "40m": []},
    ),
    Scenario(
        "RegsweepMaintenanceStuck",
        {f"regsweep_maintenance_active{{{SERIES}}}": "0 1x300"},
        {"2h": [], "4h30m": [LABELS]},
    ),
    Scenario(
        "RegsweepMaintenanceStuck",
        {f"regsweep_maintenance_active{{{SERIES}}}": "1x120 0x200"},  # a normal 2h window
        {"2h10m": [], "4h30m": []},
    ),
    Scenario(
        "RegsweepGcFailing",
        {f'regsweep_gc_runs_total{{outcome="failed", {SERIES}}}': "0 0 1x100"},
        {"1m": [], "10m": [{"outcome": "failed"} | LABELS]},
    ),
    Scenario(
        "RegsweepGcNotRunRecently",
        {f"regsweep_gc_last_success_timestamp_seconds{{{SERIES}}}": "0x13000"},
        {"7d": [], "9d": [LABELS]},
    ),
    Scenario(
        "RegsweepPruneErrors",
        {
            f'regsweep_worker_jobs_total{{kind="prune", state="failed", {SERIES}}}': "0 0 2x10",
            f'regsweep_worker_jobs_total{{kind="sweep", state="failed", {SERIES}}}': "0 5x10",
        },
        {"1m": [], "5m": [{"kind": "prune", "state": "failed"} | LABELS]},
    ),
    Scenario(
        "RegsweepNoSuccessfulPrune",
        {f"regsweep_prune_last_success_timestamp_seconds{{{SERIES}}}": "0+60x3000"},
        {"2d": []},
    ),
    Scenario(
        "RegsweepNoSuccessfulPrune",
        {f"regsweep_prune_last_success_timestamp_seconds{{{SERIES}}}": "0x3000"},
        {"20h": [], "2d": [LABELS]},
    ),
    Scenario(
        "RegsweepDeadLettersGrowing",
        {f"regsweep_dead_letters_total{{{SERIES}}}": "4x10 7x100"},
        {"9m": [], "15m": [LABELS], "90m": []},
    ),
    Scenario(
        "RegsweepHookSignatureFailures",
        {
            f'regsweep_events_total{{source="github", outcome="unauthorized", {SERIES}}}': (
                "0 0+1x30"
            ),
            f'regsweep_events_total{{source="gitlab", outcome="unauthorized", {SERIES}}}': (
                "0 1 1 1x30"
            ),
            f'regsweep_events_total{{source="registry", outcome="accepted", {SERIES}}}': "0+50x30",
        },
        {"3m": [], "20m": [{"source": "github"}]},
    ),
    Scenario(
        "RegsweepNotificationsFailing",
        {
            f'regsweep_notifications_total{{target="ops", event="gc.finished", outcome="sent", {SERIES}}}': "0+1x30",  # noqa: E501
            f'regsweep_notifications_total{{target="hook", event="prune.deleted", outcome="failed", {SERIES}}}': "0 0 1x30",  # noqa: E501
        },
        {"1m": [], "5m": [{"target": "hook"}]},
    ),
]


def _expected(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    annotations = {
        key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
        for key, text in rule["annotations"].items()
    }
    return {"exp_labels": rule["labels"] | labels, "exp_annotations": annotations}


def test_every_alert_fires_when_it_should_and_not_otherwise(tmp_path: Path) -> None:
    """`promtool test rules`: each alert fires on the series that mean trouble (at the time
    its `for` allows) and stays quiet on healthy ones and before; every alert has a scenario."""
    by_name = {rule["alert"]: rule for rule in rules()}
    assert {s.alert for s in SCENARIOS} == set(by_name)
    tests = []
    for scenario in SCENARIOS:
        rule = by_name[scenario.alert]
        tests.append(
            {
                "interval": scenario.interval,
                "input_series": [{"series": k, "values": v} for k, v in scenario.series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": scenario.alert,
                        "exp_alerts": [_expected(rule, labels) for labels in fired],
                    }
                    for at, fired in scenario.expect.items()
                ],
            }
        )
    spec = tmp_path / "alerts_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "tests": tests}))
    done = run_promtool("test", "rules", str(spec))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_dashboard_is_well_formed_and_every_query_parses(tmp_path: Path) -> None:
    """The dashboard has a uid, a Prometheus data-source variable used by every panel, unique
    panel ids, panels inside the 24-column grid without overlaps; each query, its variables
    filled in, passes promtool as a rule expression."""
    board = dashboard()
    assert board["uid"] == "regsweep" and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        taken = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not taken & cells, f"{panel['title']} overlaps another panel"
        cells |= taken
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    queries = dashboard_queries()
    assert len(queries) > 20
    document = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    checked = tmp_path / "dashboard_rules.yaml"
    checked.write_text(yaml.safe_dump(document))
    done = run_promtool("check", "rules", str(checked))
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- exported metrics


@dataclass
class Exported:
    """Each sample name of a scrape and the labels its samples carry."""

    labels: dict[str, set[str]]

    def has(self, metric: str) -> bool:
        return metric in self.labels or metric in PROMETHEUS_OWN

    def labels_of(self, metric: str) -> set[str]:
        return self.labels.get(metric, set()) | PROMETHEUS_OWN.get(metric, set()) | SCRAPE_LABELS


def _populate(url: str) -> None:
    """Every worker-side series, written by the code that writes it in production."""
    client = redis.Redis.from_url(url)
    keys = Keys()

    async def worker_side() -> None:
        async_client = aioredis.Redis.from_url(url)
        metrics = WorkerMetrics()
        metrics.deletion("web", "retention")
        metrics.job("prune", "failed")
        metrics.registry_response("GET", "/v2/{name}/tags/list", 200, 0.02)
        await metrics.flush(async_client)
        state = State(async_client)
        await state.dead_letter("registry", "unusable", "{}")
        ctx = cast(WorkerContext, SimpleNamespace(redis=async_client, state=state))
        await news.prune_succeeded(ctx, "j1", "team/web")
        await async_client.aclose()

    asyncio.run(worker_side())
    report = GcReport("gc1", "api", False, datetime.now(UTC), bytes_before=900, bytes_after=100)
    report.gc = GcResult(exit_code=0, dry_run=False, duration_s=1.5, completed=True)
    report.readonly_seconds = 2.0
    report.finish(datetime.now(UTC))
    gc_metrics = MaintenanceMetrics(client, keys)
    gc_metrics.window(report)
    gc_metrics.alert("switch_back_failures")
    gc_metrics.alert("recoveries")
    counting(client, keys)("ops", "gc.finished", "sent")
    client.set(keys.maintenance_flag, "gc1")
    client.close()


@pytest.fixture(scope="module")
def exported() -> Iterator[Exported]:
    """A real service on a Redis of its own, scraped after every series was written."""
    server = h.RedisServer(free_port())
    server.start()
    try:
        _populate(server.url)
        config = Config(
            registry=RegistrySettings(url="http://127.0.0.1:1"),
            redis_url=server.url,
            hooks=HookSettings(registry_token=Secret(TOKEN), api_token=Secret(TOKEN)),
        )
        sink = RedisListSink.from_url(server.url)
        with h.running(create_app(config, sink=sink)) as url, httpx.Client(base_url=url) as http:
            http.post("/hooks/registry", content=b"{}", headers={"Content-Type": h.V1})
            auth = {"Authorization": f"Bearer {TOKEN}"}
            http.post("/api/v1/jobs", json={"kind": "gc"}, headers=auth)
            text = http.get("/metrics").text
    finally:
        server.stop()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    yield Exported(labels)


_METRIC: Final = re.compile(r"\b(regsweep_[a-z0-9_]+|up)\b(?=\s*[{\[)\s]|$)")
_SELECTOR: Final = re.compile(r"\b(regsweep_[a-z0-9_]+|up)\{([^}]*)\}")
_MATCHER: Final = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING: Final = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _problems(where: str, expr: str, exported: Exported) -> list[str]:
    """Metrics ``expr`` uses that are not exported, and labels they do not carry."""
    found = []
    metrics = set(_METRIC.findall(expr))
    if not metrics:
        found.append(f"{where}: no regsweep metric in {expr!r}")
    for metric in metrics - {m for m in metrics if exported.has(m)}:
        found.append(f"{where}: {metric} is not exported")
    for metric, matchers in _SELECTOR.findall(expr):
        for label in _MATCHER.findall(matchers):
            if label not in exported.labels_of(metric):
                found.append(f"{where}: {metric} has no label {label}")
    known = set().union(*(exported.labels_of(m) for m in metrics)) if metrics else set()
    for group in _GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in known:
                found.append(f"{where}: grouping by {label}, which none of {metrics} has")
    return found


def test_every_metric_and_label_used_is_exported(exported: Exported) -> None:
    """Each metric the rules and the dashboard query is on the real service's /metrics (or is
    Prometheus' own `up`), with every label they select, group by, template or show."""
    problems: list[str] = []
    for rule in rules():
        problems += _problems(f"rule {rule['alert']}", rule["expr"], exported)
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                if label not in _GROUPING.findall(rule["expr"])[0]:
                    problems.append(f"rule {rule['alert']}: annotation uses {label}, not kept")
    for title, expr in dashboard_queries():
        problems += _problems(f"panel {title!r}", expr, exported)
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            for label in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
                groups = ",".join(_GROUPING.findall(target["expr"]))
                if label not in groups and label not in SCRAPE_LABELS:
                    problems.append(f"panel {panel['title']!r}: legend shows {label}, not kept")
    assert problems == []


# --------------------------------------------------------------------------- the docs' table


def documented_metrics() -> dict[str, set[str]]:
    """docs/operations.md's metrics table: each metric named, with the labels it lists."""
    section = OPERATIONS.read_text().split("### Logs and metrics", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `regsweep_"):
            continue
        names, labels = line.strip("|").split("|", 1)
        for name in re.findall(r"`(regsweep_\w+)`", names):
            table[name] = _labels_cell(labels.strip().removeprefix("histogram by "))
    return table


def _labels_cell(cell: str) -> set[str]:
    """The labels a table cell lists ("`policy`, `reason`: what it means, one of ..." lists
    two); each starts a comma-separated piece (commas inside parentheses do not count),
    and a ``:`` outside parentheses ends the list."""
    labels: set[str] = set()
    depth, piece = 0, ""
    for char in cell + ",":
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            match = re.match(r"\s*`(\w+)`", piece)
            if match is None:
                break
            labels.add(match.group(1))
            if ":" in re.sub(r"\([^)]*\)", "", piece):
                break
            piece = ""
        else:
            piece += char
    return labels


def test_docs_table_names_every_exported_metric_and_its_labels(exported: Exported) -> None:
    """Every metric the service exports is in docs/operations.md's table with exactly its
    labels, and the table names nothing that is not exported."""
    documented = documented_metrics()
    families = {
        name.removesuffix("_bucket"): labels - {"le"}
        for name, labels in exported.labels.items()
        if not name.endswith(("_created", "_sum", "_count")) or name.endswith("_total")
    }
    families = {n: ls for n, ls in families.items() if not n.endswith(("_sum", "_count"))}
    assert set(documented) == set(families)
    for name, labels in families.items():
        assert documented[name] == labels, name


def test_documented_deletion_reasons_are_the_planners() -> None:
    """The `reason` values the docs list are exactly the rules a deletion can carry."""
    section = OPERATIONS.read_text().split("| `regsweep_deletions_total` |", 1)[1].split("\n")[0]
    listed = set(re.findall(r"`([a-z_.]+)`", section.split("one of", 1)[1].split("(", 1)[0]))
    rules = {planner.RETENTION, planner.UNTAGGED, planner.REFERRER, planner.CHILD}
    rules |= {planner.PLACEHOLDER, "on.pull_request_closed", "on.branch_deleted"}
    assert listed == rules
