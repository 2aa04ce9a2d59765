"""The knowledge base: documents split into passages, searched on each /chat turn that asks for it.

Loading: `POST /knowledge/documents` (JSON `{title, text, source_url?}` or a
multipart upload of plain text, Markdown, HTML or PDF) and `parley
knowledge-load FOLDER`. Text is extracted (HTML with BeautifulSoup, PDF with
pypdf), split into passages of at most PASSAGE_CHARS characters, each
overlapping the one before by about PASSAGE_OVERLAP_CHARS (cut at spaces), and
indexed by migration 0008's full-text index:
- PostgreSQL: `search_vector` (to_tsvector(KNOWLEDGE_LANGUAGE, text)), GIN;
  the user's message goes through `websearch_to_tsquery` with its terms OR-ed
  (a question rarely repeats every word of its answer), ranked by
  `ts_rank_cd(..., 32)`, which is rank / (rank + 1), in [0, 1);
- SQLite: FTS5 with the porter stemmer, ranked by bm25; the score is the
  share of the message's words (stop words left out) that the passage
  contains. bm25 itself cannot be the score: its IDF is about zero for a
  word in half the passages or more, so a knowledge base of a few
  documents scored 0 for the very passage asked about.
- `KNOWLEDGE_BACKEND=kendra`: AWS Kendra's Retrieve API through boto3; its
  ScoreConfidence VERY_HIGH, HIGH, MEDIUM, LOW, NOT_AVAILABLE is reported
  as the score 1.0, 0.75, 0.5, 0.25, 0.0 and KENDRA_MIN_CONFIDENCE is the threshold.

A turn (between `prepare_turn` and the model call) searches with the user's
message. At or above the threshold (KNOWLEDGE_MIN_SCORE; by default 0.2 on
PostgreSQL, 0.5 on SQLite, whose scores count words) the band is `high`:
the passages that reach it go into the system context with their titles and
come back as `citations`. Below it the band is `low` and
KNOWLEDGE_LOW_CONFIDENCE_POLICY applies: `answer` (the model answers without
passages), `decline` (KNOWLEDGE_DECLINE_REPLY, no model call) or `handoff`
(the message is held and the conversation goes to `needs_human`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import boto3
import click
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from bs4 import BeautifulSoup
from flask import Flask, current_app
from flask.cli import with_appcontext
from pydantic import BaseModel, ValidationError
from pypdf import PdfReader
from sqlalchemy import Uuid, bindparam, func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from tqdm import tqdm

from auth import Caller
from conversation_memory import estimate_tokens
from conversations import PreparedTurn
from database_utils import KnowledgeDocument, KnowledgePassage, get_session, plan_for_these_values, utcnow
from errors import MISCONFIGURED, ApiError, Conflict, InvalidInput, NotFound, UnsupportedMediaType
from handoff import Trigger
from llm import ModelReply
from schemas import KnowledgeText, KnowledgeUploadForm

log = logging.getLogger("parley")

# Passage size and overlap, in characters (about 300 and 50 tokens of English).
PASSAGE_CHARS = 1200
PASSAGE_OVERLAP_CHARS = 200
MAX_TITLE_CHARS = 300
# A plain text file's first line is its title when it is at most this long.
MAX_TEXT_TITLE_CHARS = 100
# Distinct words of the user's message searched on SQLite (FTS5 has no stop words).
MAX_QUERY_TERMS = 32
# At most this many characters of the message go to Kendra (which reads only about
# its first 30 words; AWS's Query documentation says it truncates there).
KENDRA_MAX_QUERY_CHARS = 1000
# KNOWLEDGE_MIN_SCORE's default per database: the two rankings have their own scales
# (chosen on the labelled questions of bench/knowledge_questions.json).
DEFAULT_MIN_SCORES = {"postgresql": 0.2, "sqlite": 0.5}
KENDRA_SCORES = {"VERY_HIGH": 1.0, "HIGH": 0.75, "MEDIUM": 0.5, "LOW": 0.25, "NOT_AVAILABLE": 0.0}
HIGH, LOW = "high", "low"

# Upload types: by the file's extension, else by the part's Content-Type.
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
              ".html": "html", ".htm": "html", ".pdf": "pdf"}
MIMETYPES = {"text/plain": "text", "text/markdown": "markdown", "text/x-markdown": "markdown",
             "text/html": "html", "application/pdf": "pdf"}
_STOP_WORDS = frozenset(
    "a an and are as at be but by can do does for from had has have how i if in is it its me my no not of on or our "
    "so than that the their them then there these they this to us was we were what when where which who why will "
    "with would you your".split()
)
_MARKDOWN_TITLE = re.compile(r"^#\s+(.+)$", re.MULTILINE)
# pypdf logs a warning for each object of a damaged PDF it repairs (thousands for one file): the
# document is refused or loaded all the same, so only its errors are worth a log line.
logging.getLogger("pypdf").setLevel(logging.ERROR)


class InvalidDocument(ApiError):
    error = "invalid_document"


class UnsupportedDocumentType(UnsupportedMediaType):
    """A knowledge upload of a type other than .txt, .md, .html or .pdf."""


class DuplicateDocument(Conflict):
    error = "duplicate_document"


class KnowledgeUnavailable(ApiError):
    status = 503
    error = "knowledge_unavailable"
    retry_after = 1


class KnowledgeMisconfigured(ApiError):
    """KNOWLEDGE_LANGUAGE names no text search configuration of the database (only PostgreSQL can tell)."""

    status = 503
    error = MISCONFIGURED


# PostgreSQL's SQLSTATE for an object that does not exist: here, a text search configuration.
_UNDEFINED_OBJECT = "42704"


@contextmanager
def _language_checked(language: str) -> Iterator[None]:
    """Turn the database's refusal of `language` into a clear 503 for the operator."""
    try:
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _UNDEFINED_OBJECT:
            raise
        raise KnowledgeMisconfigured(
            f"KNOWLEDGE_LANGUAGE={language!r} is not a text search configuration of this database "
            "(SELECT cfgname FROM pg_ts_config lists them); the server's settings must change"
        ) from None


