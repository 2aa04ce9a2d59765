"""The files an operator deploys from: Dockerfile, compose.yaml, .env.example and
the README's configuration table. Docker cannot run here, so these are read and
linted, never built."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config import _SETTINGS, GC_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_COMMAND = ["gunicorn", "-c", "gunicorn.conf.py", "main:create_app()"]


def _readme_settings() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Z0-9_]+)` \|", table, re.MULTILINE)


def test_env_example_lists_every_setting_in_the_readme_order():
    example = re.findall(r"^#?([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE)

    assert example == _readme_settings()


def test_readme_documents_every_setting_parley_and_its_server_read():
    server = set(re.findall(r"(?:os\.environ\.get|_whole_number)\(\s*[\"']([A-Z0-9_]+)[\"']", (ROOT / "gunicorn.conf.py").read_text()))
    assert {"BIND", "WEB_CONCURRENCY", "WORKER_CONNECTIONS", "GRACEFUL_TIMEOUT"} <= server
    documented = _readme_settings()

    assert len(documented) == len(set(documented))
    assert set(_SETTINGS) | server | {"PORT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(documented)


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"

    result = subprocess.run([str(hadolint), "--format", "json", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout or "[]") == []


def test_dockerfile_is_slim_non_root_with_health_check_and_the_production_command():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]

    assert lines[0].startswith("FROM python:3.11-slim")
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert json.loads(lines[-1].removeprefix("CMD ")) == PRODUCTION_COMMAND
    assert any("/healthz" in line for line in lines)


def test_compose_runs_parley_with_postgres_s3_and_redis():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]

    assert {"parley", "postgres", "redis"} <= set(services)
    assert {"seaweedfs", "minio"} & set(services)
    parley = services["parley"]
    assert "command" not in parley  # the image's CMD: the production command
    assert parley["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert parley["environment"]["ARCHIVE_URL"].startswith("s3://")
    assert parley["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert parley["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "parley db-upgrade" in " ".join(services["migrate"]["command"])
    assert "parley archive-prepare" in " ".join(services["migrate"]["command"])
    # Docker waits this long after SIGTERM: longer than turns in flight get to finish.
    assert int(parley["stop_grace_period"].removesuffix("s")) > _gunicorn_setting("graceful_timeout")


@pytest.mark.parametrize(
    ("environment", "graceful"),
    [({}, 150), ({"LLM_TOTAL_TIMEOUT_SECONDS": "600"}, 630), ({"LLM_TOTAL_TIMEOUT_SECONDS": "600", "GRACEFUL_TIMEOUT": "45"}, 45)],
)
def test_the_graceful_timeout_follows_the_models_deadline(environment, graceful):
    assert _gunicorn_setting("graceful_timeout", environment) == graceful


def _gunicorn_setting(name: str, environment: dict[str, str] | None = None):
    """A setting as gunicorn.conf.py makes it under `environment` (read in a new process: the file sets variables)."""
    env = {key: value for key, value in os.environ.items() if key not in ("GRACEFUL_TIMEOUT", "LLM_TOTAL_TIMEOUT_SECONDS")}
    env.update(PROMETHEUS_MULTIPROC_DIR=os.devnull, **(environment or {}))  # the file makes a directory otherwise
    code = f"import json, runpy; print(json.dumps(runpy.run_path('gunicorn.conf.py')[{name!r}]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_readme_production_section_uses_the_production_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running in production", 1)[1].split("\n## ", 1)[0]

    assert 'gunicorn -c gunicorn.conf.py "main:create_app()"' in section
    assert "was not built" in section
    assert "AWS_ACCESS_KEY_ID" in readme and "AWS_SECRET_ACCESS_KEY" in readme and "AWS_REGION" in readme


@pytest.mark.parametrize("tuning", [None, "off"])
def test_a_worker_freezes_the_loaded_app_and_collects_garbage_less_often(tuning):
    # In a process of its own: freezing the test run's objects would change how the other tests collect.
    probe = (
        "import gc, json, logging, runpy, types\n"
        "conf = runpy.run_path('gunicorn.conf.py')\n"
        "import main  # what a worker loads: Flask, SQLAlchemy's tables, the schemas\n"
        "before = (gc.get_freeze_count(), gc.get_threshold())\n"
        "conf['post_worker_init'](types.SimpleNamespace(log=logging.getLogger('probe')))\n"
        "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))\n"
    )
    environment = {name: value for name, value in os.environ.items() if name != "GC_TUNING"}
    if tuning is not None:
        environment["GC_TUNING"] = tuning
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=environment, capture_output=True, text=True,
                          check=True)
    (frozen_before, threshold_before), frozen, threshold = json.loads(done.stdout.splitlines()[-1])

    assert frozen_before == 0 and threshold_before == [700, 10, 10]
    if tuning is None:  # the default: on
        assert frozen > 100_000
        assert threshold == list(GC_THRESHOLD) and GC_THRESHOLD[0] > 700
    else:
        assert (frozen, threshold) == (0, [700, 10, 10])
