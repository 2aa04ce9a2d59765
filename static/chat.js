// Parley's chat page: the same JSON API as every other client, replies streamed as server-sent events.
// Everything that came from a person or a model is put on the page with textContent, never as HTML.
"use strict";

const KEY = "parley.key";
const CONVERSATION = "parley.conversation";
const USER_ID = "chat-page";
const POLL_MS = 3000; // while a person from support has the conversation
// While the assistant has it, less often: a handoff that staff or the client's app started, and
// what support writes then, show without a reload.
const IDLE_POLL_MS = 10000;
// A restore that fails with these forgets the conversation (gone, not one, or the key refused);
// any other failure (rate limit, network, server) keeps it, and the page reads it again later.
const FORGETS_CONVERSATION = new Set([400, 401, 403, 404, 422]);
// After a broken stream, how often the page reads what the server kept: 1, 2, ... 8 s apart, 36 s
// in all. The server stores a reply cut short once it notices the reader left, which may take
// its second write after the break: with a model that sends nothing, its second heartbeat, twice
// STREAM_HEARTBEAT_SECONDS (15 s by default) on. Raise this with that setting.
const RECOVERY_READS = 9;
// A streamed reply after which nothing has arrived for this long (no words, and none of the
// heartbeats the server sends every STREAM_HEARTBEAT_SECONDS, 15 s by default) has stalled: the
// page stops waiting, as if Stop were pressed. The server itself ends a model call that sends
// nothing for LLM_TIMEOUT_SECONDS with an error event, so only a stuck connection gets here.
// A test may set window.PARLEY_STALL_MS before the page loads.
const STALL_MS = Number(window.PARLEY_STALL_MS) || 60000;
// Why a reply ended before its last event, as the page says it: then it reads what Parley kept.
const CUT_SHORT = {
  lost: { lead: "The connection was lost during the reply", mark: "connection lost: the reply may have been kept" },
  stopped: { lead: "You stopped the reply", mark: "stopped: the reply may have been kept" },
  stalled: {
    lead: `The reply stalled: nothing came for ${STALL_MS / 1000} s, so the page stopped waiting`,
    mark: "stalled: the reply may have been kept",
  },
};
const LABELS = { user: "You", staff: "Support" };
const HANDOFF_NOTICES = {
  needs_human: "A person from support will answer here.",
  human: "A person from support is answering.",
  bot: "Support handed the conversation back to the assistant.",
};

// The open conversation's log as the page shows it, so that polling adds each message once.
// Each message element carries its seq (data-seq) once it is known, so that a message read later
// is put in its place in the log rather than at the end.
const log = { conversationId: null, lastSeq: 0, shown: new Set(), handoff: "bot", timer: null, run: 0, polling: false };
// The reply streaming now ({ controller, why }), which Stop aborts.
let streamingReply = null;
// Reads pending after replies cut short (see recover); ending or leaving the conversation drops them.
const recoveries = new Set();
// The key's rate limit (429 with Retry-After): the page reads nothing in the background before then.
let rateLimitedUntil = 0;
// What the error box shows: "rate_limited" and "key_unchecked" are cleared by the next request
// that succeeds, "recovering" when the reads after a reply cut short are dropped.
let errorKind = null;

const $ = (id) => document.getElementById(id);

function showError(text, kind = null) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
  errorKind = text ? kind : null;
}

// A request succeeded: a rate-limit error, or a key not checked, shown earlier no longer holds
// (other errors stay).
function succeeded() {
  if (errorKind === "rate_limited" || errorKind === "key_unchecked") showError("");
}

function noteRateLimit(failure) {
  const seconds = Number(failure.retryAfter) || 10;
  rateLimitedUntil = Math.max(rateLimitedUntil, Date.now() + seconds * 1000);
}

function showFailure(failure, more = "") {
  if (!(failure instanceof ApiFailure)) return showError("Could not reach Parley: " + failure.message + more);
  if (failure.status !== 429) return showError(explain(failure) + more);
  noteRateLimit(failure);
  showError(explain(failure) + more, "rate_limited");
}

class ApiFailure extends Error {
  constructor(status, body, retryAfter) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.error = body.error || "error";
    this.retryAfter = retryAfter;
  }
}

