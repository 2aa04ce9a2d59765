"""Files in a conversation: upload, list, download, and sending them with a turn.

An upload is checked before anything is stored:
- size: at most MAX_FILE_BYTES (413), and not empty (422 `empty_file`);
- type, by its bytes: the signatures in `SIGNATURES` (PNG, JPEG, GIF, WebP,
  PDF), else UTF-8 text without NUL characters (plain text, or Markdown when
  the name ends in .md/.markdown or the part says text/markdown); anything
  else is 415 `unsupported_file_type`;
- the name's extension and the part's declared Content-Type, when they name
  a type, must agree with the bytes: 415 `file_type_mismatch` otherwise
  (a PNG called report.pdf, a PDF sent as image/png).

The bytes go to the archive store under `files/{conversation_id}/{file_id}`
(below ARCHIVE_URL's prefix) with their SHA-256 (S3 object metadata, and the
row); the row is written only after the object, and the object is removed
again if the row cannot be.

A /chat turn may name files of its conversation (`file_ids`). They are sent
with that turn's user message only, before its text: images and PDFs as
Claude `image` / `document` blocks (base64), text files inline as text
blocks. Later turns send the message's text alone; the stored message keeps
the file IDs (API, archive, export). Each file's `token_estimate` is taken
from the context budget of the turn that sends it.
"""
from __future__ import annotations

import base64
import dataclasses
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from auth import Caller
from context_cache import TailCache
from conversation_memory import MIN_TRUNCATED_TOKENS, USER, estimate_tokens
from conversations import PreparedTurn, prepare_turn, visible_conversation
from database_utils import Conversation, ConversationFile, Message, lock_conversation, record_audit, utcnow
from errors import ApiError, Conflict, NotFound, PayloadTooLarge
from s3_utils import Archive, ArchiveError, ArchiveUnavailable, ChecksumMismatch, parse_document, sha256_hex
from schemas import FileOut
from states import Role, Status

FILES_PREFIX = "files/"
# Room for the multipart framing around the file: the request body may be
# this much larger than MAX_FILE_BYTES.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_NAME_CHARS = 255

PNG, JPEG, GIF, WEBP, PDF = "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"
TEXT, MARKDOWN = "text/plain", "text/markdown"
IMAGES = frozenset({PNG, JPEG, GIF, WEBP})
ALLOWED_TYPES = (PNG, JPEG, GIF, WEBP, PDF, TEXT, MARKDOWN)
# Leading bytes of each binary type (WebP: "RIFF", 4 bytes of size, "WEBP").
SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    (PNG, b"\x89PNG\r\n\x1a\n", 0),
    (JPEG, b"\xff\xd8\xff", 0),
    (GIF, b"GIF87a", 0),
    (GIF, b"GIF89a", 0),
    (WEBP, b"RIFF", 0),  # and WEBP at 8, checked below
    (PDF, b"%PDF-", 0),
)
EXTENSIONS = {
    ".png": PNG, ".jpg": JPEG, ".jpeg": JPEG, ".gif": GIF, ".webp": WEBP, ".pdf": PDF,
    ".txt": TEXT, ".text": TEXT, ".md": MARKDOWN, ".markdown": MARKDOWN,
}
# Declared Content-Types that name one of the allowed types (aliases included).
DECLARED = {
    PNG: PNG, JPEG: JPEG, "image/jpg": JPEG, "image/pjpeg": JPEG, GIF: GIF, WEBP: WEBP, PDF: PDF,
    TEXT: TEXT, MARKDOWN: MARKDOWN, "text/x-markdown": MARKDOWN,
}
# Token estimates (documented in the README, "Files"):
# Anthropic's rule for images, width * height / 750, capped where Claude
# scales images down (about 1,600 tokens); unknown dimensions count the cap.
IMAGE_PIXELS_PER_TOKEN = 750
MAX_IMAGE_TOKENS = 1600
# Anthropic: each PDF page costs about 1,500-3,000 tokens (text plus the page image).
PDF_TOKENS_PER_PAGE = 2000


class UnsupportedFileType(ApiError):
    status = 415
    error = "unsupported_file_type"


class FileTypeMismatch(ApiError):
    status = 415
    error = "file_type_mismatch"


class EmptyFile(ApiError):
    status = 422
    error = "empty_file"


class UnknownFile(ApiError):
    status = 422
    error = "unknown_file"


class UnsupportedFileForProvider(ApiError):
    status = 422
    error = "unsupported_file_for_provider"


class NotAssigned(Conflict):
    error = "handoff_conflict"


