"""The knowledge base: loading documents (API and CLI), the index made by
migration 0009, retrieval on /chat with its confidence bands and policies,
citations in JSON and in streams, and the Kendra backend on the wire."""
from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

import knowledge
from database_utils import KnowledgeDocument, KnowledgePassage, get_session
from main import create_app
from tests.conftest import client_with_key
from tests.fake_kendra import TARGET, FakeKendra, result_item
from tests.pdfs import pdf_with_text
from tests.test_streaming import parse_events

CORPUS = Path(__file__).parent / "data" / "knowledge"
DECLINE = "I could not find this in the knowledge base, so I cannot answer it reliably."
OFF_TOPIC = "What is the capital of France?"


def _counts(app) -> tuple[int, int]:
    with app.app_context():
        session = get_session()
        return (session.scalar(select(func.count()).select_from(KnowledgeDocument)),
                session.scalar(select(func.count()).select_from(KnowledgePassage)))


def _load_corpus(app) -> None:
    with app.app_context():
        summary = knowledge.load_folder(get_session(), app.config, CORPUS, progress=False)
    assert (summary.loaded, summary.failed) == (10, [])


def _open(client, **body) -> str:
    response = client.post("/new_chat", json={"user_id": "reader", **body})
    assert response.status_code == 201, response.json
    return response.json["conversation_id"]


def _chat(client, conversation_id: str, message: str, **body):
    return client.post("/chat", json={"conversation_id": conversation_id, "message": message, **body})


def _upload(client, name: str, data: bytes, mimetype: str = "application/octet-stream", **fields):
    return client.post(
        "/knowledge/documents",
        data={"file": (io.BytesIO(data), name, mimetype), **fields},
        content_type="multipart/form-data",
    )


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("holder", ["admin", "staff"])
def test_json_document_is_stored_listed_and_removed(app, keys, holder):
    caller = client_with_key(app, keys[holder])
    words = " ".join(f"word{n}" for n in range(600))  # about 4,300 characters: several passages

    created = caller.post("/knowledge/documents", json={"title": "Long guide", "text": words, "source_url": "https://kb.example/long"})

    assert created.status_code == 201, created.json
    document = created.json
    assert (document["title"], document["content_type"], document["source_url"]) == ("Long guide", "text", "https://kb.example/long")
    assert document["passage_count"] == 5 and document["char_count"] == len(words)
    listed = caller.get("/knowledge/documents").json
    assert listed["total"] == 1 and [d["document_id"] for d in listed["documents"]] == [document["document_id"]]

    removed = caller.delete(f"/knowledge/documents/{document['document_id']}")

    assert removed.status_code == 204
    assert caller.get("/knowledge/documents").json == {"documents": [], "total": 0}
    assert _counts(app) == (0, 0)


def test_passages_have_the_documented_size_and_overlap():
    body = " ".join(f"w{n:04d}" for n in range(1000))  # 5,999 characters of 5-letter words

    passages = knowledge.split_passages(body)

    assert all(len(p) <= knowledge.PASSAGE_CHARS for p in passages)
    assert len(passages) == 6
    for before, after in zip(passages, passages[1:], strict=False):
        shared = [w for w in after.split() if w in set(before.split())]
        assert after.startswith(" ".join(shared)) and before.endswith(" ".join(shared))
        assert knowledge.PASSAGE_OVERLAP_CHARS - 6 <= len(" ".join(shared)) <= knowledge.PASSAGE_OVERLAP_CHARS
    assert passages[0].split()[0] == "w0000" and passages[-1].split()[-1] == "w0999"