# ---------------------------------------------------------------- documents


def split_passages(body: str, size: int = PASSAGE_CHARS, overlap: int = PASSAGE_OVERLAP_CHARS) -> list[str]:
    """The text, whitespace collapsed, in pieces of at most `size` characters cut at spaces,
    each starting about `overlap` characters before the previous one ended."""
    words = " ".join(body.split())
    passages: list[str] = []
    start = 0
    while start < len(words):
        end = min(start + size, len(words))
        if end < len(words):
            cut = words.rfind(" ", start + size // 2, end + 1)
            end = cut if cut > start else end
        passages.append(words[start:end].strip())
        if end >= len(words):
            break
        back = end - overlap
        space = words.find(" ", back, end)
        start = space + 1 if space != -1 and space + 1 < end else max(back, start + 1)
    return [p for p in passages if p]


@dataclass(frozen=True)
class Extracted:
    kind: str  # text, markdown, html or pdf
    text: str
    title: str | None  # found in the document: HTML <title>, PDF metadata, a Markdown "# " heading


def kind_of(filename: str | None, mimetype: str | None) -> str:
    """text, markdown, html or pdf, from the name's extension or else the declared type; 415 otherwise."""
    suffix = Path(filename or "").suffix.lower()
    kind = EXTENSIONS.get(suffix) or (None if suffix else MIMETYPES.get((mimetype or "").lower()))
    if kind is None:
        allowed = ", ".join(sorted(EXTENSIONS))
        raise UnsupportedDocumentType(f"{filename or 'the file'} is not a supported type; send one of {allowed} (text, Markdown, HTML, PDF)")
    return kind


def extract(kind: str, data: bytes) -> Extracted:
    """The document's text; 400 when the content is not what its type says, or has no text.

    Parsing a large PDF or HTML page takes seconds of CPU (about 9 s for a 7 MB PDF). On a gevent
    worker it runs on a native thread of gevent's pool, so that the worker's other requests
    (turns, streams, its heartbeat to gunicorn) share the CPU with it instead of waiting for it.
    """
    if "gevent" in sys.modules:
        from gevent import get_hub, monkey

        if monkey.is_module_patched("threading"):
            extracted, failure = get_hub().threadpool.apply(_extract_or_failure, (kind, data))
            if failure is not None:
                raise failure
            return extracted
    return _extract(kind, data)


def _extract_or_failure(kind: str, data: bytes) -> tuple[Extracted | None, Exception | None]:
    """`_extract` on gevent's pool: its failure is returned, to be raised in the request's greenlet
    (one raised in the pool would also be printed by gevent's hub, a raw traceback on stderr)."""
    try:
        return _extract(kind, data), None
    except Exception as exc:
        return None, exc


def _extract(kind: str, data: bytes) -> Extracted:
    if not data:
        raise InvalidDocument("the file is empty")
    if kind == "pdf":
        return _extract_pdf(data)
    if data.lstrip()[:5] == b"%PDF-":
        raise InvalidDocument(f"the content is a PDF, not {kind}; send it with a .pdf name")
    try:
        decoded = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidDocument(f"a {kind} document must be UTF-8 text") from None
    if "\x00" in decoded:
        raise InvalidDocument(f"a {kind} document must be text (it contains NUL bytes)")
    if kind == "html":
        soup = BeautifulSoup(decoded, "html.parser")
        title = soup.title.get_text(" ", strip=True) if soup.title else None
        for hidden in soup(["script", "style", "noscript", "template", "head"]):
            hidden.decompose()
        return Extracted(kind, soup.get_text(" ", strip=True), title or None)
    if kind == "markdown":
        heading = _MARKDOWN_TITLE.search(decoded)
        return Extracted(kind, decoded, heading.group(1).strip() if heading else None)
    first = decoded.strip().partition("\n")[0].strip()
    return Extracted(kind, decoded, first if 0 < len(first) <= MAX_TEXT_TITLE_CHARS else None)


def _extract_pdf(data: bytes) -> Extracted:
    if b"%PDF-" not in data[:1024]:
        raise InvalidDocument("the content is not a PDF (no %PDF- header)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InvalidDocument("the PDF is encrypted; send an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except InvalidDocument:
        raise
    except Exception as exc:  # pypdf raises many types on malformed files; all mean the same to the sender
        raise InvalidDocument(f"the PDF could not be read ({exc.__class__.__name__})") from None
    return Extracted("pdf", "\n".join(pages).replace("\x00", ""), str(title).strip() if title else None)


def add_document(
    session: Session, settings: Mapping[str, Any], title: str, body: str, kind: str,
    source_url: str | None = None, creator: Caller | None = None,
) -> KnowledgeDocument:
    """Store a document and its indexed passages; the caller commits. 400 without text, 409 if loaded already."""
    if settings["KNOWLEDGE_BACKEND"] != "database":
        raise Conflict("KNOWLEDGE_BACKEND is kendra: load documents through the Kendra index's data sources")
    passages = split_passages(body)
    if not passages:
        raise InvalidDocument("the document has no text")
    words = " ".join(body.split())
    digest = hashlib.sha256(words.encode()).hexdigest()
    existing = session.scalar(select(KnowledgeDocument.document_id).where(KnowledgeDocument.sha256 == digest))
    if existing is not None:
        raise DuplicateDocument(f"this text is loaded already, as document {existing}")
    document = KnowledgeDocument(
        document_id=uuid.uuid4(), title=title.strip()[:MAX_TITLE_CHARS] or "Untitled", source_url=source_url,
        content_type=kind, sha256=digest, char_count=len(words), passage_count=len(passages),
        created_by=creator.key_id if creator else None, created_at=utcnow(),
    )
    session.add(document)
    try:
        session.flush()
    except IntegrityError:  # the same text, loaded at the same moment by another request
        session.rollback()
        raise DuplicateDocument("this text is loaded already") from None
    rows = [{"document_id": document.document_id, "position": n, "text": p} for n, p in enumerate(passages)]
    if session.get_bind().dialect.name == "postgresql":
        with _language_checked(settings["KNOWLEDGE_LANGUAGE"]):
            session.execute(_PG_INSERT, [row | {"language": settings["KNOWLEDGE_LANGUAGE"]} for row in rows])
    else:  # the FTS5 table follows by trigger
        session.execute(insert(KnowledgePassage.__table__), rows)
    return document


_PG_INSERT = text(
    "INSERT INTO knowledge_passages (document_id, position, text, search_vector) "
    "VALUES (:document_id, :position, :text, to_tsvector(CAST(:language AS regconfig), :text))"
).bindparams(bindparam("document_id", type_=Uuid))


def document_from_request(incoming: Any) -> tuple[str, str, str, str | None]:
    """(title, text, kind, source_url) from a Flask request: a multipart upload or a JSON body; 400/415 otherwise."""
    if incoming.mimetype == "multipart/form-data":
        upload = incoming.files.get("file")
        if upload is None and "file" in incoming.form:
            raise InvalidDocument("the field `file` must be a file part, with a filename (curl: -F file=@path)")
        if upload is None:
            raise InvalidDocument("a multipart upload needs its document in the field `file`")
        form = _validated(KnowledgeUploadForm, incoming.form.to_dict())
        found = extract(kind_of(upload.filename, upload.mimetype), upload.read())
        title = form.title or found.title or Path(upload.filename or "document").stem
        return title, found.text, found.kind, form.source_url
    body = _validated(KnowledgeText, incoming.get_json())
    return body.title, body.text, "text", body.source_url


def _validated(model: type[BaseModel], data: Any) -> Any:
    """The model, or 400 `invalid_request` naming each bad field in `details` (without echoing the input)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(exc) from None


def list_documents(session: Session, limit: int, offset: int) -> tuple[list[KnowledgeDocument], int]:
    """Newest first, one page, with the total."""
    rows = session.scalars(
        select(KnowledgeDocument)
        .order_by(KnowledgeDocument.created_at.desc(), KnowledgeDocument.document_id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), session.scalar(select(func.count()).select_from(KnowledgeDocument))


def delete_document(session: Session, document_id: uuid.UUID) -> None:
    """Remove a document and its passages (and their index entries); 404 if there is none."""
    document = session.get(KnowledgeDocument, document_id)
    if document is None:
        raise NotFound(f"knowledge document {document_id} does not exist")
    # Explicitly, so that SQLite's FTS5 trigger sees each passage go.
    session.execute(KnowledgePassage.__table__.delete().where(KnowledgePassage.document_id == document_id))
    session.delete(document)


@dataclass
class LoadSummary:
    loaded: int = 0
    passages: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def load_folder(session: Session, settings: Mapping[str, Any], folder: Path, progress: bool | None = None) -> LoadSummary:
    """Load every supported file under `folder` (recursively), one commit per file.

    Files loaded already (same text) are counted as duplicates; files that
    fail are listed and the others still load.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    summary = LoadSummary()
    for path in tqdm(files, unit="doc", desc="knowledge-load", disable=None if progress is None else not progress):
        try:
            found = extract(kind_of(path.name, None), path.read_bytes())
            document = add_document(session, settings, found.title or path.stem, found.text, found.kind)
            session.commit()
        except DuplicateDocument:
            session.rollback()
            summary.duplicates += 1
            continue
        except (ApiError, OSError) as exc:
            session.rollback()
            summary.failed.append((str(path.relative_to(folder)), getattr(exc, "message", None) or str(exc)))
            continue
        summary.loaded += 1
        summary.passages += document.passage_count
    return summary


@click.command("knowledge-load")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@with_appcontext
def knowledge_load_command(folder: Path) -> None:
    """Load the text, Markdown, HTML and PDF files under FOLDER into the knowledge base."""
    summary = load_folder(get_session(), current_app.config, folder)
    for name, problem in summary.failed:
        click.echo(f"  failed: {name}: {problem}", err=True)
    click.echo(
        f"knowledge-load: {summary.loaded} document(s) loaded ({summary.passages} passages), "
        f"{summary.duplicates} already loaded, {len(summary.failed)} failed, from {folder}"
    )
    if summary.failed:
        raise click.exceptions.Exit(1)


# ---------------------------------------------------------------- search


@dataclass(frozen=True)
class Passage:
    passage_id: str
    document_id: str | None
    title: str
    source_url: str | None
    text: str
    score: float
    confidence: str | None = None  # Kendra's ScoreConfidence label


class Backend(Protocol):
    name: str

    def search(self, session: Session, query: str, k: int) -> list[Passage]: ...

    def threshold(self, settings: Mapping[str, Any]) -> float: ...


class DatabaseSearch:
    """The passages' full-text index in Parley's own database (PostgreSQL or SQLite)."""

    name = "database"

    def __init__(self, language: str) -> None:
        self.language = language

    def threshold(self, settings: Mapping[str, Any]) -> float:
        if settings["KNOWLEDGE_MIN_SCORE"] is not None:
            return settings["KNOWLEDGE_MIN_SCORE"]
        return DEFAULT_MIN_SCORES["sqlite" if settings["DATABASE_URL"].startswith("sqlite") else "postgresql"]

    def search(self, session: Session, query: str, k: int) -> list[Passage]:
        if session.get_bind().dialect.name == "postgresql":
            plan_for_these_values(session)  # as it was measured: a generic plan would guess the query's selectivity
            with _language_checked(self.language):
                rows = session.execute(POSTGRES_SEARCH, {"language": self.language, "query": query, "k": k}).all()
            scores = [row.score for row in rows]
        else:
            terms = query_terms(query)
            rows = session.execute(SQLITE_SEARCH, {"query": " OR ".join(terms), "k": k}).all() if terms else []
            scores = _shares_of_terms(session, terms, [row.passage_id for row in rows])
        return [
            Passage(str(row.passage_id), str(row.document_id), row.title, row.source_url, row.text, round(score, 4))
            for row, score in zip(rows, scores, strict=True)
        ]


# websearch_to_tsquery reads the message as a web search would (quotes, -, or);
# its AND-ed terms are OR-ed (and negations dropped), so passages that answer
# with some of the question's words are found, and ts_rank_cd ranks those with
# more of them, closer together, first. Only the top k rows are joined to
# their text and titles (sorting every match with its text cost a third more).
POSTGRES_SEARCH = text(
    """
    SELECT p.passage_id, p.document_id, d.title, d.source_url, p.text, top.score
    FROM (
        SELECT m.passage_id, ts_rank_cd(m.search_vector, q.query, 32) AS score
        FROM (SELECT CAST(translate(CAST(websearch_to_tsquery(CAST(:language AS regconfig), :query) AS text), '&!', '|')
                          AS tsquery) AS query) AS q
        JOIN knowledge_passages AS m ON m.search_vector @@ q.query
        ORDER BY score DESC, m.passage_id
        LIMIT :k
    ) AS top
    JOIN knowledge_passages AS p ON p.passage_id = top.passage_id
    JOIN knowledge_documents AS d ON d.document_id = p.document_id
    ORDER BY top.score DESC, top.passage_id
    """
).columns(document_id=Uuid)
SQLITE_SEARCH = text(
    """
    SELECT p.passage_id, p.document_id, d.title, d.source_url, p.text, bm25(knowledge_fts) AS score
    FROM knowledge_fts
    JOIN knowledge_passages AS p ON p.passage_id = knowledge_fts.rowid
    JOIN knowledge_documents AS d ON d.document_id = p.document_id
    WHERE knowledge_fts MATCH :query
    ORDER BY score, p.passage_id
    LIMIT :k
    """
).columns(document_id=Uuid)


SQLITE_TERM_HITS = text(
    "SELECT rowid FROM knowledge_fts WHERE knowledge_fts MATCH :term AND rowid IN :ids"
).bindparams(bindparam("ids", expanding=True))


def query_terms(message: str) -> list[str]:
    """The message's distinct words (stop words left out), each quoted: FTS5 terms that cannot fail."""
    terms = dict.fromkeys(w for w in re.findall(r"\w+", message.casefold()) if w not in _STOP_WORDS)
    return [f'"{term}"' for term in list(terms)[:MAX_QUERY_TERMS]]


def _shares_of_terms(session: Session, terms: list[str], passage_ids: list[int]) -> list[float]:
    """For each passage, the share of `terms` it contains (FTS5's stemmer decides what matches)."""
    if not passage_ids:
        return []
    hits = dict.fromkeys(passage_ids, 0)
    for term in terms:
        for passage_id in session.execute(SQLITE_TERM_HITS, {"term": term, "ids": passage_ids}).scalars():
            hits[passage_id] += 1
    return [hits[passage_id] / len(terms) for passage_id in passage_ids]


class KendraSearch:
    """AWS Kendra's Retrieve API: passages of the index's documents, each with a ScoreConfidence."""

    name = "kendra"

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.index_id = settings["KENDRA_INDEX_ID"]
        self.client = boto3.client(
            "kendra",
            region_name=settings["KENDRA_REGION"],
            endpoint_url=settings["KENDRA_ENDPOINT_URL"],
            config=BotoConfig(connect_timeout=3, read_timeout=10, retries={"total_max_attempts": 2, "mode": "standard"}),
        )

    def threshold(self, settings: Mapping[str, Any]) -> float:
        return KENDRA_SCORES[settings["KENDRA_MIN_CONFIDENCE"]]

    def search(self, session: Session, query: str, k: int) -> list[Passage]:
        try:
            answer = self.client.retrieve(IndexId=self.index_id, QueryText=query[:KENDRA_MAX_QUERY_CHARS], PageSize=k)
        except (BotoCoreError, ClientError) as exc:
            log.warning("kendra retrieve failed: %s", exc.__class__.__name__)
            raise KnowledgeUnavailable("the knowledge base (Kendra) is unavailable; retry later") from None
        passages = []
        for item in answer.get("ResultItems", [])[:k]:
            confidence = item.get("ScoreAttributes", {}).get("ScoreConfidence", "NOT_AVAILABLE")
            passages.append(Passage(
                passage_id=item.get("Id", ""),
                document_id=item.get("DocumentId"),
                title=item.get("DocumentTitle") or item.get("DocumentId") or "Untitled",
                source_url=item.get("DocumentURI"),
                text=item.get("Content", ""),
                score=KENDRA_SCORES.get(confidence, 0.0),
                confidence=confidence,
            ))
        return sorted(passages, key=lambda p: -p.score)


def make_backend(settings: Mapping[str, Any]) -> Backend:
    if settings["KNOWLEDGE_BACKEND"] == "kendra":
        return KendraSearch(settings)
    return DatabaseSearch(settings["KNOWLEDGE_LANGUAGE"])


# ---------------------------------------------------------------- the turn


@dataclass(frozen=True)
class Retrieval:
    """What one turn's search found, and what it does with it."""

    backend: str
    band: str  # high or low
    threshold: float
    policy: str | None  # the low-confidence policy applied; None when high
    passages: list[Passage]  # found, best first
    tokens: int = 0  # added to the system context

    @property
    def used(self) -> list[Passage]:
        return [p for p in self.passages if p.score >= self.threshold] if self.band == HIGH else []

    @property
    def action(self) -> str:
        """model (with or without passages), decline or handoff."""
        return self.policy if self.policy in ("decline", "handoff") else "model"

    def report(self) -> dict[str, Any]:
        used = {p.passage_id for p in self.used}
        return {
            "backend": self.backend,
            "band": self.band,
            "threshold": self.threshold,
            "policy": self.policy,
            "tokens": self.tokens,
            "passages": [
                {"passage_id": p.passage_id, "document_id": p.document_id, "title": p.title, "score": p.score,
                 "confidence": p.confidence, "used": p.passage_id in used}
                for p in self.passages
            ],
        }

    def citations(self) -> list[dict[str, Any]]:
        return [
            {"passage_id": p.passage_id, "document_id": p.document_id, "title": p.title, "source_url": p.source_url, "score": p.score}
            for p in self.used
        ]


def consult(session: Session, settings: Mapping[str, Any], backend: Backend, prepared: PreparedTurn, message: str) -> PreparedTurn:
    """Search for a knowledge-base conversation's turn; with high confidence, put the passages into its system context.

    Runs between the turn's two halves and ends its own read transaction, so
    no connection is held while the model works.
    """
    if not prepared.knowledge:
        return prepared
    try:
        found = backend.search(session, message, settings["KNOWLEDGE_TOP_K"])
    finally:
        session.rollback()
    threshold = backend.threshold(settings)
    high = bool(found) and found[0].score >= threshold
    retrieval = Retrieval(backend.name, HIGH if high else LOW, threshold,
                          None if high else settings["KNOWLEDGE_LOW_CONFIDENCE_POLICY"], found)
    if not high:
        return replace(prepared, retrieval=retrieval)
    block = passages_block(retrieval.used)
    tokens = estimate_tokens(block)
    system = f"{prepared.context.system}\n\n{block}" if prepared.context.system else block
    context = replace(prepared.context, system=system, token_count=prepared.context.token_count + tokens)
    return replace(prepared, context=context, retrieval=replace(retrieval, tokens=tokens))


def passages_block(passages: list[Passage]) -> str:
    """The passages as the system context shows them, numbered, with their titles."""
    parts = ["Knowledge base passages that may answer the user's message. Use them when they do, "
             "and name the title of each one you use; do not invent what they do not say."]
    for n, p in enumerate(passages, 1):
        source = f" ({p.source_url})" if p.source_url else ""
        parts.append(f"[{n}] {p.title}{source}\n{p.text}")
    return "\n\n".join(parts)


def decline_reply(settings: Mapping[str, Any]) -> ModelReply:
    """The fixed reply of the `decline` policy: stored like a model's, no model called."""
    return ModelReply(text=settings["KNOWLEDGE_DECLINE_REPLY"], model="none", input_tokens=0, output_tokens=0,
                      stop_reason="knowledge_decline")


def handoff_trigger(retrieval: Retrieval) -> Trigger:
    return Trigger("knowledge", f"no knowledge base passage reached the confidence threshold {retrieval.threshold}")


def get_backend() -> Backend:
    return current_app.extensions["parley.knowledge"]


def max_request_bytes(settings: Mapping[str, Any]) -> int:
    """Documents may be larger than MAX_CONTENT_LENGTH (a chat message's bound): KNOWLEDGE_MAX_BYTES."""
    return settings["KNOWLEDGE_MAX_BYTES"]


UPLOAD_ENDPOINT = "add_knowledge_document"


def init_app(app: Flask) -> None:
    """The search backend and the `knowledge-load` command."""
    app.extensions["parley.knowledge"] = make_backend(app.config)
    app.cli.add_command(knowledge_load_command)