function explain(failure) {
  if (failure.status === 401) return "That API key was not accepted. Paste a valid client key.";
  if (failure.status === 403) return "This key may not chat: use a client key.";
  if (failure.status === 429) {
    const wait = failure.retryAfter ? ` Try again in ${failure.retryAfter} s.` : " Try again shortly.";
    return "Rate limited: too many requests with this key." + wait;
  }
  if (failure.error === "model_unavailable") return "The model is unavailable right now (" + failure.message + "). Try again shortly.";
  if (failure.error === "model_timeout") return "The model took too long to answer. Try again.";
  if (failure.error === "model_error") return "The model failed: " + failure.message;
  if (failure.error === "turn_in_progress") return "A reply is still being written. Wait for it, then send again.";
  return failure.message;
}

async function call(method, path, body, key = sessionStorage.getItem(KEY)) {
  const options = { method, headers: { Authorization: `Bearer ${key}`, Accept: "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiFailure(response.status, data, response.headers.get("Retry-After"));
  succeeded();
  return data;
}

// The first element on the page stored after `seq` (null: none, or seq unknown).
function storedAfter(seq) {
  if (seq === null || seq === undefined) return null;
  for (const item of $("messages").querySelectorAll(":scope > [data-seq]")) {
    if (Number(item.dataset.seq) > seq) return item;
  }
  return null;
}

// Puts an element before the first message stored after `seq`, or at the end.
function place(item, seq) {
  const list = $("messages");
  list.insertBefore(item, storedAfter(seq));
  list.lastElementChild.scrollIntoView({ block: "end" });
}

function setSeq(item, seq) {
  if (seq !== null && seq !== undefined) item.dataset.seq = String(seq);
}

function addMessage(role, text, seq = null) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  setSeq(item, seq);
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = LABELS[role] || role;
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  place(item, seq);
  return item;
}

function addMeta(item, text, trimmed) {
  const meta = document.createElement("span");
  meta.className = trimmed ? "meta trimmed" : "meta";
  meta.textContent = text;
  item.append(meta);
}

// A notice goes at the end, or before the first message stored after `beforeSeq`.
function addNotice(text, beforeSeq = null) {
  const item = document.createElement("li");
  item.className = "notice";
  item.textContent = text;
  place(item, beforeSeq);
}

function showStored(message) {
  log.lastSeq = Math.max(log.lastSeq, message.seq);
  if (log.shown.has(message.seq)) return;
  log.shown.add(message.seq);
  const item = addMessage(message.role, message.content, message.seq);
  if (message.incomplete) addMeta(item, "incomplete: the reader left before the end", false);
}

function noteHandoff(state, beforeSeq = null) {
  if (state === log.handoff) return;
  log.handoff = state;
  if (HANDOFF_NOTICES[state]) addNotice(HANDOFF_NOTICES[state], beforeSeq);
}

function resetLog(conversationId) {
  stopWatching();
  cancelRecoveries();
  stopReply("left");
  Object.assign(log, { conversationId, lastSeq: 0, shown: new Set(), handoff: "bot" });
}

// Read the newer messages every few seconds while support has the conversation (every
// IDLE_POLL_MS while the assistant has it), one request at a time, never before the key's rate
// limit allows it again.
function watch(delay = POLL_MS) {
  if (log.timer !== null) return;
  const wait = log.handoff === "bot" ? Math.max(delay, IDLE_POLL_MS) : delay;
  log.timer = setTimeout(poll, Math.max(wait, rateLimitedUntil - Date.now()));
}

function stopWatching() {
  clearTimeout(log.timer);
  log.timer = null;
  log.run += 1; // a read still in flight is dropped when it comes back
}

async function poll() {
  log.timer = null;
  // A hidden tab spends none of the key's rate limit on reads while the model has the conversation.
  if (log.polling || (document.hidden && log.handoff === "bot")) return watch();
  const run = log.run;
  let delay = POLL_MS;
  log.polling = true;
  try {
    const id = encodeURIComponent(log.conversationId);
    const conversation = await call("GET", `/get_conversation?conversation_id=${id}&after_seq=${log.lastSeq}`);
    if (run !== log.run) return;
    // Support takes over before it writes, and hands back after it has written: the notice of a
    // take-over goes before the first message not shown yet (wherever its seq puts it).
    const first = conversation.messages.find((message) => !log.shown.has(message.seq));
    if (conversation.handoff !== "bot") noteHandoff(conversation.handoff, first ? first.seq : null);
    conversation.messages.forEach(showStored);
    if (conversation.status !== "active") return showConversation(conversation);
    noteHandoff(conversation.handoff);
  } catch (failure) {
    if (run !== log.run) return;
    if (!(failure instanceof ApiFailure) || failure.status >= 500) delay = POLL_MS * 3; // network or server trouble: try again later
    else if (failure.status === 429) noteRateLimit(failure); // quietly: watch() waits for Retry-After
    else return showError(explain(failure));
  } finally {
    log.polling = false;
  }
  if (run === log.run) watch(delay);
}

function describeTurn(done) {
  const context = done.context;
  const trimmed = context.messages_dropped > 0 || context.truncated;
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  let text = `${done.model} · ${plural(context.messages_sent, "message")} sent`;
  if (context.messages_dropped > 0) text += `, ${context.messages_dropped} earlier dropped to fit the context`;
  if (context.truncated) text += ", your message was cut to fit";
  if (done.incomplete) text += " · incomplete";
  return [text, trimmed];
}

// Reads a text/event-stream body, calling onEvent(name, data) for each event and onBytes() for
// anything that arrives (heartbeats too).
async function readEvents(response, onEvent, onBytes) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onBytes();
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // heartbeat
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// The stream of a turn broke after it began, or was stopped: the server may have stored the
// message and the reply (cut short: incomplete). Read what it holds after `before` (the last seq
// shown before the turn) and show that instead of the page's copy; try again a few times, as the
// server notices a reader that left only when it next writes. `lead` says why (CUT_SHORT).
async function recover(conversationId, text, before, sent, item, lead, recovery = { timer: null }, attempt = 1) {
  recoveries.add(recovery);
  if (log.conversationId !== conversationId) return recoveries.delete(recovery);
  try {
    const id = encodeURIComponent(conversationId);
    const conversation = await call("GET", `/get_conversation?conversation_id=${id}&after_seq=${before}`);
    if (!recoveries.has(recovery)) return; // the conversation was ended or left meanwhile
    if (conversation.messages.some((message) => message.role === "user" && message.content === text)) {
      recoveries.delete(recovery);
      sent.remove();
      item.remove();
      conversation.messages.forEach(showStored);
      noteHandoff(conversation.handoff);
      showError(`${lead}; Parley kept what is shown.`);
      return watch();
    }
  } catch (failure) {
    if (!recoveries.has(recovery)) return;
    if (failure instanceof ApiFailure && failure.status === 429) noteRateLimit(failure);
  }
  if (attempt >= RECOVERY_READS) {
    recoveries.delete(recovery);
    return showError(`${lead}. Reload the page later to see whether Parley kept it.`);
  }
  recovery.timer = setTimeout(() => recover(conversationId, text, before, sent, item, lead, recovery, attempt + 1),
    Math.max(attempt * 1000, rateLimitedUntil - Date.now()));
}

function cancelRecoveries() {
  for (const recovery of recoveries) clearTimeout(recovery.timer);
  recoveries.clear();
  if (errorKind === "recovering") showError(""); // it would say the page is still reading
}

// Aborts the reply streaming now, if any: `why` is "stopped" (the Stop button), "stalled" (nothing
// came for STALL_MS) or "left" (the conversation was left: nothing more of it is shown).
function stopReply(why) {
  if (!streamingReply || streamingReply.why) return;
  streamingReply.why = why;
  streamingReply.controller.abort();
}

// Stop takes Send's place while a reply streams.
function showStreaming(on) {
  if (!on && document.activeElement === $("stop")) $("message").focus(); // not lost with the button
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("stop").disabled = !on;
}

async function send(text) {
  const conversationId = sessionStorage.getItem(CONVERSATION);
  const before = log.lastSeq;
  stopWatching(); // a read racing this message could show it twice
  const sent = addMessage("user", text);
  const item = addMessage("assistant", "");
  item.classList.add("streaming");
  const body = item.querySelector(".text");
  $("send").disabled = true;
  const stream = { controller: new AbortController(), why: null };
  streamingReply = stream;
  showStreaming(true);
  let stall = null;
  const waiting = () => {
    clearTimeout(stall);
    stall = setTimeout(() => streamingReply === stream && stopReply("stalled"), STALL_MS);
  };
  waiting();
  let streaming = false;
  try {
    const response = await fetch("/chat", {
      method: "POST",
      headers: {
        Authorization: `Bearer ${sessionStorage.getItem(KEY)}`,
        "Content-Type": "application/json",
        Accept: "text/event-stream",
      },
      body: JSON.stringify({ conversation_id: conversationId, message: text, stream: true }),
      signal: stream.controller.signal,
    });
    waiting();
    if (!response.ok || response.status === 202) {
      const data = await response.json().catch(() => ({}));
      if (response.status === 202 && data.handoff) {
        // Stored for a person from support: no reply from the model now.
        item.remove();
        log.shown.add(data.seq);
        setSeq(sent, data.seq);
        addMeta(sent, "sent to support", false);
        // This message may have asked for a person; any other change came before it was stored.
        const askedNow = log.handoff === "bot" && data.handoff === "needs_human";
        noteHandoff(data.handoff, askedNow ? null : data.seq - 1);
        showError("");
        return;
      }
      throw new ApiFailure(response.status, data, response.headers.get("Retry-After"));
    }
    let finished = false;
    streaming = true;
    await readEvents(response, (name, data) => {
      if (name === "delta") {
        body.textContent += data.text;
        item.scrollIntoView({ block: "end" });
      } else if (name === "done") {
        finished = true;
        body.textContent = data.reply;
        addMeta(item, ...describeTurn(data));
        log.shown.add(data.seq - 1).add(data.seq); // the turn stores the message and its reply together
        setSeq(sent, data.seq - 1);
        setSeq(item, data.seq);
        if (log.handoff === "bot") log.lastSeq = Math.max(log.lastSeq, data.seq);
      } else if (name === "handoff") {
        // The model handed the conversation to support: its words before that (if any) are stored.
        finished = true;
        if (body.textContent.replace(/\0/g, "").trim()) { // as the server stores it
          setSeq(sent, data.seq - 1);
          setSeq(item, data.seq);
          log.shown.add(data.seq - 1).add(data.seq);
        } else {
          item.remove();
          setSeq(sent, data.seq);
          log.shown.add(data.seq);
        }
        noteHandoff(data.handoff);
      } else if (name === "error") {
        finished = true;
        throw new ApiFailure(502, data, null);
      }
    }, waiting);
    if (!finished) throw new ApiFailure(0, { message: "The connection closed before the reply was complete." }, null);
    showError("");
  } catch (failure) {
    if (stream.why === "left") return; // the conversation is no longer shown
    // An error event is the server's own answer; anything else after the stream began is a broken
    // connection. A reply stopped (by Stop, or stalled) may have reached the server even before
    // its stream began.
    const broken = streaming && !(failure instanceof ApiFailure && failure.status !== 0);
    if (stream.why || broken) {
      const { lead, mark } = CUT_SHORT[stream.why || "lost"];
      const marked = body.textContent ? item : sent;
      if (marked === sent) item.remove();
      marked.classList.add("failed");
      addMeta(marked, mark, false);
      showError(`${lead}. Parley may have kept it: reading the conversation again…`, "recovering");
      recover(conversationId, text, before, sent, item, lead);
      return;
    }
    if (body.textContent) {
      // Part of a reply came before the failure: it stays on the page, marked.
      item.classList.add("failed");
      addMeta(item, "not stored", false);
    } else {
      // Nothing came back: no empty reply, the message itself is marked.
      item.remove();
      sent.classList.add("failed");
      addMeta(sent, "not sent (not stored)", false);
      if (!$("message").value) $("message").value = text; // not stored: kept to send again
    }
    showFailure(failure);
  } finally {
    clearTimeout(stall);
    if (streamingReply === stream) {
      streamingReply = null;
      showStreaming(false);
    }
    item.classList.remove("streaming");
    $("send").disabled = $("message").disabled; // still off when the conversation was ended meanwhile
    if (log.conversationId === conversationId) watch();
  }
}

function showConversation(conversation) {
  $("chat-title").textContent = conversation.conversation_name || "Conversation";
  $("chat-status").textContent = conversation.status;
  const ended = conversation.status !== "active";
  $("message").disabled = ended;
  $("send").disabled = ended;
  $("end-chat").disabled = ended;
  $("new-panel").hidden = true;
  $("chat-panel").hidden = false;
}

async function openConversation(conversationId) {
  const conversation = await call("GET", `/get_conversation?conversation_id=${encodeURIComponent(conversationId)}`);
  resetLog(conversationId);
  $("messages").replaceChildren();
  conversation.messages.forEach(showStored);
  showConversation(conversation);
  if (conversation.status === "active") {
    noteHandoff(conversation.handoff);
    watch();
  }
}

function showStart() {
  const hasKey = Boolean(sessionStorage.getItem(KEY));
  $("key-form").hidden = hasKey;
  $("key-status").hidden = !hasKey;
  $("new-panel").hidden = !hasKey || Boolean(sessionStorage.getItem(CONVERSATION));
  if (!hasKey) $("chat-panel").hidden = true;
}

async function restore() {
  showStart();
  const conversationId = sessionStorage.getItem(CONVERSATION);
  if (!sessionStorage.getItem(KEY) || !conversationId) return;
  try {
    await openConversation(conversationId);
    $("message").focus();
  } catch (failure) {
    resetLog(null);
    if (failure instanceof ApiFailure && FORGETS_CONVERSATION.has(failure.status)) {
      sessionStorage.removeItem(CONVERSATION);
      showStart();
      return showFailure(failure);
    }
    showFailure(failure, " The conversation is kept: the page reads it again shortly.");
    const rateLimited = failure instanceof ApiFailure && failure.status === 429;
    log.timer = setTimeout(restore, rateLimited ? rateLimitedUntil - Date.now() : POLL_MS * 3);
  }
}

// A pasted key is asked about (GET /keys/me) before the tab keeps it: a key Parley refuses, or one
// that is not a client key, is not kept. When Parley cannot answer (unreachable, a server error, the
// rate limit) the key is kept all the same, so that an outage locks no one out; its first request
// then says whether it is refused.
async function useKey(key) {
  let checked = true;
  try {
    const me = await call("GET", "/keys/me", undefined, key);
    if (me.role !== "client") return refuseKey(`This is ${me.role === "admin" ? "an" : "a"} ${me.role} key; this page needs a client key.`);
  } catch (failure) {
    if (failure instanceof ApiFailure && (failure.status === 401 || failure.status === 403)) return refuseKey(explain(failure));
    checked = false;
    const why = failure instanceof ApiFailure ? explain(failure) : `Parley could not be reached (${failure.message}).`;
    if (failure instanceof ApiFailure && failure.status === 429) noteRateLimit(failure);
    showError("The key is kept, but it could not be checked now: " + why, "key_unchecked");
  }
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  if (checked) showError("");
  restore();
  $("conversation-name").focus();
}

function refuseKey(text) {
  showError(text);
  $("api-key").select();
  $("api-key").focus();
}

function wire() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("key-form").querySelector("button");
    if (button.disabled) return;
    button.disabled = true; // one check at a time
    try {
      await useKey($("api-key").value.trim());
    } finally {
      button.disabled = false;
    }
  });
  $("forget-key").addEventListener("click", () => {
    resetLog(null);
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(CONVERSATION);
    showStart();
    $("api-key").focus();
  });
  $("new-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { user_id: USER_ID };
    const name = $("conversation-name").value.trim();
    const system = $("system-prompt").value.trim();
    if (name) body.conversation_name = name;
    if (system) body.system_prompt = system;
    try {
      const conversation = await call("POST", "/new_chat", body);
      sessionStorage.setItem(CONVERSATION, conversation.conversation_id);
      resetLog(conversation.conversation_id);
      $("messages").replaceChildren();
      showConversation(conversation);
      showError("");
      $("message").focus();
      watch();
    } catch (failure) {
      showFailure(failure);
    }
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("send-form").requestSubmit();
    }
  });
  $("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value;
    if (!text.trim() || $("send").disabled) return;
    $("message").value = "";
    send(text);
  });
  $("end-chat").addEventListener("click", async () => {
    try {
      const conversation = await call("POST", "/end_chat", { conversation_id: sessionStorage.getItem(CONVERSATION) });
      stopWatching();
      cancelRecoveries();
      showConversation(conversation);
      showError("");
    } catch (failure) {
      showFailure(failure);
    }
  });
  $("stop").addEventListener("click", () => stopReply("stopped"));
  $("leave-chat").addEventListener("click", () => {
    resetLog(null);
    sessionStorage.removeItem(CONVERSATION);
    $("chat-panel").hidden = true;
    showStart();
    $("conversation-name").focus();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  restore();
});
