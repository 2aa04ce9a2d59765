"""The staff console page in a real browser: Debian's chromium driven by Playwright.

The scenario of the issue: a client conversation asks for a human; staff
claim it in the console and reply; the client sees the staff message
through after_seq; staff release it. A screenshot is kept in the test's
temporary folder.
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import update
from werkzeug.serving import make_server

from database_utils import Message, get_session
from pages import CONTENT_SECURITY_POLICY
from tests.conftest import client_with_key

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def live_url(app) -> Iterator[str]:
    """The app served over HTTP on 127.0.0.1, for the browser."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def page() -> Iterator[Page]:
    assert Path(CHROMIUM).exists(), "install Debian's chromium: make chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield page
        browser.close()


def test_staff_page_is_served_with_the_chat_pages_strict_csp(client):
    response = client.get("/staff")

    assert response.status_code == 200 and response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert client.get("/", headers={"Accept": "text/html"}).headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"Content-Security-Policy: {CONTENT_SECURITY_POLICY}`" in readme  # the README quotes the header as sent
    html = response.get_data(as_text=True)
    assert "<script>" not in html and "http://" not in html and "https://" not in html
    assert client.get("/static/staff.js").status_code == 200


def test_staff_claim_reply_and_release_in_the_browser(app, keys, live_url, page, tmp_path):
    client = client_with_key(app, keys["client_a"])
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    # A conversation that asked for a human and then ended has no one left to answer: not in the queue.
    ended_id = client.post("/new_chat", json={"user_id": "gone"}).json["conversation_id"]
    client.post(f"/conversations/{ended_id}/handoff", json={"reason": "left"})
    client.post("/end_chat", json={"conversation_id": ended_id})

    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["staff"])
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#status")).to_have_text("Key set.")

    # The client's conversation asks for a human after the page is open: the queue refreshes by itself.
    conversation_id = client.post("/new_chat", json={"user_id": "shopper-7", "conversation_name": "Refund"}).json["conversation_id"]
    client.put(f"/conversations/{conversation_id}/variables/order", json={"value": {"id": 42}})
    client.put(f"/conversations/{conversation_id}/stage", json={"stage": "awaiting_refund"})
    client.post("/chat", json={"conversation_id": conversation_id, "message": "My parcel <b>never</b> came <img src=x>"})
    asked = client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "asks for a refund"})
    assert asked.status_code == 200
    held = client.post("/chat", json={"conversation_id": conversation_id, "message": "Is anyone there?"})
    assert held.status_code == 202
    last_seen = held.json["seq"]

    entry = page.locator(f'#queue button[data-conversation-id="{conversation_id}"]')
    expect(entry).to_be_visible(timeout=20_000)
    expect(page.locator(f'#queue button[data-conversation-id="{ended_id}"]')).to_have_count(0)
    entry.focus()
    page.keyboard.press("Enter")  # usable with the keyboard

    expect(page.locator("#handoff-state")).to_have_text("needs_human")
    expect(page.locator("#messages li")).to_have_count(3)
    # User text is shown as text, never as markup.
    expect(page.locator("#messages li").first.locator(".text")).to_have_text("My parcel <b>never</b> came <img src=x>")
    assert page.locator("#messages img, #messages b").count() == 0
    expect(page.locator("#variables")).to_contain_text('"id": 42')
    expect(page.locator("#handoff-history li")).to_have_count(1)
    expect(page.locator("#handoff-history li").first).to_contain_text("asks for a refund")
    expect(page.locator("#stage-history li").first).to_contain_text("awaiting_refund")

    page.get_by_role("button", name="Claim").click()
    expect(page.locator("#handoff-state")).to_have_text("human")
    page.get_by_label("Write to the user").fill("Hello, this is Sam from support. Your refund is on its way.")
    page.get_by_role("button", name="Send as staff").click()
    expect(page.locator("#messages li.staff")).to_have_count(1)
    expect(page.locator("#messages li.staff .text")).to_have_text("Hello, this is Sam from support. Your refund is on its way.")

    # The client sees the staff message through after_seq.
    newer = client.get("/get_conversation", query_string={"conversation_id": conversation_id, "after_seq": last_seen}).json
    assert [(m["role"], m["content"]) for m in newer["messages"]] == [
        ("staff", "Hello, this is Sam from support. Your refund is on its way.")
    ]

    page.get_by_label("Release note").fill("refund issued")
    page.get_by_role("button", name="Release to the bot").click()
    expect(page.locator("#handoff-state")).to_have_text("bot")
    expect(page.locator("#handoff-history li")).to_have_count(3)
    expect(page.locator("#handoff-history li").last).to_contain_text("refund issued")
    expect(page.locator(f'#queue button[data-conversation-id="{conversation_id}"]')).to_have_count(0)

    # Search with the existing filters finds it by stage.
    page.locator("#search-form").get_by_label("Stage").fill("awaiting_refund")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(f'#results button[data-conversation-id="{conversation_id}"]')).to_be_visible()

    screenshot = tmp_path / "staff_console.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["handoff"] == "bot"
    assert problems == []


