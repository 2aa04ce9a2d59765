// Parley staff console: the needs_human queue, search, one conversation's log,
// claim / write / release. Reads the same JSON API as every other client.
// Everything from users, models or staff is put on the page with textContent.
"use strict";

const KEY_STORAGE = "parley.staffKey";
const REFRESH_MS = 5000;
const CONVERSATION_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  keyId: null, // the key's own ID (GET /keys/me), as a conversation names its assignee
  starts: 0, // each start() counts, so that only the newest one goes on after /keys/me answers
  open: null, conversation: null, lastSeq: 0, timer: null,
  searched: null, cursor: null, // the filters of the search shown, and where its next page starts
};
const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + state.key };
  const options = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error((data && data.message) || response.status + " " + response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function conversationButton(conversation) {
  const item = el("li");
  const button = el("button", conversation.conversation_name || conversation.user_id);
  button.type = "button";
  button.dataset.conversationId = conversation.conversation_id;
  if (state.open === conversation.conversation_id) button.setAttribute("aria-current", "true");
  const meta = [conversation.user_id, conversation.handoff, conversation.status];
  if (conversation.stage) meta.push("stage " + conversation.stage);
  meta.push("since " + new Date(conversation.handoff_since || conversation.created_at).toLocaleString());
  button.append(el("span", meta.join(" · "), "meta"), el("span", conversation.conversation_id, "meta"));
  button.addEventListener("click", () => openConversation(conversation.conversation_id));
  item.append(button);
  return item;
}

// `quiet`: a failure is returned, not shown (an action shows it after its own outcome).
async function refreshQueue(quiet = false) {
  if (!state.key) return null;
  try {
    const page = await api("GET", "/conversations?status=active&handoff=needs_human&limit=100");
    $("queue").replaceChildren(...page.conversations.map(conversationButton));
    // One page of the queue is shown; more waiting reads as "100+".
    $("queue-count").textContent = page.conversations.length + (page.next_cursor ? "+" : "");
    return null;
  } catch (error) {
    if (!quiet) say("Queue: " + error.message, true);
    return "Queue: " + error.message;
  }
}

// The start of a local day ("2026-11-02") as the API takes it, plus `days`.
function dayStart(value, days = 0) {
  const [year, month, day] = value.split("-").map(Number);
  return new Date(year, month - 1, day + days).toISOString();
}

// The dates are the staff member's own days, both included: created_to is exclusive in the API,
// so it is the start of the day after.
const DATE_FILTERS = { created_from: (value) => dayStart(value), created_to: (value) => dayStart(value, 1) };

// "More" goes on with the filters of the list shown, even if the form was changed since: the
// cursor belongs to that search.
async function search(event, more = false) {
  if (event) event.preventDefault();
  let params;
  if (more && state.searched && state.cursor) {
    params = new URLSearchParams(state.searched);
    params.set("cursor", state.cursor);
  } else {
    more = false;
    params = new URLSearchParams();
    for (const [name, value] of new FormData($("search-form"))) {
      if (value) params.set(name, DATE_FILTERS[name] ? DATE_FILTERS[name](value) : value);
    }
  }
  const filters = params.toString();
  try {
    const page = await api("GET", "/conversations?" + filters);
    const items = page.conversations.map(conversationButton);
    if (more) $("results").append(...items); else $("results").replaceChildren(...items);
    if (!more) state.searched = filters;
    state.cursor = page.next_cursor;
    $("more-results").hidden = !page.next_cursor;
    say(more || items.length ? "" : "No conversation matches.");
  } catch (error) {
    say("Search: " + error.message, true);
  }
}

function summaryRow(list, label, value) {
  list.append(el("dt", label), el("dd", value === null || value === undefined || value === "" ? "—" : value));
}

function historyItems(list, moves) {
  list.replaceChildren(...moves.map((move) => {
    const who = move.by ? move.actor + " " + move.by.slice(0, 8) : move.actor;
    const text = `${move.from || "null"} → ${move.to || "null"} · ${who} · ${new Date(move.at).toLocaleString()}`;
    return el("li", move.reason ? text + " · " + move.reason : text);
  }));
  if (!moves.length) list.append(el("li", "none yet", "muted"));
}

function messageItem(message) {
  const item = el("li", null, message.role);
  item.dataset.seq = String(message.seq);
  const label = { user: "User", assistant: "Bot", staff: "Staff" }[message.role] || message.role;
  let who = `#${message.seq} · ${label} · ${new Date(message.created_at).toLocaleString()}`;
  if (message.incomplete) who += " · incomplete: the reader left before the end";
  item.append(el("span", who, "who"));
  item.append(el("div", message.content, "text"));
  return item;
}

// Whether the conversation is assigned to this key.
function assignedHere(conversation) {
  return Boolean(conversation.assigned_to) && conversation.assigned_to === state.keyId;
}

function show(conversation) {
  state.open = conversation.conversation_id;
  state.conversation = conversation;
  $("detail").hidden = false;
  $("detail-title").textContent = conversation.conversation_name || "Conversation " + conversation.conversation_id;
  const summary = $("summary");
  summary.replaceChildren();
  summaryRow(summary, "ID", conversation.conversation_id);
  summaryRow(summary, "User", conversation.user_id);
  summaryRow(summary, "Status", conversation.status);
  summaryRow(summary, "Handoff", conversation.handoff);
  summaryRow(summary, "Assigned to", conversation.assigned_to);
  summaryRow(summary, "Stage", conversation.stage);
  summaryRow(summary, "Messages", conversation.message_count);
  summaryRow(summary, "Created", new Date(conversation.created_at).toLocaleString());
  summary.querySelectorAll("dd")[3].id = "handoff-state";
  $("variables").textContent = JSON.stringify(conversation.variables, null, 2);
  historyItems($("handoff-history"), conversation.handoff_history);
  historyItems($("stage-history"), conversation.stage_history);
  $("messages").replaceChildren(...conversation.messages.map(messageItem));
  const last = conversation.messages[conversation.messages.length - 1];
  state.lastSeq = last ? last.seq : 0;
  const active = conversation.status === "active";
  $("claim").disabled = !(active && conversation.handoff === "needs_human");
  const answering = active && conversation.handoff === "human" && assignedHere(conversation);
  $("release").disabled = !answering;
  $("reply").disabled = $("reply-form").querySelector("button").disabled = !answering;
  $("stage-value").value = conversation.stage || "";
  $("stage-value").disabled = $("stage-form").querySelector("button").disabled = !active;
  $("messages").lastElementChild?.scrollIntoView({ block: "nearest" });
}

// `quiet`: the status line is left alone and a failure returned (see refreshQueue).
async function openConversation(conversationId, quiet = false) {
  try {
    show(await api("GET", "/get_conversation?conversation_id=" + encodeURIComponent(conversationId)));
    if (!quiet) say("");
    return null;
  } catch (error) {
    const message = error.status === 404 ? `No conversation has the ID ${conversationId}.` : "Open: " + error.message;
    if (!quiet) say(message, true);
    return message;
  }
}

async function openById(event) {
  event.preventDefault();
  const conversationId = $("open-id").value.trim();
  if (!CONVERSATION_ID.test(conversationId)) {
    return say(`Not a conversation ID: ${conversationId} (one looks like 1b0e6c1e-8d1f-4c7a-9a0e-2f4b5c6d7e8f).`, true);
  }
  if (!(await openConversation(conversationId))) $("detail-title").focus();
}

// Returns whether the action was taken. The status line says its outcome, then any failure
// of the reloads after it.
async function act(label, method, suffix, body) {
  if (!state.open) return false;
  let done = false;
  let outcome;
  try {
    await api(method, `/conversations/${encodeURIComponent(state.open)}/${suffix}`, body);
    outcome = label;
    done = true;
  } catch (error) {
    outcome = error.message;
  }
  const failures = [await openConversation(state.open, true), await refreshQueue(true)].filter(Boolean);
  say([outcome, ...failures].join(" "), !done || failures.length > 0);
  return done;
}

// Learn which key this is; a key that is not a staff key is named as such, and not used.
async function start(announce = false) {
  const run = ++state.starts;
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  state.keyId = null;
  if (!state.key) return;
  try {
    const me = await api("GET", "/keys/me");
    if (run !== state.starts) return;
    if (me.role !== "staff") return say(`This is ${me.role === "admin" ? "an" : "a"} ${me.role} key; the console needs a staff key.`, true);
    state.keyId = me.key_id;
  } catch (error) {
    if (run !== state.starts) return;
    say("Key: " + error.message, true);
    // A refused key waits for another; anything else (the database, the rate limit, the network) is tried again.
    if (error.status !== 401 && error.status !== 403) state.timer = setTimeout(() => start(announce), REFRESH_MS);
    return;
  }
  if (announce) say("Key set.");
  if (state.conversation) show(state.conversation);
  refreshQueue();
  state.timer = setInterval(() => refreshQueue(), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("refresh-seconds").textContent = String(REFRESH_MS / 1000);
  $("staff-key").value = state.key;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("staff-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    start(true);
  });
  $("forget-key").addEventListener("click", () => {
    state.key = "";
    state.starts += 1; // a key check still in flight is dropped
    state.keyId = null;
    sessionStorage.removeItem(KEY_STORAGE);
    if (state.conversation) show(state.conversation); // nothing is this page's to write or release now
    $("staff-key").value = "";
    if (state.timer) clearInterval(state.timer);
    say("Key forgotten.");
  });
  $("open-form").addEventListener("submit", openById);
  $("search-form").addEventListener("submit", (event) => search(event));
  $("stage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.conversation) return;
    // Compare-and-set against the stage shown, so a change made meanwhile is not overwritten.
    const stage = $("stage-value").value.trim() || null;
    act(stage ? `Stage set to ${stage}.` : "Stage cleared.", "PUT", "stage", { stage, expected_stage: state.conversation.stage });
  });
  $("more-results").addEventListener("click", () => search(null, true));
  $("claim").addEventListener("click", () => act("Claimed: you answer the user now.", "POST", "claim"));
  $("release").addEventListener("click", () => {
    const note = $("release-note").value.trim();
    $("release-note").value = "";
    act("Released to the bot.", "POST", "release", note ? { note } : {}).then((released) => {
      if (!released && !$("release-note").value) $("release-note").value = note;
    });
  });
  $("reload").addEventListener("click", () => state.open && openConversation(state.open));
  $("reply-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const message = $("reply").value;
    if (!message.trim()) return;
    $("reply").value = "";
    act("Sent.", "POST", "staff_messages", { message }).then((sent) => {
      if (!sent && !$("reply").value) $("reply").value = message; // not stored: keep it to send again
    });
  });
  start();
});