@dataclass(frozen=True)
class Attachment:
    """A file going to the model with a turn."""

    file_id: uuid.UUID
    name: str
    content_type: str
    data: bytes
    token_estimate: int


def file_key(conversation_id: uuid.UUID, file_id: uuid.UUID) -> str:
    """The object's key below the archive root (both parts are UUIDs, so no request text reaches it)."""
    return f"{files_folder(conversation_id)}{uuid.UUID(str(file_id))}"


def files_folder(conversation_id: uuid.UUID) -> str:
    """The prefix of a conversation's file objects."""
    return f"{FILES_PREFIX}{uuid.UUID(str(conversation_id))}/"


def max_request_bytes(settings: Mapping[str, Any]) -> int:
    """The largest upload request body: one file of MAX_FILE_BYTES and its multipart framing."""
    return settings["MAX_FILE_BYTES"] + MULTIPART_OVERHEAD_BYTES


# ---------------------------------------------------------------- checking an upload


def sniff(data: bytes) -> str | None:
    """The allowed type the bytes are, or None. Text is UTF-8 without NUL characters."""
    for content_type, signature, offset in SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            if content_type == WEBP and data[8:12] != b"WEBP":
                continue
            return content_type
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return TEXT if "\x00" not in text else None


def check_upload(name: str, declared: str | None, data: bytes, max_bytes: int) -> str:
    """The file's type, found in its bytes and agreeing with its name and declared type; else the 4xx."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the file is larger than MAX_FILE_BYTES={max_bytes}")
    if not data:
        raise EmptyFile("the file is empty (0 bytes)")
    found = sniff(data)
    if found is None:
        raise UnsupportedFileType("the file's content is not PNG, JPEG, GIF, WebP, PDF, or UTF-8 text without NUL characters")
    by_name = EXTENSIONS.get(_extension(name))
    by_declared = DECLARED.get((declared or "").split(";")[0].strip().lower())
    if found == TEXT and MARKDOWN in (by_name, by_declared):
        found = MARKDOWN
    for claimed, source in ((by_name, f"its name {name!r}"), (by_declared, f"its declared type {declared}")):
        if claimed is not None and claimed != found and {claimed, found} != {TEXT, MARKDOWN}:
            raise FileTypeMismatch(f"the file's content is {found}, but {source} says {claimed}")
    if by_name is None and _extension(name):
        raise FileTypeMismatch(f"the file's content is {found}, but its name {name!r} has an extension not allowed for it")
    return found


def token_estimate(content_type: str, name: str, data: bytes) -> int:
    """What sending the file costs in the context budget (see the module constants)."""
    if content_type in IMAGES:
        size = image_size(content_type, data)
        if size is None:
            return MAX_IMAGE_TOKENS
        return min(-(-size[0] * size[1] // IMAGE_PIXELS_PER_TOKEN), MAX_IMAGE_TOKENS)
    if content_type == PDF:
        return pdf_pages(data) * PDF_TOKENS_PER_PAGE
    return estimate_tokens(_text_block(name, content_type, data)["text"])


def image_size(content_type: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, or None when it cannot be read."""
    try:
        if content_type == PNG and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if content_type == GIF:
            return struct.unpack("<HH", data[6:10])
        if content_type == WEBP:
            return _webp_size(data)
        if content_type == JPEG:
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments to the first start-of-frame marker."""
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    return None


def pdf_pages(data: bytes) -> int:
    """Pages counted from the PDF's page objects and page-tree counts (at least 1).

    Page objects packed in compressed object streams are not seen, so such a
    PDF counts as its largest visible /Count, or 1.
    """
    objects = len(re.findall(rb"/Type\s*/Page(?![A-Za-z])", data))
    counts = [int(n) for n in re.findall(rb"/Count\s+(\d{1,6})", data)]
    return max([objects, 1, *counts])


def _extension(name: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return f".{extension.lower()}" if dot and stem else ""


def _clean_name(raw: str | None) -> str:
    """The file's name without any folder part or control characters; `file` if nothing is left."""
    name = re.split(r"[/\\]", raw or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:MAX_NAME_CHARS]
    return name or "file"


# ---------------------------------------------------------------- the routes' work