def test_queue_count_says_when_more_are_waiting_than_it_lists(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])

    def ask_for_a_human(n: int) -> None:
        conversation_id = client.post("/new_chat", json={"user_id": f"waiting-{n}"}).json["conversation_id"]
        assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "help"}).status_code == 200

    for n in range(100):
        ask_for_a_human(n)
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["staff"])
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#queue-count")).to_have_text("100")  # all of them: the page holds 100

    ask_for_a_human(100)

    expect(page.locator("#queue-count")).to_have_text("100+", timeout=15_000)  # at the next refresh
    expect(page.locator("#queue button")).to_have_count(100)


def _open_waiting_conversation(client, keys, live_url: str, page: Page) -> str:
    """A conversation that asked for a human, opened from the queue of the console with the staff key."""
    conversation_id = client.post("/new_chat", json={"user_id": "shopper"}).json["conversation_id"]
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "help"}).status_code == 200
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["staff"])
    page.get_by_role("button", name="Use key").click()
    page.locator(f'#queue button[data-conversation-id="{conversation_id}"]').click()
    expect(page.locator("#handoff-state")).to_have_text("needs_human")
    return conversation_id


def test_a_staff_message_that_is_refused_stays_in_its_box(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    staff = client_with_key(app, keys["staff"])
    conversation_id = _open_waiting_conversation(client, keys, live_url, page)
    page.get_by_role("button", name="Claim").click()
    expect(page.locator("#handoff-state")).to_have_text("human")

    # Released behind the page's back (another tab): the message is refused, 409, and not lost.
    assert staff.post(f"/conversations/{conversation_id}/release", json={}).status_code == 200
    page.get_by_label("Write to the user").fill("Sam here: one moment please.")
    page.get_by_role("button", name="Send as staff").click()

    expect(page.locator("#status")).to_contain_text("handoff state bot")
    expect(page.locator("#handoff-state")).to_have_text("bot")
    expect(page.get_by_label("Write to the user")).to_have_value("Sam here: one moment please.")
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == []


def test_a_failed_action_and_the_reload_after_it_both_stay_on_the_status_line(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    admin = client_with_key(app, keys["admin"])
    _open_waiting_conversation(client, keys, live_url, page)

    staff_key_id = next(key["key_id"] for key in admin.get("/keys").json["keys"] if key["name"] == "staff")
    assert admin.post("/keys/revoke", json={"key_id": staff_key_id}).status_code == 200
    page.get_by_role("button", name="Claim").click()

    status = page.locator("#status")
    expect(status).to_contain_text("Open:")  # the reload failed too (401) ...
    expect(status).to_contain_text("revoked")  # ... after the claim's own error, still shown
    expect(status).to_have_class("error")


def test_long_unbroken_names_fit_a_phone_screen(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    user_id = "u" * 128
    conversation_id = client.post("/new_chat", json={"user_id": user_id, "conversation_name": "N" * 150}).json["conversation_id"]
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "R" * 300}).status_code == 200
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["staff"])
    page.get_by_role("button", name="Use key").click()
    page.get_by_label("User ID").fill(user_id)
    page.get_by_role("button", name="Search").click()
    page.locator(f'#results button[data-conversation-id="{conversation_id}"]').click()
    expect(page.locator("#detail-title")).to_have_text("N" * 150)
    expect(page.locator("#handoff-history li").first).to_contain_text("R" * 300)
    expect(page.locator(f'#queue button[data-conversation-id="{conversation_id}"]')).to_be_visible()

    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def _use_staff_key(page: Page, live_url: str, secret: str) -> None:
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(secret)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#status")).to_have_text("Key set.")


