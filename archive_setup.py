"""Preparing the archive before the first conversation ends, and explaining its faults.

`parley archive-prepare` creates the S3 bucket when it is missing (and the
credentials may), then writes, reads back and deletes a probe object under
the archive's prefix, so that `/end_chat` is known to work before a user
needs it. For a folder archive it does the same with a probe file.

Each failure is one line naming its cause (`AccessDenied`,
`NoCredentialsError`, ...) and what to do about it; `/readyz` uses the same
explanations.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import boto3
import click
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from flask import Flask, current_app
from flask.cli import with_appcontext

PROBE_BODY = b'{"probe": "parley archive-prepare"}'
_BOTO_CONFIG = BotoConfig(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})

# Error code or class -> what an operator should do. Never includes a secret.
_HINTS = {
    "NoSuchBucket": "the bucket does not exist: run `parley archive-prepare`, or create it",
    "AccessDenied": "the credentials may not do this: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy",
    "InvalidAccessKeyId": "the store does not know AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY does not match AWS_ACCESS_KEY_ID",
    "NoCredentialsError": "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role)",
    "EndpointConnectionError": "cannot connect to the S3 endpoint: check S3_ENDPOINT_URL and the network",
    "ConnectTimeoutError": "the S3 endpoint did not accept a connection in time: check S3_ENDPOINT_URL and the network",
    "ReadTimeoutError": "the S3 endpoint accepted the connection but did not answer in time",
    "NoRegionError": "no region: set AWS_REGION",
    "IllegalLocationConstraintException": "the bucket's region differs from AWS_REGION",
    "PermissionError": "the archive folder is not writable by this user",
    "FileNotFoundError": "a folder on the archive path is missing",
    "NotADirectoryError": "part of the archive path is a file, not a folder",
}
# HEAD requests carry no error body, so S3 reports only the status.
_STATUS_CODES = {"404": "NoSuchBucket", "403": "AccessDenied"}


class ArchiveNotReady(click.ClickException):
    """A step of preparing the archive failed; the message is one line."""


def failure_reason(exc: BaseException) -> tuple[str, str]:
    """(error class or S3 error code, hint) for an archive failure or its cause."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ClientError):
        code = cause.response.get("Error", {}).get("Code", "ClientError")
        code = _STATUS_CODES.get(code, code)
    else:
        code = type(cause).__name__
    return code, _HINTS.get(code, "see the server log for details")


def prepare_archive(
    archive_url: str, endpoint_url: str | None = None, create_bucket: bool = True, say: Callable[[str], None] = print
) -> None:
    """Make the archive usable and prove it, or raise `ArchiveNotReady`."""
    parsed = urlparse(archive_url)
    if parsed.scheme == "s3" and parsed.netloc:
        _prepare_bucket(parsed.netloc, parsed.path.strip("/"), endpoint_url, create_bucket, say)
    elif parsed.scheme == "file":
        _prepare_folder(Path(parsed.netloc + parsed.path), say)
    else:
        raise ArchiveNotReady(f"ARCHIVE_URL must be s3://bucket/prefix or file:///path, not {archive_url!r}")


def _prepare_bucket(bucket: str, prefix: str, endpoint_url: str | None, create: bool, say: Callable[[str], None]) -> None:
    # A session of its own: credentials are looked up now, not reused from earlier clients.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=_BOTO_CONFIG)
    where = f"s3://{bucket}" + (f" at {endpoint_url}" if endpoint_url else "")

    def step(action: str, call: Callable[[], object]) -> object:
        try:
            return call()
        except (BotoCoreError, ClientError) as exc:
            code, hint = failure_reason(exc)
            raise ArchiveNotReady(f"could not {action} {where}: {code} ({hint})") from exc

    try:
        client.head_bucket(Bucket=bucket)
        say(f"bucket {bucket} exists")
    except ClientError as exc:
        if failure_reason(exc)[0] != "NoSuchBucket":
            code, hint = failure_reason(exc)
            raise ArchiveNotReady(f"could not check bucket {where}: {code} ({hint})") from exc
        if not create:
            raise ArchiveNotReady(f"bucket {where} does not exist (NoSuchBucket); create it or drop --no-create-bucket") from exc
        region = client.meta.region_name
        options = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        step("create bucket", lambda: client.create_bucket(Bucket=bucket, **options))
        say(f"bucket {bucket} created")
    except BotoCoreError as exc:
        code, hint = failure_reason(exc)
        raise ArchiveNotReady(f"could not check bucket {where}: {code} ({hint})") from exc

    key = f"{prefix}/.parley-probe-{uuid.uuid4().hex}" if prefix else f".parley-probe-{uuid.uuid4().hex}"
    step("write a probe object to", lambda: client.put_object(Bucket=bucket, Key=key, Body=PROBE_BODY))
    body = step("read the probe object back from", lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if body != PROBE_BODY:
        raise ArchiveNotReady(f"the probe object read back from {where} differs from what was written")
    step("delete the probe object from", lambda: client.delete_object(Bucket=bucket, Key=key))
    say(f"wrote, read back and deleted s3://{bucket}/{key}")


def _prepare_folder(root: Path, say: Callable[[str], None]) -> None:
    probe = root / f".parley-probe-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(PROBE_BODY)
        if probe.read_bytes() != PROBE_BODY:
            raise ArchiveNotReady(f"the probe file read back from {root} differs from what was written")
        probe.unlink()
    except OSError as exc:
        code, hint = failure_reason(exc)
        raise ArchiveNotReady(f"could not use the archive folder {root}: {code} ({hint})") from exc
    say(f"wrote, read back and deleted {probe}")


@click.command("archive-prepare")
@click.option("--create-bucket/--no-create-bucket", default=True, show_default=True,
              help="Create the S3 bucket when it does not exist.")
@with_appcontext
def archive_prepare_command(create_bucket: bool) -> None:
    """Create the archive's bucket if needed and check it can write, read and delete."""
    config = current_app.config
    prepare_archive(config["ARCHIVE_URL"], config["S3_ENDPOINT_URL"], create_bucket, say=click.echo)
    click.echo(f"Archive {config['ARCHIVE_URL']} is ready.")


def init_app(app: Flask) -> None:
    app.cli.add_command(archive_prepare_command)