def upload_file(
    session: Session, archive: Archive, settings: Mapping[str, Any], viewer: Caller, conversation_id: uuid.UUID,
    upload: FileStorage,
) -> ConversationFile:
    """Check and store one uploaded file: object first, then its row; the caller commits."""
    _uploadable(session, viewer, conversation_id)
    session.commit()  # no transaction held while the file is read and written
    max_bytes = settings["MAX_FILE_BYTES"]
    data = upload.stream.read(max_bytes + 1)
    name = _clean_name(upload.filename)
    content_type = check_upload(name, upload.mimetype, data, max_bytes)
    file_id = uuid.uuid4()
    key = file_key(conversation_id, file_id)
    checksum = archive.put(key, data, content_type)
    try:
        conversation = lock_conversation(session, conversation_id)
        if conversation is None or conversation.status != Status.ACTIVE:
            raise Conflict(f"conversation {conversation_id} ended while the file was being stored")
        if viewer.role == Role.STAFF and conversation.assigned_key_id != viewer.key_id:
            raise NotAssigned(f"conversation {conversation_id} was released while the file was being stored; claim it first")
        row = ConversationFile(
            file_id=file_id, conversation_id=conversation_id, name=name, content_type=content_type, size=len(data),
            sha256=checksum, location=key, token_estimate=token_estimate(content_type, name, data),
            uploaded_by=viewer.key_id, uploaded_at=utcnow(),
        )
        session.add(row)
        session.flush()
    except (ApiError, SQLAlchemyError):
        session.rollback()
        forget_object(archive, key)
        raise
    return row


def list_files(session: Session, viewer: Caller, conversation_id: uuid.UUID) -> list[ConversationFile]:
    """The conversation's files, oldest first; a staff read is audited."""
    visible_conversation(session, viewer, conversation_id)
    if viewer.role == Role.STAFF:
        record_audit(session, viewer, "list_files", conversation_id=conversation_id)
    return list(session.scalars(_files_of(conversation_id)))


def read_file(
    session: Session, archive: Archive, viewer: Caller, conversation_id: uuid.UUID, file_id: uuid.UUID
) -> tuple[ConversationFile, bytes]:
    """A file's row and bytes (checked against its SHA-256); a staff read is audited."""
    visible_conversation(session, viewer, conversation_id)
    row = session.get(ConversationFile, file_id)
    if row is None or row.conversation_id != conversation_id:
        raise _not_found(conversation_id, file_id)
    if viewer.role == Role.STAFF:
        record_audit(session, viewer, "read_file", conversation_id=conversation_id, detail={"file_id": str(file_id)})
    session.commit()
    return row, _bytes_of(archive, row)


def prepare_turn_with_files(
    session: Session, archive: Archive, settings: Mapping[str, Any], viewer: Caller, conversation_id: uuid.UUID,
    text: str, file_ids: Sequence[uuid.UUID], provider: str, tails: TailCache | None = None,
) -> PreparedTurn:
    """`conversations.prepare_turn`, with the named files' share of the budget and their blocks in the context.

    422 `unknown_file` (a file of another conversation, or none) and
    `unsupported_file_for_provider`, and 413 when the files leave no room,
    come before the lease is taken: nothing is stored.
    """
    attachments = load_for_turn(session, archive, settings, viewer, conversation_id, file_ids, provider)
    ids = [str(attachment.file_id) for attachment in attachments]
    tokens = sum(attachment.token_estimate for attachment in attachments)
    prepared = prepare_turn(session, settings, viewer, conversation_id, text, ids or None, tokens, tails)
    return attach(prepared, attachments)


def load_for_turn(
    session: Session, archive: Archive, settings: Mapping[str, Any], viewer: Caller, conversation_id: uuid.UUID,
    file_ids: Sequence[uuid.UUID], provider: str,
) -> list[Attachment]:
    """The files a turn names, in the order named (repeats dropped), with their bytes."""
    if not file_ids:
        return []
    wanted = list(dict.fromkeys(file_ids))
    conversation = visible_conversation(session, viewer, conversation_id)
    system_tokens = estimate_tokens(conversation.system_prompt) if conversation.system_prompt else 0
    rows = {row.file_id: row for row in session.scalars(_files_of(conversation_id).where(ConversationFile.file_id.in_(wanted)))}
    session.commit()
    missing = [str(file_id) for file_id in wanted if file_id not in rows]
    if missing:
        raise UnknownFile(f"conversation {conversation_id} has no file {', '.join(missing)}")
    chosen = [rows[file_id] for file_id in wanted]
    if provider == "openai":
        refused = [row.name for row in chosen if row.content_type == PDF]
        if refused:
            raise UnsupportedFileForProvider(
                f"the openai provider takes images and text files, not PDF documents: {', '.join(refused)}"
            )
    tokens, budget = sum(row.token_estimate for row in chosen), settings["CONTEXT_MAX_TOKENS"]
    if system_tokens + tokens + MIN_TRUNCATED_TOKENS > budget:
        raise PayloadTooLarge(
            f"the files are about {tokens} tokens; with the system prompt and a message they must fit CONTEXT_MAX_TOKENS={budget}"
        )
    return [Attachment(row.file_id, row.name, row.content_type, _bytes_of(archive, row), row.token_estimate) for row in chosen]


