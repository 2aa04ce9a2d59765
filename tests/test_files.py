"""Files in a conversation: upload checks, storage, download, turns that send files, archive and erasure."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import threading
import uuid
import zlib
from datetime import timedelta

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, text, update

import files
from auth import create_key
from database_utils import AuditEvent, Conversation, ConversationFile, Message, get_session, utcnow
from states import Role
from tests.conftest import client_with_key
from tests.test_streaming import parse_events

# ---------------------------------------------------------------- sample files


def png(width: int = 300, height: int = 200) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def jpeg(width: int = 640, height: int = 480) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def gif(width: int = 40, height: int = 30) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + b"\x00" * 9 + b"\x3b"


def webp(width: int = 1000, height: int = 750) -> bytes:
    payload = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WEBP" + payload


def pdf(pages: int = 2) -> bytes:
    kids = " ".join(f"{3 + n} 0 R" for n in range(pages))
    objects = [
        b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
        f"2 0 obj << /Type /Pages /Kids [{kids}] /Count {pages} >> endobj".encode(),
        *(f"{3 + n} 0 obj << /Type /Page /Parent 2 0 R >> endobj".encode() for n in range(pages)),
    ]
    return b"%PDF-1.4\n" + b"\n".join(objects) + b"\ntrailer << /Root 1 0 R >>\n%%EOF\n"


SAMPLES = {
    "photo.png": (png(), "image/png"),
    "photo.jpg": (jpeg(), "image/jpeg"),
    "anim.gif": (gif(), "image/gif"),
    "pic.webp": (webp(), "image/webp"),
    "invoice.pdf": (pdf(), "application/pdf"),
    "notes.txt": ("Order #42: two chairs, one table. Grüße".encode(), "text/plain"),
    "README.md": (b"# Title\n\n- item one\n- item two\n", "text/markdown"),
}


# ---------------------------------------------------------------- helpers


def _open(client, **body) -> str:
    response = client.post("/new_chat", json={"user_id": "u-files", **body})
    assert response.status_code == 201, response.json
    return response.json["conversation_id"]


def _upload(client, conversation_id: str, data: bytes, name: str = "file.bin", declared: str | None = None):
    part = (io.BytesIO(data), name, declared) if declared else (io.BytesIO(data), name)
    return client.post(f"/conversations/{conversation_id}/files", data={"file": part}, content_type="multipart/form-data")


def _stored(app) -> tuple[int, list[str]]:
    """Rows in conversation_files, and object keys under files/."""
    with app.app_context():
        rows = get_session().scalar(select(func.count()).select_from(ConversationFile))
    return rows, [item.key for item in app.extensions["parley.archive"].list(files.FILES_PREFIX)]


def _messages(app, conversation_id: str) -> int:
    with app.app_context():
        return get_session().scalar(select(func.count()).where(Message.conversation_id == uuid.UUID(conversation_id)))


# ---------------------------------------------------------------- upload, list, download


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_upload_list_and_download_each_allowed_type(app, client, keys, name):
    data, content_type = SAMPLES[name]
    conversation_id = _open(client)

    uploaded = _upload(client, conversation_id, data, name)

    assert uploaded.status_code == 201, uploaded.json
    body = uploaded.json
    file_id = body["file_id"]
    assert body["content_type"] == content_type and body["name"] == name and body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["location"] == f"files/{conversation_id}/{file_id}"
    assert app.extensions["parley.archive"].get(body["location"]) == data
    assert client.get(f"/conversations/{conversation_id}/files").json == {"files": [body]}
    download = client.get(f"/conversations/{conversation_id}/files/{file_id}")
    assert download.status_code == 200 and download.data == data
    assert download.mimetype == content_type
    assert download.headers["Content-Disposition"].startswith("attachment;") and name in download.headers["Content-Disposition"]
    assert download.headers["X-Content-Type-Options"] == "nosniff"


def test_s3_object_carries_its_checksum_and_type_as_metadata(app, client, backend):
    conversation_id = _open(client)
    body = _upload(client, conversation_id, png(), "a.png").json
    archive = app.extensions["parley.archive"]

    if backend == "postgres":
        head = archive.client.head_object(Bucket=archive.bucket, Key=f"{archive.prefix}/{body['location']}")
        assert head["Metadata"]["sha256"] == body["sha256"] and head["ContentType"] == "image/png"
        assert head["ContentLength"] == len(png())
    else:
        assert (archive.root / body["location"]).read_bytes() == png()


def test_download_name_with_unicode_and_quotes_is_encoded_safely(client):
    conversation_id = _open(client)
    body = _upload(client, conversation_id, b"hello", "../../r\u00e9sum\u00e9; final.txt").json

    download = client.get(f"/conversations/{conversation_id}/files/{body['file_id']}")

    assert body["name"] == "r\u00e9sum\u00e9; final.txt"
    disposition = download.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%3B%20final.txt" in disposition and "/" not in disposition


def test_a_ten_mebibyte_file_is_accepted_at_the_default_limit(app, client):
    conversation_id = _open(client)
    data = b"a" * (10 * 1024 * 1024)

    response = _upload(client, conversation_id, data, "big.txt")

    assert app.config["MAX_FILE_BYTES"] == 10 * 1024 * 1024
    assert response.status_code == 201, response.json and response.json["size"] == len(data)
    # JSON routes keep their own, smaller limit
    too_long = client.post("/chat", json={"conversation_id": conversation_id, "message": "x" * (app.config["MAX_CONTENT_LENGTH"] + 1)})
    assert too_long.status_code == 413


BAD_UPLOADS = [
    pytest.param(png(), "photo.pdf", None, 415, "file_type_mismatch", id="png-named-pdf"),
    pytest.param(pdf(), "scan", "image/png", 415, "file_type_mismatch", id="pdf-declared-png"),
    pytest.param(png(), "setup.exe", None, 415, "file_type_mismatch", id="png-named-exe"),
    pytest.param(b"hello", "photo.png", None, 415, "file_type_mismatch", id="text-named-png"),
    pytest.param(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe", "archive.zip", None, 415, "unsupported_file_type", id="zip"),
    pytest.param(b"text with a \x00 NUL", "notes.txt", None, 415, "unsupported_file_type", id="nul-in-text"),
    pytest.param(b"\xff\xfe\xfa latin junk", "notes.txt", None, 415, "unsupported_file_type", id="not-utf8"),
    pytest.param(b"", "empty.txt", None, 422, "empty_file", id="zero-bytes"),
    pytest.param(b"a" * 2049, "big.txt", None, 413, "payload_too_large", id="over-max-file-bytes"),
    pytest.param(b"a" * (2048 + files.MULTIPART_OVERHEAD_BYTES + 10), "huge.txt", None, 413, "payload_too_large", id="over-request-limit"),
]


@pytest.mark.parametrize(("data", "name", "declared", "status", "error"), BAD_UPLOADS)
def test_bad_uploads_are_refused_and_store_nothing(app, client, data, name, declared, status, error):
    app.config["MAX_FILE_BYTES"] = 2048
    conversation_id = _open(client)

    response = _upload(client, conversation_id, data, name, declared)

    assert response.status_code == status, response.json
    assert response.json["error"] == error and response.json["message"]
    assert _stored(app) == (0, [])


def test_a_missing_file_part_is_400(app, client):
    conversation_id = _open(client)

    no_part = client.post(f"/conversations/{conversation_id}/files", data={"other": "x"}, content_type="multipart/form-data")
    as_json = client.post(f"/conversations/{conversation_id}/files", json={"file": "x"})
    a_field = client.post(f"/conversations/{conversation_id}/files", data={"file": "hello"}, content_type="multipart/form-data")
    two = client.post(f"/conversations/{conversation_id}/files", content_type="multipart/form-data",
                      data={"file": [(io.BytesIO(b"one"), "a.txt"), (io.BytesIO(b"two"), "b.txt")]})

    assert no_part.status_code == 400 and no_part.json["error"] == "invalid_request"
    assert a_field.status_code == 400 and "must be a file part" in a_field.json["message"]  # curl -F file=<path
    assert two.status_code == 400 and "one file per request" in two.json["message"]
    assert as_json.status_code == 400 and as_json.json["error"] == "invalid_request"
    assert _stored(app) == (0, [])


def test_files_of_someone_elses_conversation_are_404(app, client, keys):
    conversation_id = _open(client)
    file_id = _upload(client, conversation_id, b"mine", "a.txt").json["file_id"]
    other = client_with_key(app, keys["client_b"])

    upload = _upload(other, conversation_id, b"theirs", "b.txt")
    listing = other.get(f"/conversations/{conversation_id}/files")
    download = other.get(f"/conversations/{conversation_id}/files/{file_id}")
    wrong_pair = client.get(f"/conversations/{_open(client)}/files/{file_id}")

    assert [r.status_code for r in (upload, listing, download, wrong_pair)] == [404, 404, 404, 404]
    assert upload.json["error"] == "not_found"
    assert _stored(app)[0] == 1 and len(_stored(app)[1]) == 1


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_upload_released_and_claimed_by_another_staff_key_while_its_object_is_written_is_refused(app, client, keys):
    """The assignment is checked again under the row lock, after the object is written."""
    staff = client_with_key(app, keys["staff"])
    with app.app_context():
        other_staff = client_with_key(app, create_key(get_session(), Role.STAFF, "staff-2")[1])
    conversation_id = _open(client)
    client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "needs a person"})
    assert staff.post(f"/conversations/{conversation_id}/claim").status_code == 200
    moved = []

    def hand_over(**_kwargs):  # while the object is being written; on a thread of its own, as another worker
        def requests():
            moved.append(staff.post(f"/conversations/{conversation_id}/release", json={}).status_code)
            moved.append(client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "again"}).status_code)
            moved.append(other_staff.post(f"/conversations/{conversation_id}/claim").status_code)

        if not moved:
            worker = threading.Thread(target=requests)
            worker.start()
            worker.join(30)

    events = app.extensions["parley.archive"].client.meta.events
    events.register("before-call.s3.PutObject", hand_over)
    try:
        upload = _upload(staff, conversation_id, b"from staff", "note.txt")
    finally:
        events.unregister("before-call.s3.PutObject", hand_over)

    assert moved == [200, 200, 200]
    assert upload.status_code == 409 and upload.json["error"] == "handoff_conflict", upload.json
    assert _stored(app) == (0, [])


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_upload_whose_row_fails_at_commit_leaves_no_object(app, client):
    """A check that fails only at COMMIT stands for a connection lost then: the object is deleted again."""
    conversation_id = _open(client)
    engine = app.extensions["parley.engine"]
    with engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION parley_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '08006'; END $$"
        ))
        connection.execute(text(
            "CREATE CONSTRAINT TRIGGER parley_test_refuse AFTER INSERT ON conversation_files "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION parley_test_refuse()"
        ))
    try:
        upload = _upload(client, conversation_id, b"hello", "a.txt")
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER parley_test_refuse ON conversation_files"))
            connection.execute(text("DROP FUNCTION parley_test_refuse()"))

    assert upload.status_code == 503 and upload.json["error"] == "database_unavailable", upload.json
    assert _stored(app) == (0, [])
    assert _upload(client, conversation_id, b"hello", "a.txt").status_code == 201


def test_assigned_staff_may_upload_others_may_not_and_staff_reads_are_audited(app, client, keys):
    staff = client_with_key(app, keys["staff"])
    conversation_id = _open(client)

    before_claim = _upload(staff, conversation_id, b"from staff", "note.txt")
    client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "needs a person"})
    staff.post(f"/conversations/{conversation_id}/claim")
    after_claim = _upload(staff, conversation_id, b"from staff", "note.txt")
    listed = staff.get(f"/conversations/{conversation_id}/files")
    downloaded = staff.get(f"/conversations/{conversation_id}/files/{after_claim.json['file_id']}")

    assert before_claim.status_code == 409 and before_claim.json["error"] == "handoff_conflict"
    assert after_claim.status_code == 201
    with app.app_context():
        session = get_session()
        staff_key = session.get(Conversation, uuid.UUID(conversation_id)).assigned_key_id
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.conversation_id == uuid.UUID(conversation_id))).all()
    assert after_claim.json["uploaded_by"] == str(staff_key)
    assert listed.status_code == 200 and downloaded.data == b"from staff"
    assert {"list_files", "read_file"} <= set(actions)
    assert _stored(app)[0] == 1


def test_an_ended_conversation_takes_no_files_but_keeps_serving_its_own(app, client):
    conversation_id = _open(client)
    file_id = _upload(client, conversation_id, b"kept", "a.txt").json["file_id"]
    client.post("/end_chat", json={"conversation_id": conversation_id})

    refused = _upload(client, conversation_id, b"late", "b.txt")

    assert refused.status_code == 409 and refused.json["error"] == "conflict"
    assert client.get(f"/conversations/{conversation_id}/files/{file_id}").data == b"kept"
    assert _stored(app)[0] == 1


def test_a_download_whose_bytes_changed_is_503_not_wrong_bytes(app, client):
    conversation_id = _open(client)
    body = _upload(client, conversation_id, b"original", "a.txt").json
    app.extensions["parley.archive"].put(body["location"], b"tampered", "text/plain")

    response = client.get(f"/conversations/{conversation_id}/files/{body['file_id']}")

    assert response.status_code == 503 and response.json["error"] == "archive_unavailable"


# ---------------------------------------------------------------- turns that send files


def test_echo_acknowledges_the_files_and_the_message_records_them(app, client):
    conversation_id = _open(client)
    image = _upload(client, conversation_id, png(), "a.png").json
    text = _upload(client, conversation_id, b"some notes", "n.txt").json

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "look", "file_ids": [image["file_id"], text["file_id"]]})

    assert response.status_code == 200, response.json
    assert response.json["reply"].endswith("You said: look (with 2 file(s): image/png, text)")
    assert response.json["context"]["tokens"] >= image["token_estimate"] + text["token_estimate"]
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    assert log[0]["file_ids"] == [image["file_id"], text["file_id"]] and log[1]["file_ids"] == []


@pytest.mark.parametrize("which", ["other-conversation", "unknown"])
def test_a_file_id_not_of_this_conversation_is_422_and_stores_no_turn(app, client, keys, which):
    conversation_id = _open(client)
    other_owner = client_with_key(app, keys["client_b"]) if which == "other-conversation" else client
    other_conversation = _open(other_owner)
    foreign = _upload(other_owner, other_conversation, b"elsewhere", "x.txt").json["file_id"]
    file_id = foreign if which == "other-conversation" else str(uuid.uuid4())

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "file_ids": [file_id]})
    after = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi again"})

    assert response.status_code == 422 and response.json["error"] == "unknown_file" and file_id in response.json["message"]
    assert after.status_code == 200 and after.json["seq"] == 2  # no turn stored, the lease was never taken


def test_files_that_leave_no_room_in_the_budget_are_413(app, client):
    app.config["CONTEXT_MAX_TOKENS"] = 2000
    conversation_id = _open(client)
    document = _upload(client, conversation_id, pdf(pages=2), "two-pages.pdf").json

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "read it", "file_ids": [document["file_id"]]})

    assert document["token_estimate"] == 2 * files.PDF_TOKENS_PER_PAGE
    assert response.status_code == 413 and response.json["error"] == "payload_too_large"
    assert _messages(app, conversation_id) == 0


def test_files_take_their_share_of_the_budget_before_the_history(app, client):
    app.config["CONTEXT_MAX_TOKENS"] = 3000
    conversation_id = _open(client)
    for n in range(6):
        client.post("/chat", json={"conversation_id": conversation_id, "message": f"message {n} " + "words " * 60})
    image = _upload(client, conversation_id, png(1200, 1200), "big.png").json
    without = client.post("/chat", json={"conversation_id": conversation_id, "message": "plain"}).json["context"]

    with_file = client.post("/chat", json={"conversation_id": conversation_id, "message": "with", "file_ids": [image["file_id"]]}).json["context"]

    assert image["token_estimate"] == files.MAX_IMAGE_TOKENS
    assert with_file["messages_sent"] < without["messages_sent"]
    assert with_file["tokens"] <= 3000 and with_file["tokens"] >= files.MAX_IMAGE_TOKENS


def test_anthropic_gets_image_document_and_text_blocks_on_the_wire(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _open(client)
    ids = [_upload(client, conversation_id, SAMPLES[name][0], name).json["file_id"] for name in ("photo.png", "invoice.pdf", "README.md")]

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "What are these?", "file_ids": ids})
    later = client.post("/chat", json={"conversation_id": conversation_id, "message": "And now?"})

    assert response.status_code == 200, response.json
    assert response.json["reply"].startswith("reply to: [file README.md") and response.json["reply"].endswith("What are these?")
    image, document, text, message = fake_model.requests[-2].body["messages"][-1]["content"]
    assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png()).decode()}}
    assert document == {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(pdf()).decode()}}
    assert text == {"type": "text", "text": "[file README.md (text/markdown)]\n" + SAMPLES["README.md"][0].decode()}
    assert message == {"type": "text", "text": "What are these?"}
    # later turns send the message's text alone
    assert later.status_code == 200
    assert [m["content"] for m in fake_model.requests[-1].body["messages"]] == ["What are these?", response.json["reply"], "And now?"]


def test_anthropic_stream_sends_the_files_too(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _open(client)
    file_id = _upload(client, conversation_id, jpeg(), "p.jpg").json["file_id"]

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "describe", "file_ids": [file_id], "stream": True})

    events = parse_events(response.data)
    assert events[-1][0] == "done" and events[-1][1]["reply"].endswith("describe")
    request = fake_model.requests[-1]
    assert request.body["stream"] is True
    assert request.body["messages"][-1]["content"][0]["source"]["media_type"] == "image/jpeg"
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    assert log[0]["file_ids"] == [file_id]


def test_bedrock_shares_the_anthropic_blocks(provider_app, fake_model):
    client = provider_app("bedrock")
    conversation_id = _open(client)
    file_id = _upload(client, conversation_id, pdf(), "a.pdf").json["file_id"]

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "summarise", "file_ids": [file_id]})

    assert response.status_code == 200, response.json
    request = fake_model.requests[-1]
    assert request.path == "/model/bedrock-test-model/invoke"
    assert request.body["messages"][-1]["content"][0]["type"] == "document"


def test_openai_gets_images_as_data_urls_and_refuses_pdfs_before_any_call(app, provider_app, fake_model):
    client = provider_app("openai")
    conversation_id = _open(client)
    image = _upload(client, conversation_id, gif(), "a.gif").json["file_id"]
    notes = _upload(client, conversation_id, b"plain notes", "n.txt").json["file_id"]
    document = _upload(client, conversation_id, pdf(), "a.pdf").json["file_id"]

    sent = client.post("/chat", json={"conversation_id": conversation_id, "message": "see", "file_ids": [image, notes]})
    calls = len(fake_model.requests)
    refused = client.post("/chat", json={"conversation_id": conversation_id, "message": "and this", "file_ids": [document]})

    assert sent.status_code == 200, sent.json
    parts = fake_model.requests[-1].body["messages"][-1]["content"]
    assert parts == [
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64," + base64.b64encode(gif()).decode()}},
        {"type": "text", "text": "[file n.txt (text/plain)]\nplain notes"},
        {"type": "text", "text": "see"},
    ]
    assert refused.status_code == 422 and refused.json["error"] == "unsupported_file_for_provider" and "a.pdf" in refused.json["message"]
    assert len(fake_model.requests) == calls
    assert _messages(client.application, conversation_id) == 2


# ---------------------------------------------------------------- archive, export, erasure


def test_archive_document_and_exports_list_the_files(app, client, runner, tmp_path):
    conversation_id = _open(client)
    body = _upload(client, conversation_id, png(), "a.png").json
    client.post("/chat", json={"conversation_id": conversation_id, "message": "with a file", "file_ids": [body["file_id"]]})
    ended = client.post("/end_chat", json={"conversation_id": conversation_id}).json
    day = ended["ended_at"][:10]

    document = json.loads(app.extensions["parley.archive"].get(ended["s3_file_location"]))
    jsonl = runner.invoke(args=["export", "--since", day, "--until", day, "--format", "jsonl", "--out", str(tmp_path / "j")])
    parquet = runner.invoke(args=["export", "--since", day, "--until", day, "--format", "parquet", "--out", str(tmp_path / "p")])

    assert document["files"] == [body]
    assert document["messages"][0]["file_ids"] == [body["file_id"]]
    assert jsonl.exit_code == 0 and parquet.exit_code == 0, (jsonl.output, parquet.output)
    line = json.loads(next((tmp_path / "j").rglob("*.jsonl")).read_text().splitlines()[0])
    assert line["files"] == [body]
    table = pq.read_table(next((tmp_path / "p").rglob("*.parquet")))
    assert table["file_ids"].to_pylist() == [[body["file_id"]], []]
    assert json.loads(table["files"][0].as_py()) == [json.loads(json.dumps(body, sort_keys=True))]


def test_delete_user_removes_the_files_objects_and_rows(app, client, runner):
    erased, kept = _open(client, user_id="erase-me"), _open(client, user_id="keep-me")
    _upload(client, erased, png(), "a.png")
    _upload(client, erased, b"notes", "b.txt")
    client.post("/end_chat", json={"conversation_id": erased})
    kept_file = _upload(client, kept, b"stays", "c.txt").json

    result = runner.invoke(args=["delete-user", "erase-me"])

    assert result.exit_code == 0, result.output
    assert _stored(app) == (1, [kept_file["location"]])


def test_delete_user_removes_a_file_object_that_has_no_row(app, client, runner):
    """An upload the store answered too late: Parley answered 503 and stored no row, but the
    object landed afterwards (a hung S3 that came back). Erasing the user takes it too."""
    erased = _open(client, user_id="erase-me")
    kept_file = _upload(client, _open(client, user_id="keep-me"), b"stays", "c.txt").json
    late = files.file_key(uuid.UUID(erased), uuid.uuid4())
    app.extensions["parley.archive"].put(late, b"landed after the answer", "text/plain")

    result = runner.invoke(args=["delete-user", "erase-me"])

    assert result.exit_code == 0, result.output
    assert _stored(app) == (1, [kept_file["location"]])


def test_archive_retention_removes_the_files_with_the_conversation(app, client, runner):
    app.config["ARCHIVE_RETENTION_DAYS"] = 30
    old, recent = _open(client), _open(client)
    _upload(client, old, pdf(), "old.pdf")
    recent_file = _upload(client, recent, pdf(), "recent.pdf").json
    for conversation_id in (old, recent):
        client.post("/end_chat", json={"conversation_id": conversation_id})
    with app.app_context():
        session = get_session()
        session.execute(update(Conversation).where(Conversation.conversation_id == uuid.UUID(old)).values(ended_at=utcnow() - timedelta(days=31)))
        session.commit()

    result = runner.invoke(args=["retention"])

    assert result.exit_code == 0 and "dropped 1 archived conversations" in result.output
    assert _stored(app) == (1, [recent_file["location"]])


# ---------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize(
    ("content_type", "data", "size"),
    [("image/png", png(300, 200), (300, 200)), ("image/jpeg", jpeg(640, 480), (640, 480)),
     ("image/gif", gif(40, 30), (40, 30)), ("image/webp", webp(1000, 750), (1000, 750))],
)
def test_image_dimensions_are_read_from_the_headers(content_type, data, size):
    assert files.sniff(data) == content_type
    assert files.image_size(content_type, data) == size
    assert files.token_estimate(content_type, "x", data) == min(-(-size[0] * size[1] // 750), files.MAX_IMAGE_TOKENS)


def test_pdf_pages_and_text_estimates():
    assert files.pdf_pages(pdf(pages=3)) == 3
    assert files.pdf_pages(b"%PDF-1.7\n(compressed object streams)") == 1
    assert files.token_estimate("application/pdf", "a.pdf", pdf(pages=3)) == 3 * files.PDF_TOKENS_PER_PAGE
    assert files.token_estimate("text/plain", "a.txt", b"abc") > 1


def test_markdown_is_text_named_or_declared_so():
    assert files.check_upload("a.md", None, b"# hi", 100) == "text/markdown"
    assert files.check_upload("a", "text/markdown", b"# hi", 100) == "text/markdown"
    assert files.check_upload("a.txt", "text/markdown", b"# hi", 100) == "text/markdown"
    assert files.check_upload("a", "application/octet-stream", b"# hi", 100) == "text/plain"
