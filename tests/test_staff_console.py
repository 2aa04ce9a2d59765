"""The staff console page in a real browser: Debian's chromium driven by Playwright.

The scenario of the issue: a client conversation asks for a human; staff
claim it in the console and reply; the client sees the staff message
through after_seq; staff release it. A screenshot is kept in the test's
temporary folder.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from werkzeug.serving import make_server

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
    page.get_by_label("Stage").fill("awaiting_refund")
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