def test_a_conversation_opens_by_its_id_from_the_keyboard(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    conversation_id = client.post("/new_chat", json={"user_id": "by-id", "conversation_name": "Found by ID"}).json["conversation_id"]
    _use_staff_key(page, live_url, keys["staff"])

    page.get_by_label("Conversation ID").fill(f" {conversation_id} ")
    page.get_by_label("Conversation ID").press("Enter")
    expect(page.locator("#detail-title")).to_have_text("Found by ID")
    expect(page.locator("#status")).to_have_text("")

    unknown = str(uuid.uuid4())
    page.get_by_label("Conversation ID").fill(unknown)
    page.get_by_role("button", name="Open", exact=True).click()
    expect(page.locator("#status")).to_have_text(f"No conversation has the ID {unknown}.")
    expect(page.locator("#status")).to_have_class("error")

    page.get_by_label("Conversation ID").fill("not-an-id")
    page.get_by_label("Conversation ID").press("Enter")
    expect(page.locator("#status")).to_contain_text("Not a conversation ID: not-an-id")


def test_search_by_the_day_a_conversation_was_created(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    conversation_id = client.post("/new_chat", json={"user_id": "dated"}).json["conversation_id"]
    _use_staff_key(page, live_url, keys["staff"])
    today = page.evaluate("new Date().toLocaleDateString('en-CA')")  # the browser's own day, YYYY-MM-DD
    yesterday = page.evaluate("new Date(Date.now() - 86400000).toLocaleDateString('en-CA')")
    searches = []
    page.on("request", lambda request: "/conversations?" in request.url and "handoff=needs_human" not in request.url
            and searches.append(request.url))
    entry = page.locator(f'#results button[data-conversation-id="{conversation_id}"]')

    page.get_by_label("User ID").fill("dated")
    page.get_by_label("Created from").fill(today)
    page.get_by_label("Created to").fill(today)
    page.get_by_label("Created to").press("Enter")
    expect(entry).to_be_visible()
    assert "created_from=" in searches[-1] and "created_to=" in searches[-1]

    page.get_by_label("Created to").fill(yesterday)
    page.get_by_role("button", name="Search").click()
    expect(entry).to_have_count(0)
    expect(page.locator("#status")).to_have_text("No conversation matches.")

    page.get_by_label("Created from").fill("")
    page.get_by_label("Created to").fill("")
    page.get_by_role("button", name="Search").click()
    expect(entry).to_be_visible()


def test_more_goes_on_with_the_search_shown_even_after_the_form_changed(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    paged = [client.post("/new_chat", json={"user_id": "pager"}).json["conversation_id"] for _ in range(51)]
    other = client.post("/new_chat", json={"user_id": "someone-else"}).json["conversation_id"]
    _use_staff_key(page, live_url, keys["staff"])
    listed = page.locator("#results button")

    page.get_by_label("User ID").fill("pager")
    page.get_by_label("User ID").press("Enter")
    expect(listed).to_have_count(50)  # a page of the API's default size
    page.get_by_label("User ID").fill("someone-else")  # changed, not searched
    page.get_by_role("button", name="More").click()

    expect(listed).to_have_count(51)
    expect(page.get_by_role("button", name="More")).to_be_hidden()
    shown = listed.evaluate_all("buttons => buttons.map((button) => button.dataset.conversationId)")
    assert sorted(shown) == sorted(paged) and other not in shown
    expect(page.locator("#status")).to_have_text("")


def test_a_reply_cut_short_is_marked_incomplete(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    conversation_id = client.post("/new_chat", json={"user_id": "cut"}).json["conversation_id"]
    assert client.post("/chat", json={"conversation_id": conversation_id, "message": "tell me more"}).status_code == 200
    with app.app_context():  # as a stream whose reader left stores its reply
        session = get_session()
        session.execute(update(Message).where(Message.conversation_id == uuid.UUID(conversation_id), Message.seq == 2)
                        .values(incomplete=True))
        session.commit()
    _use_staff_key(page, live_url, keys["staff"])

    page.get_by_label("Conversation ID").fill(conversation_id)
    page.get_by_label("Conversation ID").press("Enter")

    who = page.locator("#messages li .who")
    expect(who).to_have_count(2)
    expect(who.nth(1)).to_contain_text("#2 · Bot · ")
    expect(who.nth(1)).to_contain_text("incomplete: the reader left before the end")
    expect(who.nth(0)).not_to_contain_text("incomplete")


def test_the_loser_of_a_claim_race_cannot_write_or_release(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    admin = client_with_key(app, keys["admin"])
    other = client_with_key(app, admin.post("/keys", json={"role": "staff", "name": "other desk"}).json["key"])
    conversation_id = _open_waiting_conversation(client, keys, live_url, page)

    assert other.post(f"/conversations/{conversation_id}/claim", json={}).status_code == 200  # the other desk wins
    page.get_by_role("button", name="Claim").click()

    expect(page.locator("#status")).to_contain_text("is in handoff state human")
    expect(page.locator("#handoff-state")).to_have_text("human")  # the page read it again
    expect(page.get_by_role("button", name="Send as staff")).to_be_disabled()
    expect(page.get_by_role("button", name="Release to the bot")).to_be_disabled()
    expect(page.get_by_role("button", name="Claim")).to_be_disabled()


def test_the_assigned_key_writes_and_another_conversation_won_by_others_stays_closed(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    admin = client_with_key(app, keys["admin"])
    other = client_with_key(app, admin.post("/keys", json={"role": "staff", "name": "other desk"}).json["key"])
    mine = _open_waiting_conversation(client, keys, live_url, page)
    page.get_by_role("button", name="Claim").click()
    expect(page.get_by_role("button", name="Send as staff")).to_be_enabled()  # this key is the assigned one
    expect(page.get_by_role("button", name="Release to the bot")).to_be_enabled()

    # Claimed by another desk before this page opened it: the page knows its own key by now.
    theirs = client.post("/new_chat", json={"user_id": "elsewhere"}).json["conversation_id"]
    client.post(f"/conversations/{theirs}/handoff", json={"reason": "help"})
    assert other.post(f"/conversations/{theirs}/claim", json={}).status_code == 200
    page.get_by_label("Conversation ID").fill(theirs)
    page.get_by_label("Conversation ID").press("Enter")
    expect(page.locator("#handoff-state")).to_have_text("human")
    expect(page.get_by_role("button", name="Send as staff")).to_be_disabled()
    expect(page.get_by_role("button", name="Release to the bot")).to_be_disabled()

    page.get_by_label("Conversation ID").fill(mine)
    page.get_by_label("Conversation ID").press("Enter")
    expect(page.get_by_role("button", name="Send as staff")).to_be_enabled()


def test_a_conversation_another_key_holds_is_closed_to_this_key_before_it_ever_claims(app, keys, live_url, page):
    """The page asks which key it has (GET /keys/me) instead of learning it from a claim."""
    client = client_with_key(app, keys["client_a"])
    admin = client_with_key(app, keys["admin"])
    other = client_with_key(app, admin.post("/keys", json={"role": "staff", "name": "other desk"}).json["key"])
    theirs = client.post("/new_chat", json={"user_id": "elsewhere"}).json["conversation_id"]
    client.post(f"/conversations/{theirs}/handoff", json={"reason": "help"})
    assert other.post(f"/conversations/{theirs}/claim", json={}).status_code == 200
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["staff"])
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#status")).to_have_text("Key set.")

    page.get_by_label("Conversation ID").fill(theirs)
    page.get_by_label("Conversation ID").press("Enter")

    expect(page.locator("#handoff-state")).to_have_text("human")
    expect(page.get_by_role("button", name="Send as staff")).to_be_disabled()
    expect(page.get_by_role("button", name="Release to the bot")).to_be_disabled()


def test_a_key_that_is_not_a_staff_key_is_named_as_such(keys, live_url, page):
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["client_a"])
    page.get_by_role("button", name="Use key").click()

    expect(page.locator("#status")).to_have_text("This is a client key; the console needs a staff key.")
    expect(page.locator("#status")).to_have_class("error")


def test_a_key_check_that_fails_is_tried_again(app, keys, live_url, page):
    """GET /keys/me answered 503 once: the console says so, asks again, and then works."""
    client = client_with_key(app, keys["client_a"])
    conversation_id = client.post("/new_chat", json={"user_id": "shopper"}).json["conversation_id"]
    client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "help"})
    refused = []

    def once_unavailable(route):
        if refused:
            return route.continue_()
        refused.append(route.request.url)
        route.fulfill(status=503, content_type="application/json",
                      body='{"error": "database_unavailable", "message": "the database is unavailable"}')

    page.route("**/keys/me", once_unavailable)
    page.goto(f"{live_url}/staff")
    page.get_by_label("Staff key").fill(keys["staff"])
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#status")).to_have_text("Key: the database is unavailable")

    queued = page.locator(f'#queue button[data-conversation-id="{conversation_id}"]')
    expect(queued).to_be_visible(timeout=15_000)
    queued.click()
    page.get_by_role("button", name="Claim").click()
    expect(page.get_by_role("button", name="Send as staff")).to_be_enabled()
    assert len(refused) == 1

    page.get_by_role("button", name="Forget").click()
    expect(page.get_by_role("button", name="Send as staff")).to_be_disabled()


def test_staff_change_the_stage_from_the_console(app, keys, live_url, page):
    client = client_with_key(app, keys["client_a"])
    conversation_id = _open_waiting_conversation(client, keys, live_url, page)

    page.get_by_label("New stage").fill("refund_review")
    page.get_by_label("New stage").press("Enter")
    expect(page.locator("#status")).to_have_text("Stage set to refund_review.")
    expect(page.locator("#stage-history li").first).to_contain_text("refund_review")
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["stage"] == "refund_review"

    # Changed meanwhile by the client app: compare-and-set refuses, and the page shows the stage now.
    assert client.put(f"/conversations/{conversation_id}/stage", json={"stage": "shipping"}).status_code == 200
    page.get_by_label("New stage").fill("closed")
    page.get_by_role("button", name="Set stage").click()
    expect(page.locator("#status")).to_contain_text("shipping")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.get_by_label("New stage")).to_have_value("shipping")
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["stage"] == "shipping"
