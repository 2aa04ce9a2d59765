"""The README's "Running in production" block, walked in a fresh directory.

The checkout's files are copied to a new directory and the block's lines run
there, in order, as one bash script: a new venv, `pip install -r
requirements.txt -e .`, `parley db-upgrade` on a new PostgreSQL database,
`parley archive-prepare` creating a new SeaweedFS bucket, `parley keys
create`, and the production server `gunicorn -c gunicorn.conf.py
"main:create_app()"`. Over HTTP the test then opens, talks in and ends a
conversation (Claude through the fake model server) and reads the archived
document from the bucket.

The block's `export` lines carry placeholder values; they are left out and
the test sets the same variables (checked) to local servers instead.

Fast and offline: right after the venv is made, a `.pth` file gives it this
test venv's site-packages, so pip finds every requirement already installed;
pip runs with PIP_NO_INDEX=1 (nothing is downloaded) and
PIP_NO_BUILD_ISOLATION=0 (the editable build uses the setuptools and wheel at
hand instead of fetching them). The walk took 26 s here (the venv, pip, four
commands that each start Python and import the app, and the gevent server).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.postgres import admin_url, temporary_database
from tests.seaweed import free_ports

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 120


def _production_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running in production", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _exported_names(line: str) -> list[str]:
    words = shlex.split(line, comments=True)[1:]
    return [word.split("=", 1)[0] for word in words]


def _script(lines: list[str]) -> tuple[str, set[str]]:
    """The block as a bash script, with its exports collected instead of run."""
    shared = sysconfig.get_paths()["purelib"]
    script, exported = ["set -euo pipefail"], set()
    for line in lines:
        if line.startswith("export "):
            exported.update(_exported_names(line))
            continue
        if line.startswith("gunicorn "):
            line = "exec " + line
        script.append(line)
        if re.match(r"python3? -m venv \.venv\b", line):
            script.append(f'echo {shlex.quote(shared)} > "$(echo .venv/lib/python3*/site-packages)/test-venv.pth"')
    return "\n".join(script) + "\n", exported


def _copy_checkout(target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _call(port: int, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def walk_database():
    with temporary_database(admin_url(), prefix="parley_walk") as url:
        yield url


def test_readme_production_section_from_pip_install_to_an_archived_conversation(
    tmp_path, walk_database, s3_server, model_server
):
    checkout = tmp_path / "parley"
    _copy_checkout(checkout)
    script, exported = _script(_production_block())
    port = free_ports(1)[0]
    bucket = f"walk-{uuid.uuid4().hex[:12]}"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("PIP_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DATABASE_URL": walk_database,
        "ARCHIVE_URL": f"s3://{bucket}/prod",
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "parley-test",
        "AWS_SECRET_ACCESS_KEY": "parley-test",
        "AWS_REGION": "us-east-1",
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": model_server.base_url,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    assert exported <= set(env), exported - set(env)
    output = tmp_path / "walk.log"
    with open(output, "wb") as sink:
        walk = subprocess.Popen(["bash", "-c", script], cwd=checkout, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_until_serving(port, walk, output)
        keys = re.findall(r"^prly_\S+$", output.read_text(), re.MULTILINE)
        client_key = keys[-1]

        created = _call(port, "POST", "/new_chat", client_key, {"user_id": "walker", "conversation_name": "walk"})
        conversation_id = created[1]["conversation_id"]
        chat = _call(port, "POST", "/chat", client_key, {"conversation_id": conversation_id, "message": "hello"})
        ended = _call(port, "POST", "/end_chat", client_key, {"conversation_id": conversation_id})
        ready = _call(port, "GET", "/readyz", client_key)
    finally:
        os.killpg(walk.pid, signal.SIGTERM)
        walk.wait(timeout=60)

    log = output.read_text()
    assert re.search(r"Applied \d+ revision\(s\): 0001 ", log)
    assert f"bucket {bucket} created" in log and "is ready" in log
    assert len(keys) == 2
    assert created[0] == 201
    assert chat[0] == 200 and chat[1]["reply"] == "reply to: hello"
    assert ended[0] == 200 and ended[1]["status"] == "ended"
    location = ended[1]["s3_file_location"]  # relative to ARCHIVE_URL, s3://{bucket}/prod
    assert location.startswith("conversations/dt=")
    document = json.loads(s3_server.client().get_object(Bucket=bucket, Key=f"prod/{location}")["Body"].read())
    assert [m["content"] for m in document["messages"]] == ["hello", "reply to: hello"]
    assert ready == (200, {"status": "ok", "checks": {"database": "ok", "archive": "ok"}})


def _wait_until_serving(port: int, walk: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if walk.poll() is not None:
            pytest.fail(f"the production block stopped (exit {walk.returncode}):\n{output.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the server did not answer within {START_SECONDS}s:\n{output.read_text()[-3000:]}")