@pytest.mark.parametrize(
    ("name", "data", "kind", "title", "present", "absent"),
    [
        ("faq.md", b"# Returns FAQ\n\nOpened headphones may be returned within 14 days.", "markdown", "Returns FAQ",
         "Opened headphones", None),
        ("hours.html", b"<html><head><title>Hours</title><script>var secret = 'tracking';</script></head>"
         b"<body><h1>Hours</h1><p>Open from 9 to 5.</p></body></html>", "html", "Hours", "Open from 9 to 5.", "tracking"),
        ("notes.txt", "Delivery notes\nParcels wait seven days at the pickup point. Caf\u00e9 ok.".encode(), "text",
         "Delivery notes", "seven days", None),
        ("returns.pdf", pdf_with_text("Returns of opened headphones are accepted within 14 days.", title="Headphone returns"),
         "pdf", "Headphone returns", "opened headphones", None),
    ],
)
def test_upload_extracts_the_text_of_each_type(app, admin_client, name, data, kind, title, present, absent):
    response = _upload(admin_client, name, data)

    assert response.status_code == 201, response.json
    assert (response.json["content_type"], response.json["title"]) == (kind, title)
    with app.app_context():
        stored = " ".join(get_session().scalars(select(KnowledgePassage.text)))
    assert present in stored
    assert absent is None or absent not in stored


def test_upload_form_fields_override_the_found_title(admin_client):
    response = _upload(admin_client, "faq.md", b"# Heading\n\nbody text", title="Given title", source_url="https://kb.example/faq")

    assert response.status_code == 201
    assert (response.json["title"], response.json["source_url"]) == ("Given title", "https://kb.example/faq")