def attach(prepared: PreparedTurn, attachments: Sequence[Attachment]) -> PreparedTurn:
    """The turn with its files as content blocks before the text of its (last) user message."""
    if not attachments:
        return prepared
    context = prepared.context
    messages = list(context.messages)
    last = messages[-1]
    if last["role"] != USER:
        raise AssertionError("a turn's context ends with its user message")
    blocks = [content_block(attachment) for attachment in attachments]
    messages[-1] = {"role": USER, "content": [*blocks, {"type": "text", "text": last["content"]}]}
    tokens = sum(attachment.token_estimate for attachment in attachments)
    context = dataclasses.replace(context, messages=messages, token_count=context.token_count + tokens)
    return dataclasses.replace(prepared, context=context)


def content_block(attachment: Attachment) -> dict[str, Any]:
    """A file as a Messages API content block; providers that differ convert it (llm.py)."""
    if attachment.content_type in IMAGES or attachment.content_type == PDF:
        kind = "image" if attachment.content_type in IMAGES else "document"
        data = base64.b64encode(attachment.data).decode("ascii")
        return {"type": kind, "source": {"type": "base64", "media_type": attachment.content_type, "data": data}}
    return _text_block(attachment.name, attachment.content_type, attachment.data)


def delete_files(session: Session, archive: Archive, conversation_ids: Sequence[uuid.UUID]) -> int:
    """Remove the conversations' file objects, then their rows; the caller commits. Returns the objects' count.

    Every object below each conversation's `files/{conversation_id}/` goes,
    not only those with a row: an upload the store answered too late (a
    timeout, then the object landed) has none, and its delete may have failed.
    """
    rows = session.execute(
        select(ConversationFile.file_id, ConversationFile.location).where(ConversationFile.conversation_id.in_(conversation_ids))
    ).all()
    keys = {row.location for row in rows}
    for conversation_id in conversation_ids:
        keys.update(item.key for item in archive.list(files_folder(conversation_id)))
    for key in sorted(keys):
        archive.delete(key)
    if rows:
        session.execute(ConversationFile.__table__.delete().where(ConversationFile.conversation_id.in_(conversation_ids)))
    return len(keys)


def restored_file_rows(conversation_id: uuid.UUID, listed: Sequence[Mapping[str, Any]]) -> list[ConversationFile]:
    """The rows of a conversation's files from its archive document's `files`, for `reconcile`
    restoring a conversation whose row was lost; without the uploading key, which may be gone."""
    rows = []
    for entry in listed:
        try:
            described = FileOut.model_validate(entry)
        except ValidationError:  # not an entry Parley wrote: its object is judged on its own
            continue
        if described.conversation_id != conversation_id:
            continue
        rows.append(ConversationFile(**described.model_dump(exclude={"uploaded_by"}), uploaded_by=None))
    return rows


def repair_file_objects_without_rows(session: Session, archive: Archive, listed: Sequence[Any]) -> tuple[int, int]:
    """Give these objects below `files/` that have no row their row back, or delete them: (rows restored, deleted)."""
    # Such an object is left by an upload whose store failed or came too late and whose own delete
    # failed too, or by a row lost (a restore from an older backup). Its row comes back from the
    # conversation's archive document when that lists it. It is deleted when its conversation is
    # gone or no longer active and nothing names it; it is kept while the conversation is active (an
    # upload may be under way: the object is written before its row), while the document cannot be
    # read, and while a live message names it.
    owners = {item.key: owner for item in listed if (owner := _owner_of(item.key)) is not None}
    conversations = {
        row.conversation_id: row
        for row in session.execute(
            select(Conversation.conversation_id, Conversation.status, Conversation.s3_file_location, Conversation.archive_sha256)
            .where(Conversation.conversation_id.in_(list({conversation_id for conversation_id, _ in owners.values()})))
        )
    }
    with_rows = set(session.scalars(
        select(ConversationFile.file_id).where(ConversationFile.file_id.in_([file_id for _, file_id in owners.values()]))
    ))
    session.commit()
    restored = deleted = 0
    documented: dict[uuid.UUID, dict[str, Any] | None] = {}  # conversation_id -> its document's files by file_id
    for key, (conversation_id, file_id) in owners.items():
        conversation = conversations.get(conversation_id)
        if file_id in with_rows or (conversation is not None and conversation.status == Status.ACTIVE):
            continue
        if conversation is not None:
            if conversation_id not in documented:
                documented[conversation_id] = _documented_files(archive, conversation.s3_file_location, conversation.archive_sha256)
            listing = documented[conversation_id]
            if listing is None:
                continue
            if str(file_id) in listing:
                restored += _restore_file_row(session, conversation_id, listing[str(file_id)])
                continue
            if _named_by_a_message(session, conversation_id, file_id):
                continue
        archive.delete(key)
        deleted += 1
    return restored, deleted