BAD_UPLOADS = {
    "empty file": ("empty.txt", b"", 400, "invalid_document"),
    "only whitespace": ("blank.md", b"  \n\t ", 400, "invalid_document"),
    "unsupported type": ("report.docx", b"PK\x03\x04 not really", 415, "unsupported_media_type"),
    "image": ("photo.png", b"\x89PNG\r\n\x1a\n", 415, "unsupported_media_type"),
    "broken pdf": ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage", 400, "invalid_document"),
    "pdf name without pdf content": ("fake.pdf", b"just text", 400, "invalid_document"),
    "pdf content named text": ("looks.txt", pdf_with_text("hello"), 400, "invalid_document"),
    "not utf-8": ("latin.txt", "caf\u00e9".encode("latin-1"), 400, "invalid_document"),
    "pdf without text": ("scan.pdf", pdf_with_text(""), 400, "invalid_document"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_4xx_and_store_nothing(app, admin_client, case):
    name, data, status, error = BAD_UPLOADS[case]

    response = _upload(admin_client, name, data)

    assert response.status_code == status, response.json
    assert response.json["error"] == error and response.json["message"]
    assert _counts(app) == (0, 0)


@pytest.mark.parametrize(
    "body",
    [
        {"title": "t", "text": ""},
        {"title": "t", "text": "   \n "},
        {"title": "", "text": "some text"},
        {"text": "no title"},
        {"title": "t", "text": "nul \x00 byte"},
        {"title": "t", "text": "x", "colour": "extra field"},
        {"title": "t", "text": "x", "source_url": "javascript:alert(1)"},
        {"title": "t", "text": "x", "source_url": "data:text/html,<b>x</b>"},
        {"title": "t", "text": "x", "source_url": "https://kb.example/a b"},
    ],
)
def test_bad_json_documents_are_400_and_store_nothing(app, admin_client, body):
    response = admin_client.post("/knowledge/documents", json=body)

    assert response.status_code == 400, response.json
    assert set(response.json) >= {"error", "message"}
    if response.json["error"] == "invalid_request":  # a field refused: named in details, as on every route
        assert response.json["details"] and all(set(detail) == {"field", "problem"} for detail in response.json["details"])
    assert _counts(app) == (0, 0)


def test_multipart_without_file_and_other_bodies_are_400(app, admin_client):
    no_file = admin_client.post("/knowledge/documents", data={"title": "t"}, content_type="multipart/form-data")
    form_encoded = admin_client.post("/knowledge/documents", data={"title": "t"})
    a_field = admin_client.post("/knowledge/documents", data={"file": "text"}, content_type="multipart/form-data")

    assert no_file.status_code == 400 and "file" in no_file.json["message"]
    assert a_field.status_code == 400 and "must be a file part" in a_field.json["message"]  # curl -F file=<path
    assert form_encoded.status_code == 400
    script = _upload(admin_client, "faq.md", b"# Heading\n\nbody text", source_url="javascript:alert(1)")
    assert script.status_code == 400 and "source_url" in script.json["message"]
    assert _counts(app) == (0, 0)


def test_the_same_text_twice_is_409(admin_client):
    first = admin_client.post("/knowledge/documents", json={"title": "A", "text": "Parcels   wait seven days."})
    again = admin_client.post("/knowledge/documents", json={"title": "B", "text": "Parcels wait seven days."})

    assert first.status_code == 201
    assert again.status_code == 409 and again.json["error"] == "duplicate_document"
    assert first.json["document_id"] in again.json["message"]


def test_unknown_document_is_404(admin_client):
    response = admin_client.delete(f"/knowledge/documents/{uuid.uuid4()}")

    assert response.status_code == 404 and response.json["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "options"),
    [
        ("POST", "/knowledge/documents", lambda: {"json": {"title": "t", "text": "client text"}}),
        ("POST", "/knowledge/documents",
         lambda: {"data": {"file": (io.BytesIO(b"client text"), "a.txt")}, "content_type": "multipart/form-data"}),
        ("GET", "/knowledge/documents", dict),
        ("DELETE", f"/knowledge/documents/{uuid.uuid4()}", dict),
    ],
)
def test_client_keys_may_not_manage_documents(app, client, method, path, options):
    response = client.open(path, method=method, **options())

    assert response.status_code == 403 and response.json["error"] == "forbidden"
    assert _counts(app) == (0, 0)


def test_uploads_may_exceed_the_chat_body_limit_up_to_knowledge_max_bytes(app, admin_client):
    app.config["KNOWLEDGE_MAX_BYTES"] = 600 * 1024
    big = ("Shipping paragraph. " * 20_000).encode()  # 400 KB, above MAX_CONTENT_LENGTH (256 KiB)
    too_big = b"x " * 400 * 1024

    accepted = _upload(admin_client, "big.txt", big)
    refused = _upload(admin_client, "huge.txt", too_big)

    assert accepted.status_code == 201, accepted.json
    assert refused.status_code == 413 and str(600 * 1024) in refused.json["message"]
    assert _counts(app)[0] == 1


def test_cli_loads_a_folder_and_skips_what_is_loaded(app, runner, tmp_path):
    folder = tmp_path / "kb"
    folder.mkdir()
    for path in CORPUS.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not a real pdf")
    (folder / "ignored.csv").write_text("a,b")

    first = runner.invoke(args=["knowledge-load", str(folder)])
    again = runner.invoke(args=["knowledge-load", str(folder)])

    assert first.exit_code == 1  # one file failed; the others loaded
    assert "10 document(s) loaded (10 passages), 0 already loaded, 1 failed" in first.output
    assert "broken.pdf" in first.output
    assert "0 document(s) loaded (0 passages), 10 already loaded, 1 failed" in again.output
    assert _counts(app) == (10, 10)
    titles = {d.title for d in _documents(app)}
    assert {"Refund policy", "Store opening hours", "Payment methods"} <= titles


def _documents(app) -> list[KnowledgeDocument]:
    with app.app_context():
        return list(get_session().scalars(select(KnowledgeDocument)))


# ---------------------------------------------------------------- the index


def test_deleting_a_document_removes_it_from_the_index(app, admin_client):
    _load_corpus(app)
    with app.app_context():
        backend = knowledge.get_backend()
        session = get_session()
        assert backend.search(session, "gift card expire", 3)[0].title == "Gift cards"
        gift = session.scalar(select(KnowledgeDocument.document_id).where(KnowledgeDocument.title == "Gift cards"))

    assert admin_client.delete(f"/knowledge/documents/{gift}").status_code == 204

    with app.app_context():
        found = knowledge.get_backend().search(get_session(), "gift card expire", 3)
    assert "Gift cards" not in [p.title for p in found]


@pytest.mark.parametrize("backend", ["postgres"])
def test_migration_makes_a_gin_index_that_the_search_uses(app):
    _load_corpus(app)
    with app.app_context():
        session = get_session()
        index = session.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_knowledge_passages_search'")).scalar()
        column = session.execute(text(
            "SELECT data_type FROM information_schema.columns WHERE table_name = 'knowledge_passages' AND column_name = 'search_vector'"
        )).scalar()
        storage = session.execute(text(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'knowledge_passages'::regclass AND attname = 'search_vector'"
        )).scalar()
        session.execute(text("SET LOCAL enable_seqscan = off"))  # ten rows: let the plan show the index is usable
        plan = "\n".join(session.execute(
            text("EXPLAIN " + str(knowledge.POSTGRES_SEARCH)), {"language": "english", "query": "refund", "k": 3}
        ).scalars())

    assert "USING gin (search_vector)" in index
    assert column == "tsvector" and storage == "m"  # STORAGE MAIN: kept in the row
    assert "Bitmap Index Scan on ix_knowledge_passages_search" in plan


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_knowledge_language_the_database_lacks_is_a_503_that_no_retry_replays(app, app_config, keys):
    misconfigured = create_app({**app_config, "KNOWLEDGE_LANGUAGE": "klingon"})
    admin, client = client_with_key(misconfigured, keys["admin"]), client_with_key(misconfigured, keys["client_a"])
    conversation_id = _open(client, knowledge=True)
    body = {"conversation_id": conversation_id, "message": "How long do refunds take?"}

    upload = admin.post("/knowledge/documents", json={"title": "Refunds", "text": "Refunds are paid within 14 days."})
    first = client.post("/chat", json=body, headers={"Idempotency-Key": "kb-1"})
    retry = client.post("/chat", json=body, headers={"Idempotency-Key": "kb-1"})
    stored = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    misconfigured.extensions["parley.engine"].dispose()

    assert [(r.status_code, r.json["error"]) for r in (upload, first, retry)] == [(503, "misconfigured")] * 3
    assert "KNOWLEDGE_LANGUAGE='klingon' is not a text search configuration" in first.json["message"]
    assert "Idempotent-Replayed" not in retry.headers
    assert stored == []
    assert _counts(app) == (0, 0)


@pytest.mark.parametrize("backend", ["embedded"])
def test_migration_makes_an_fts5_table_kept_in_step_by_triggers(app):
    _load_corpus(app)
    with app.app_context():
        session = get_session()
        table = session.execute(text("SELECT sql FROM sqlite_master WHERE name = 'knowledge_fts'")).scalar()
        triggers = set(session.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars())
        indexed = session.execute(text("SELECT count(*) FROM knowledge_fts WHERE knowledge_fts MATCH 'warranty'")).scalar()

    assert "USING fts5" in table
    assert {"knowledge_passages_fts_insert", "knowledge_passages_fts_delete"} <= triggers
    assert indexed == 1


def test_search_finds_the_labelled_document_on_both_databases(app):
    _load_corpus(app)
    with app.app_context():
        backend, session = knowledge.get_backend(), get_session()
        assert backend.search(session, "I forgot my password", 3)[0].title == "Resetting your password"
        assert backend.search(session, "when do the stores open?", 3)[0].title == "Store opening hours"
        assert backend.search(session, OFF_TOPIC, 3) == []
        assert backend.search(session, '"-" OR AND * ^ NEAR( :: \'', 3) == []  # operators of both syntaxes: no error


def test_a_knowledge_base_of_one_document_answers_with_confidence(app, admin_client, client):
    """bm25's IDF is about zero for words in half the passages or more: a small base must still score."""
    text = "Refunds are paid within 14 days to the original card. Ask support for a refund form."
    assert admin_client.post("/knowledge/documents", json={"title": "Refunds", "text": text}).status_code == 201
    conversation_id = _open(client, knowledge=True)

    response = _chat(client, conversation_id, "How long do refunds take to be paid?")

    assert response.status_code == 200
    assert response.json["context"]["knowledge"]["band"] == "high"
    assert [c["title"] for c in response.json["citations"]] == ["Refunds"]


# ---------------------------------------------------------------- turns


@pytest.fixture
def anthropic_kb(provider_app, app_config):
    """Client A of an app with Claude (the anthropic SDK against the fake server) and the corpus loaded."""

    def build(**overrides):
        client = provider_app("anthropic", **overrides)
        _load_corpus(client.application)
        return client

    return build


def test_high_confidence_puts_passages_into_the_system_context_and_cites_them(anthropic_kb, fake_model):
    client = anthropic_kb()
    conversation_id = _open(client, knowledge=True, system_prompt="You are Parcelly's support assistant.")

    response = _chat(client, conversation_id, "I forgot my password, how do I reset it?")

    assert response.status_code == 200, response.json
    system = fake_model.requests[-1].body["system"]
    system = system if isinstance(system, str) else " ".join(block["text"] for block in system)
    assert system.startswith("You are Parcelly's support assistant.")
    assert "[1] Resetting your password" in system and "reset link arrives within a few minutes" in system
    citations = response.json["citations"]
    assert citations[0]["title"] == "Resetting your password" and citations[0]["score"] > 0
    report = response.json["context"]["knowledge"]
    assert (report["backend"], report["band"], report["policy"]) == ("database", "high", None)
    assert report["passages"][0]["used"] is True and report["passages"][0]["score"] == citations[0]["score"]
    assert [p["passage_id"] for p in report["passages"] if p["used"]] == [c["passage_id"] for c in citations]
    assert all(p["score"] < report["threshold"] for p in report["passages"] if not p["used"])
    assert report["tokens"] > 0 and response.json["context"]["tokens"] > report["tokens"]


def test_low_confidence_answer_policy_calls_the_model_without_passages(anthropic_kb, fake_model):
    client = anthropic_kb(KNOWLEDGE_LOW_CONFIDENCE_POLICY="answer")
    conversation_id = _open(client, knowledge=True)

    response = _chat(client, conversation_id, OFF_TOPIC)

    assert response.status_code == 200
    assert response.json["reply"] == f"reply to: {OFF_TOPIC}"
    assert "Knowledge base passages" not in str(fake_model.requests[-1].body.get("system", ""))
    assert response.json["citations"] == []
    report = response.json["context"]["knowledge"]
    assert (report["band"], report["policy"], report["tokens"]) == ("low", "answer", 0)


def test_low_confidence_reports_weak_passages_as_unused(anthropic_kb):
    client = anthropic_kb(KNOWLEDGE_MIN_SCORE=0.99)
    conversation_id = _open(client, knowledge=True)

    response = _chat(client, conversation_id, "I forgot my password somewhere in Ulaanbaatar")

    report = response.json["context"]["knowledge"]
    assert report["band"] == "low" and report["threshold"] == 0.99
    assert report["passages"] and not any(p["used"] for p in report["passages"])
    assert response.json["citations"] == []


def test_low_confidence_decline_policy_answers_without_the_model(anthropic_kb, fake_model):
    client = anthropic_kb(KNOWLEDGE_LOW_CONFIDENCE_POLICY="decline")
    conversation_id = _open(client, knowledge=True)
    fake_model.clear()

    response = _chat(client, conversation_id, OFF_TOPIC)

    assert response.status_code == 200
    assert response.json["reply"] == DECLINE and response.json["seq"] == 2
    assert response.json["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert response.json["context"]["knowledge"]["policy"] == "decline"
    assert fake_model.requests == []
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [(m["role"], m["content"]) for m in log["messages"]] == [("user", OFF_TOPIC), ("assistant", DECLINE)]


def test_low_confidence_handoff_policy_holds_the_turn_for_a_human(anthropic_kb, fake_model, keys):
    client = anthropic_kb(KNOWLEDGE_LOW_CONFIDENCE_POLICY="handoff")
    conversation_id = _open(client, knowledge=True)
    fake_model.clear()

    response = _chat(client, conversation_id, OFF_TOPIC)

    assert response.status_code == 202
    assert response.json == {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 1}
    assert fake_model.requests == []
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert log["handoff"] == "needs_human"
    assert [(h["to"], h["actor"]) for h in log["handoff_history"]] == [("needs_human", "knowledge")]
    queue = client_with_key(client.application, keys["staff"]).get("/conversations", query_string={"handoff": "needs_human"})
    assert [c["conversation_id"] for c in queue.json["conversations"]] == [conversation_id]


def test_high_confidence_with_handoff_policy_still_answers(anthropic_kb):
    client = anthropic_kb(KNOWLEDGE_LOW_CONFIDENCE_POLICY="handoff")
    conversation_id = _open(client, knowledge=True)

    response = _chat(client, conversation_id, "Do gift cards expire?")

    assert response.status_code == 200 and response.json["citations"][0]["title"] == "Gift cards"


def test_streamed_turn_carries_citations_in_done(anthropic_kb):
    client = anthropic_kb()
    conversation_id = _open(client, knowledge=True)

    response = _chat(client, conversation_id, "How much does express shipping cost?", stream=True)

    events = parse_events(response.data)
    assert response.mimetype == "text/event-stream"
    done = [data for name, data in events if name == "done"]
    assert len(done) == 1
    assert done[0]["citations"][0]["title"] == "Shipping times and costs"
    assert done[0]["context"]["knowledge"]["band"] == "high"
    assert "".join(data["text"] for name, data in events if name == "delta") == done[0]["reply"]


def test_streamed_decline_is_a_short_stream(anthropic_kb, fake_model):
    client = anthropic_kb(KNOWLEDGE_LOW_CONFIDENCE_POLICY="decline")
    conversation_id = _open(client, knowledge=True)
    fake_model.clear()

    response = _chat(client, conversation_id, OFF_TOPIC, stream=True)

    events = parse_events(response.data)
    assert [name for name, _ in events] == ["delta", "done"]
    assert events[0][1]["text"] == DECLINE and events[1][1]["context"]["knowledge"]["band"] == "low"
    assert fake_model.requests == []


def test_conversations_without_knowledge_do_not_search(app, client):
    _load_corpus(app)
    conversation_id = _open(client)

    response = _chat(client, conversation_id, "I forgot my password")

    assert response.json["citations"] == [] and "knowledge" not in response.json["context"]
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["knowledge"] is False


def test_knowledge_default_setting_opens_knowledge_conversations(app, client):
    app.config["KNOWLEDGE_DEFAULT"] = True
    _load_corpus(app)

    on_by_default = _open(client)
    turned_off = _open(client, knowledge=False)

    assert _chat(client, on_by_default, "I forgot my password").json["citations"]
    assert "knowledge" not in _chat(client, turned_off, "I forgot my password").json["context"]


# ---------------------------------------------------------------- Kendra


@pytest.fixture
def kendra():
    with FakeKendra() as server:
        yield server


@pytest.fixture
def kendra_client(app_config, keys, kendra):
    app = create_app({
        **app_config,
        "KNOWLEDGE_BACKEND": "kendra",
        "KENDRA_INDEX_ID": "0123abcd-4567-89ab-cdef-0123456789ab",
        "KENDRA_REGION": "eu-west-1",
        "KENDRA_ENDPOINT_URL": kendra.endpoint_url,
        "KNOWLEDGE_LOW_CONFIDENCE_POLICY": "decline",
    })
    yield client_with_key(app, keys["client_a"])
    app.extensions["parley.engine"].dispose()


@pytest.mark.parametrize("backend", ["embedded"])
def test_kendra_retrieve_request_and_confidence_mapping(kendra_client, kendra):
    kendra.result_items = [
        result_item(1, "MEDIUM", "Refund policy", "Refunds take five to seven business days.", "https://kb.example/refunds"),
        result_item(2, "VERY_HIGH", "Refunds FAQ", "A refund reaches your card within a week."),
        result_item(3, "HIGH", "Returns", "Returns are free within 30 days."),
        result_item(4, "LOW", "Shipping", "Parcels ship in two days."),
    ]
    conversation_id = _open(kendra_client, knowledge=True)

    response = _chat(kendra_client, conversation_id, "How long does a refund take?")

    sent = kendra.requests[-1]
    assert sent.target == TARGET and sent.content_type == "application/x-amz-json-1.1"
    assert "eu-west-1/kendra/aws4_request" in sent.authorization
    assert sent.body == {"IndexId": "0123abcd-4567-89ab-cdef-0123456789ab", "QueryText": "How long does a refund take?", "PageSize": 3}
    report = response.json["context"]["knowledge"]
    assert (report["backend"], report["band"], report["threshold"]) == ("kendra", "high", 0.75)
    assert [(p["title"], p["confidence"], p["score"], p["used"]) for p in report["passages"]] == [
        ("Refunds FAQ", "VERY_HIGH", 1.0, True),
        ("Returns", "HIGH", 0.75, True),
        ("Refund policy", "MEDIUM", 0.5, False),
    ]
    assert [(c["passage_id"], c["document_id"]) for c in response.json["citations"]] == [
        ("result-2", "s3://kb/doc-2.html"), ("result-3", "s3://kb/doc-3.html"),
    ]


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("confidences", [["MEDIUM", "LOW"], ["NOT_AVAILABLE"], []])
def test_kendra_below_high_confidence_is_low(kendra_client, kendra, confidences):
    kendra.result_items = [result_item(n, c, f"Doc {n}", "text") for n, c in enumerate(confidences)]
    conversation_id = _open(kendra_client, knowledge=True)

    response = _chat(kendra_client, conversation_id, "Anything?")

    assert response.json["reply"] == DECLINE
    assert response.json["context"]["knowledge"]["band"] == "low"
    assert [p["confidence"] for p in response.json["context"]["knowledge"]["passages"]] == confidences


@pytest.mark.parametrize("backend", ["embedded"])
def test_kendra_failure_is_503_and_stores_nothing(kendra_client, kendra):
    kendra.fail_status = 500
    conversation_id = _open(kendra_client, knowledge=True)

    before = len(kendra.requests)
    response = _chat(kendra_client, conversation_id, "How long does a refund take?")
    attempts = len(kendra.requests) - before
    kendra.fail_status = None
    kendra.result_items = [result_item(1, "HIGH", "Refunds", "Five days.")]
    retried = _chat(kendra_client, conversation_id, "How long does a refund take?")

    assert response.status_code == 503 and response.json["error"] == "knowledge_unavailable"
    assert attempts == 2  # within the lease's 30 s margin: 2 x (3 s to connect + 10 s to read) and one backoff
    assert retried.status_code == 200 and retried.json["seq"] == 2  # the failed turn stored nothing, released its lease


@pytest.mark.parametrize("backend", ["embedded"])
def test_kendra_documents_are_loaded_in_kendra_not_here(kendra_client, keys):
    admin = client_with_key(kendra_client.application, keys["admin"])

    response = admin.post("/knowledge/documents", json={"title": "t", "text": "some text"})

    assert response.status_code == 409 and "Kendra" in response.json["message"]


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"KNOWLEDGE_LOW_CONFIDENCE_POLICY": "shrug"}, "KNOWLEDGE_LOW_CONFIDENCE_POLICY"),
        ({"KNOWLEDGE_BACKEND": "elastic"}, "KNOWLEDGE_BACKEND"),
        ({"KNOWLEDGE_BACKEND": "kendra"}, "KENDRA_INDEX_ID"),
        ({"KENDRA_MIN_CONFIDENCE": "SOMEWHAT"}, "KENDRA_MIN_CONFIDENCE"),
        ({"KNOWLEDGE_LANGUAGE": "english; drop table"}, "KNOWLEDGE_LANGUAGE"),
        ({"KNOWLEDGE_TOP_K": "0"}, "KNOWLEDGE_TOP_K"),
    ],
)
def test_bad_knowledge_settings_are_refused_at_start(environ, problem):
    from config import load_config

    with pytest.raises(ValueError, match=problem):
        load_config(environ)


def test_good_knowledge_settings_are_normalised():
    from config import load_config

    config = load_config({"KNOWLEDGE_BACKEND": "Kendra", "KENDRA_INDEX_ID": "0123abcd-4567-89ab-cdef-0123456789ab",
                          "KNOWLEDGE_LOW_CONFIDENCE_POLICY": "HANDOFF", "KENDRA_MIN_CONFIDENCE": "medium",
                          "KNOWLEDGE_DEFAULT": "on", "KNOWLEDGE_MIN_SCORE": "0.3"})

    assert (config["KNOWLEDGE_BACKEND"], config["KNOWLEDGE_LOW_CONFIDENCE_POLICY"], config["KENDRA_MIN_CONFIDENCE"]) == (
        "kendra", "handoff", "MEDIUM")
    assert config["KNOWLEDGE_DEFAULT"] is True and config["KNOWLEDGE_MIN_SCORE"] == 0.3