def _owner_of(key: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(conversation_id, file_id) of a key `files/{conversation_id}/{file_id}`, or None for any other key."""
    parts = key.removeprefix(FILES_PREFIX).split("/")
    if len(parts) != 2:
        return None
    try:
        return uuid.UUID(parts[0]), uuid.UUID(parts[1])
    except ValueError:
        return None


def _documented_files(archive: Archive, key: str | None, sha256: str | None) -> dict[str, dict[str, Any]] | None:
    """The files a conversation's archive document lists, by file_id: an empty listing when it has
    no document yet (ending); None when the document cannot be read now."""
    if key is None:
        return {}
    try:
        document = parse_document(archive.get(key, sha256), key)
    except ArchiveUnavailable:
        raise
    except ArchiveError:  # missing or damaged: reconcile rewrites it, and a later run judges its files
        return None
    return {str(entry.get("file_id")): entry for entry in document.get("files") or [] if isinstance(entry, dict)}


def _named_by_a_message(session: Session, conversation_id: uuid.UUID, file_id: uuid.UUID) -> bool:
    """Whether a live message of the conversation was sent with this file."""
    named = session.scalars(select(Message.file_ids).where(Message.conversation_id == conversation_id)).all()
    session.commit()
    return any(str(file_id) in (file_ids or ()) for file_ids in named)


def _restore_file_row(session: Session, conversation_id: uuid.UUID, entry: dict[str, Any]) -> int:
    """The file's row from its document entry; 1 if restored, 0 if the entry is not one Parley wrote
    or the row could not be inserted (another reconcile restored it, or the conversation went)."""
    rows = restored_file_rows(conversation_id, [entry])
    if not rows:
        return 0
    try:
        session.add_all(rows)
        session.commit()
    except IntegrityError:
        session.rollback()
        return 0
    return 1


def files_by_conversation(session: Session, conversation_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The conversations' files as the archive document lists them."""
    found: dict[uuid.UUID, list[dict[str, Any]]] = {conversation_id: [] for conversation_id in conversation_ids}
    query = (
        select(ConversationFile)
        .where(ConversationFile.conversation_id.in_(conversation_ids))
        .order_by(ConversationFile.uploaded_at, ConversationFile.file_id)
    )
    for row in session.scalars(query):
        found[row.conversation_id].append(FileOut.of(row).model_dump(mode="json"))
    return found


def _text_block(name: str, content_type: str, data: bytes) -> dict[str, Any]:
    return {"type": "text", "text": f"[file {name} ({content_type})]\n{data.decode('utf-8')}"}


def _uploadable(session: Session, viewer: Caller, conversation_id: uuid.UUID) -> None:
    """The owner, or the staff key assigned to it, may add files to an active conversation."""
    conversation = visible_conversation(session, viewer, conversation_id)
    if viewer.role == Role.STAFF and conversation.assigned_key_id != viewer.key_id:
        session.rollback()
        raise NotAssigned(f"conversation {conversation_id} is not assigned to this staff key; claim it first")
    if conversation.status != Status.ACTIVE:
        session.rollback()
        raise Conflict(f"conversation {conversation_id} is {conversation.status}; files go into active conversations")


def _files_of(conversation_id: uuid.UUID):
    return (
        select(ConversationFile)
        .where(ConversationFile.conversation_id == conversation_id)
        .order_by(ConversationFile.uploaded_at, ConversationFile.file_id)
    )


def _bytes_of(archive: Archive, row: ConversationFile) -> bytes:
    data = archive.get(row.location)
    if sha256_hex(data) != row.sha256:
        raise ChecksumMismatch(f"{row.location} does not match the checksum recorded for it")
    return data


def forget_object(archive: Archive, key: str) -> None:
    """Delete an uploaded file's object whose row could not be stored."""
    try:
        archive.delete(key)
    except ArchiveError:
        pass  # an orphan object without a row; never listed or served


def _not_found(conversation_id: uuid.UUID, file_id: uuid.UUID) -> ApiError:
    return NotFound(f"conversation {conversation_id} has no file {file_id}")
