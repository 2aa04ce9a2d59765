"""The chat page at GET /, in a real browser (Debian's chromium driven by Playwright).

The app is served over HTTP by a real server on 127.0.0.1, with the echo
model and with Claude through the fake model server. Each run saves a
screenshot under the test's temporary folder (`chat-<provider>.png`).
"""
from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from werkzeug.serving import make_server

from auth import create_key
from database_utils import get_session
from main import create_app

CHROMIUM = "/usr/bin/chromium"
INJECTED = '<script>window.injected = 1</script><img src="x" onerror="window.injected = 2"> & <b>bold</b>'


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def serve(app_config, fake_model, monkeypatch) -> Iterator:
    """Serve the app with `provider` on a free port: (base URL, client key, provider).

    Keyword arguments are settings for that app. `serve.staff_key(base_url)` makes a staff key
    for the app served there.
    """
    running = []

    def staff_key(base_url: str) -> str:
        app = next(app for app, server, _ in running if base_url.endswith(f":{server.server_port}"))
        with app.app_context():
            return create_key(get_session(), "staff", "support desk")[1]

    def start(provider: str, **settings) -> tuple[str, str, str]:
        # A small context budget, so that a few messages show trimming.
        config = {**app_config, "CONTEXT_MAX_TOKENS": 400, **settings}
        if provider == "anthropic":
            monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
            monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_model.base_url)
            config.update(LLM_PROVIDER="anthropic", LLM_MODEL="claude-test", LLM_MAX_RETRIES=0)
            fake_model.stream_interval = 0.03  # word by word, as a model writes
        app = create_app(config)
        with app.app_context():
            secret = create_key(get_session(), "client", "browser")[1]
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((app, server, thread))
        return f"http://127.0.0.1:{server.server_port}", secret, provider

    start.staff_key = staff_key
    yield start
    for app, server, thread in running:
        server.shutdown()
        thread.join()
        app.extensions["parley.engine"].dispose()


@pytest.fixture(params=["echo", "anthropic"])
def served(request, serve) -> tuple[str, str, str]:
    return serve(request.param)


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    yield page
    context.close()


def start_conversation(page: Page, base_url: str, secret: str) -> None:
    page.goto(base_url + "/")
    page.get_by_label("Paste a client key").fill(secret)
    page.get_by_label("Paste a client key").press("Enter")
    page.get_by_label("Name (optional)").fill("Browser test")
    page.get_by_label("System prompt (optional)").fill("Be brief.")
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#chat-title")).to_have_text("Browser test")


def test_a_person_chats_and_sees_the_reply_stream_in(served, page, tmp_path):
    base_url, secret, provider = served
    start_conversation(page, base_url, secret)
    # Record every text the reply shows while it streams.
    page.evaluate(
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                const replies = document.querySelectorAll('#messages .assistant .text');
                const text = replies.length ? replies[replies.length - 1].textContent : '';
                if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )

    box = page.get_by_label("Message")
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    box.press("Enter")

    reply = page.locator("#messages .assistant .text").last
    expect(reply).to_contain_text("first line\nsecond line", timeout=15_000)
    expect(page.locator("#messages .assistant .meta").last).to_contain_text("1 message sent")
    seen = page.evaluate("window.seen")
    assert len(seen) >= 3, seen  # the reply grew in steps before it was whole
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))
    expect(page.locator("#messages .user .text").first).to_have_text("first line\nsecond line")
    page.screenshot(path=str(tmp_path / f"chat-{provider}.png"), full_page=True)
    assert (tmp_path / f"chat-{provider}.png").stat().st_size > 10_000
    assert page.console_errors == []


def test_a_reply_with_markup_shows_as_text_after_a_reload(served, page, tmp_path):
    base_url, secret, provider = served
    start_conversation(page, base_url, secret)

    page.get_by_label("Message").fill(INJECTED)
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .assistant .meta")).to_have_count(1, timeout=15_000)
    page.reload()

    reply = page.locator("#messages .assistant .text")
    expect(reply).to_contain_text("<script>window.injected = 1</script>")
    expect(reply).to_contain_text('<img src="x" onerror="window.injected = 2">')
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.evaluate("window.injected") is None
    page.screenshot(path=str(tmp_path / f"injected-{provider}.png"), full_page=True)


def stored_key(page: Page) -> str | None:
    return page.evaluate("sessionStorage.getItem('parley.key')")


def test_the_page_names_a_bad_key_and_can_end_the_conversation(served, page):
    base_url, secret, _ = served
    page.goto(base_url + "/")
    page.get_by_label("Paste a client key").fill("prly_not_a_real_key")
    page.get_by_role("button", name="Use key").click()
    expect(page.get_by_role("alert")).to_contain_text("API key was not accepted")
    assert stored_key(page) is None

    start_conversation(page, base_url, secret)
    page.get_by_role("button", name="End conversation").click()

    expect(page.locator("#chat-status")).to_have_text("ended")
    expect(page.get_by_label("Message")).to_be_disabled()


@pytest.mark.parametrize(("wrong", "said"), [
    ("unknown", "That API key was not accepted. Paste a valid client key."),
    ("staff", "This is a staff key; this page needs a client key."),
], ids=["unknown", "staff"])
def test_the_page_keeps_only_a_client_key(serve, page, wrong, said):
    base_url, secret, _ = serve("echo")
    page.goto(base_url + "/")
    key_box = page.get_by_label("Paste a client key")
    key_box.fill("prly_not_a_real_key" if wrong == "unknown" else serve.staff_key(base_url))
    key_box.press("Enter")

    expect(page.get_by_role("alert")).to_have_text(said)
    expect(key_box).to_be_focused()  # to paste another at once
    assert stored_key(page) is None
    expect(page.locator("#new-panel")).to_be_hidden()
    key_box.fill(secret)
    key_box.press("Enter")
    expect(page.get_by_label("Name (optional)")).to_be_focused()
    expect(page.get_by_role("alert")).to_be_hidden()
    assert stored_key(page) == secret


KEY_CHECK_OUTAGES = {
    "unreachable": lambda route: route.abort("internetdisconnected"),
    "server error": lambda route: route.fulfill(
        status=503, json={"error": "database_unavailable", "message": "The database is unavailable."}),
    "rate limited": lambda route: route.fulfill(
        status=429, headers={"Retry-After": "1"}, json={"error": "rate_limited", "message": "Too many requests."}),
}


@pytest.mark.parametrize("outage", KEY_CHECK_OUTAGES)
def test_a_key_that_cannot_be_checked_now_is_kept(serve, page, outage):
    """An outage locks no one out: the key is kept, and its first request says whether it is refused."""
    base_url, secret, _ = serve("echo")
    page.route("**/keys/me", KEY_CHECK_OUTAGES[outage])
    page.goto(base_url + "/")
    page.get_by_label("Paste a client key").fill("prly_not_a_real_key")
    page.get_by_label("Paste a client key").press("Enter")

    expect(page.get_by_role("alert")).to_contain_text("The key is kept, but it could not be checked now")
    assert stored_key(page) == "prly_not_a_real_key"
    expect(page.get_by_label("Name (optional)")).to_be_focused()
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("alert")).to_have_text("That API key was not accepted. Paste a valid client key.")

    page.get_by_role("button", name="Forget it").click()
    page.get_by_label("Paste a client key").fill(secret)
    page.get_by_label("Paste a client key").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("could not be checked now")
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#chat-title")).to_have_text("Conversation")
    expect(page.get_by_role("alert")).to_be_hidden()  # the key worked


def test_the_page_says_when_the_model_is_unavailable(serve, page, fake_model):
    base_url, secret, _ = serve("anthropic")
    start_conversation(page, base_url, secret)
    fake_model.fail_next(529)

    page.get_by_label("Message").fill("are you there?")
    page.get_by_label("Message").press("Enter")

    expect(page.get_by_role("alert")).to_contain_text("The model is unavailable right now")
    # Nothing came back: no empty reply, the message itself is marked as not stored.
    expect(page.locator("#messages .user.failed .meta")).to_have_text("not sent (not stored)")
    expect(page.locator("#messages .assistant")).to_have_count(0)


def test_the_page_shows_when_the_context_was_trimmed(serve, page):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    for n in range(3):
        page.get_by_label("Message").fill(f"message {n} " + "lorem ipsum " * 30)
        page.get_by_label("Message").press("Enter")
        expect(page.locator("#messages .assistant .meta")).to_have_count(n + 1, timeout=15_000)

    expect(page.locator("#messages .assistant .meta.trimmed").last).to_contain_text(re.compile(r"\d+ earlier dropped"))


def ask_for_a_human(page: Page) -> None:
    page.get_by_label("Message").fill("Please let me talk to a human")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .notice")).to_have_text(["A person from support will answer here."])


def test_a_message_held_for_support_is_stored_and_says_so(serve, page):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)

    ask_for_a_human(page)

    expect(page.locator("#messages .user .text")).to_have_text(["Please let me talk to a human"])
    expect(page.locator("#messages")).not_to_contain_text("not stored")
    expect(page.locator("#messages .failed")).to_have_count(0)
    expect(page.get_by_role("alert")).to_be_hidden()
    expect(page.locator("#messages .user .meta")).to_have_text(["sent to support"])
    expect(page.locator("#messages .assistant")).to_have_count(0)  # no empty reply waiting for the model
    expect(page.get_by_label("Message")).to_be_enabled()
    page.reload()  # the page reads the same log and state back
    expect(page.locator("#messages .user .text")).to_have_text(["Please let me talk to a human"])
    expect(page.locator("#messages .notice")).to_have_text(["A person from support will answer here."])
    assert page.console_errors == []


def test_the_model_hands_a_streamed_turn_to_support(serve, page, fake_model, tmp_path):
    base_url, secret, _ = serve("anthropic")
    staff = {"Authorization": f"Bearer {serve.staff_key(base_url)}"}
    start_conversation(page, base_url, secret)
    fake_model.tool_use_next("request_human", {"reason": "a disputed charge"}, text="Let me fetch a colleague.")

    page.get_by_label("Message").fill("This charge is wrong!")
    page.get_by_label("Message").press("Enter")

    expect(page.locator("#messages .notice")).to_have_text(["A person from support will answer here."])
    expect(page.locator("#messages .assistant .text")).to_have_text(["Let me fetch a colleague."])
    expect(page.locator("#messages .failed")).to_have_count(0)
    expect(page.get_by_role("alert")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "chat-model-handoff.png"), full_page=True)
    conversation_id = page.evaluate("sessionStorage.getItem('parley.conversation')")
    api = page.context.request
    assert api.post(f"{base_url}/conversations/{conversation_id}/claim", headers=staff, data={}).ok
    assert api.post(f"{base_url}/conversations/{conversation_id}/staff_messages", headers=staff,
                    data={"message": "Sam here, I see the charge."}).ok
    expect(page.locator("#messages .staff .text")).to_have_text(["Sam here, I see the charge."], timeout=10_000)
    expect(page.locator("#messages > li")).to_contain_text(
        ["This charge is wrong!", "Let me fetch a colleague.", "will answer here", "is answering", "Sam here"])
    expect(page.locator("#messages .assistant")).to_have_count(1)  # the model's words shown once
    assert page.console_errors == []


def test_staff_replies_appear_without_a_reload(serve, page, tmp_path):
    base_url, secret, _ = serve("echo")
    staff = {"Authorization": f"Bearer {serve.staff_key(base_url)}"}
    start_conversation(page, base_url, secret)
    ask_for_a_human(page)
    conversation_id = page.evaluate("sessionStorage.getItem('parley.conversation')")
    api = page.context.request

    def staff_post(action: str, body: dict | None = None) -> None:
        response = api.post(f"{base_url}/conversations/{conversation_id}/{action}", headers=staff, data=body or {})
        assert response.ok, response.text()

    staff_post("claim")
    staff_post("staff_messages", {"message": "Hello, I am Sam from support. <b>How can I help?</b>"})

    staff_replies = page.locator("#messages .staff")
    expect(staff_replies.locator(".text")).to_have_text(["Hello, I am Sam from support. <b>How can I help?</b>"], timeout=10_000)
    expect(staff_replies.locator(".who")).to_have_text(["Support"])
    expect(page.locator("#messages .notice").last).to_have_text("A person from support is answering.")
    page.get_by_label("Message").fill("My invoice is wrong")
    page.get_by_label("Message").press("Enter")
    staff_post("staff_messages", {"message": "Let me look at it."})
    expect(staff_replies.locator(".text")).to_have_text(
        ["Hello, I am Sam from support. <b>How can I help?</b>", "Let me look at it."], timeout=10_000
    )
    in_order = ["will answer here", "Sam from support", "My invoice", "Let me look"]
    expect(page.locator("#messages > li")).to_contain_text(in_order[:1] + ["is answering"] + in_order[1:])
    page.screenshot(path=str(tmp_path / "chat-handoff.png"), full_page=True)

    page.reload()  # still with support: the page keeps reading
    staff_post("staff_messages", {"message": "Fixed: the invoice is corrected."})
    expect(staff_replies.locator(".text").last).to_have_text("Fixed: the invoice is corrected.", timeout=10_000)
    staff_post("release", {"note": "solved"})
    expect(page.locator("#messages .notice").last).to_have_text("Support handed the conversation back to the assistant.", timeout=10_000)

    expect(page.locator("#messages .user .text")).to_have_text(["Please let me talk to a human", "My invoice is wrong"])
    expect(staff_replies).to_have_count(3)  # each shown once
    assert page.locator("#messages b").count() == 0
    expect(page.get_by_role("alert")).to_be_hidden()
    assert page.console_errors == []


def test_a_handoff_started_by_staff_and_their_reply_show_without_a_reload(serve, page):
    """The page talks with the assistant; staff take the conversation over from the console."""
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    page.get_by_label("Message").fill("Where is my parcel?")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .assistant .meta")).to_contain_text("message")  # the turn is stored (`done`)
    support = Support(page, base_url, secret, serve.staff_key(base_url))

    support.post("handoff", {"reason": "a delivery we must check by hand"})
    support.post("claim")
    support.post("staff_messages", {"message": "Sam from support: it left the depot today."})

    expect(page.locator("#messages .staff .text")).to_have_text(["Sam from support: it left the depot today."], timeout=25_000)
    expect(page.locator("#messages .notice").last).to_have_text("A person from support is answering.")
    assert page.console_errors == []


def test_a_new_conversation_is_read_before_its_first_message(serve, page):
    """Staff take over a conversation the person has only opened: it shows without a reload."""
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    support = Support(page, base_url, secret, serve.staff_key(base_url))

    support.post("handoff", {"reason": "we call you first"})
    support.post("claim")
    support.post("staff_messages", {"message": "Sam from support: your order is ready."})

    expect(page.locator("#messages .staff .text")).to_have_text(["Sam from support: your order is ready."], timeout=25_000)
    assert page.console_errors == []


class Support:
    """Staff and client API calls for the conversation open in `page`."""

    def __init__(self, page: Page, base_url: str, secret: str, staff_secret: str):
        self.api = page.context.request
        self.base_url = base_url
        self.client = {"Authorization": f"Bearer {secret}"}
        self.staff = {"Authorization": f"Bearer {staff_secret}"}
        self.conversation_id = page.evaluate("sessionStorage.getItem('parley.conversation')")

    def post(self, action: str, body: dict | None = None) -> None:
        url = f"{self.base_url}/conversations/{self.conversation_id}/{action}"
        response = self.api.post(url, headers=self.staff, data=body or {})
        assert response.ok, response.text()

    def read(self):
        return self.api.get(f"{self.base_url}/get_conversation?conversation_id={self.conversation_id}", headers=self.client)

    def spend_the_rate_limit(self, page: Page, at_least: int = 0) -> int:
        """Read with the client key until it is refused; the refusal's Retry-After (waits for a new window if under `at_least`)."""
        for _ in range(100):
            response = self.read()
            if response.status == 429:
                wait = int(response.headers["retry-after"])
                if wait >= at_least:
                    return wait
                page.wait_for_timeout(wait * 1000 + 300)
        pytest.fail("the client key was never rate limited")


def wait_for_a_read(page: Page) -> None:
    """Wait until the page has read the conversation (the next read is then a whole poll interval away)."""
    with page.expect_response(lambda response: "/get_conversation" in response.url, timeout=10_000):
        pass


def test_a_message_sent_before_the_next_read_keeps_its_place_in_the_log(serve, page, tmp_path):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    ask_for_a_human(page)
    support = Support(page, base_url, secret, serve.staff_key(base_url))
    wait_for_a_read(page)

    # Support writes (seq 2) and the person writes (seq 3) before the page reads again.
    support.post("claim")
    support.post("staff_messages", {"message": "Sam here: which invoice?"})
    page.get_by_label("Message").fill("Invoice 42")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .user .meta")).to_have_text(["sent to support", "sent to support"])
    expect(page.locator("#messages .staff")).to_have_count(1, timeout=10_000)

    log = support.read().json()["messages"]
    stored = [message["content"] for message in log]
    assert stored == ["Please let me talk to a human", "Sam here: which invoice?", "Invoice 42"]
    expect(page.locator("#messages > .message .text")).to_have_text(stored)
    expect(page.locator("#messages > li")).to_have_text(
        [
            re.compile("talk to a human"),
            "A person from support will answer here.",
            "A person from support is answering.",
            re.compile("Sam here"),
            re.compile("Invoice 42"),
        ]
    )
    shown_seqs = page.eval_on_selector_all("#messages > .message", "items => items.map(item => Number(item.dataset.seq))")
    assert shown_seqs == [message["seq"] for message in log]
    page.screenshot(path=str(tmp_path / "chat-order.png"), full_page=True)
    page.reload()
    expect(page.locator("#messages > .message .text")).to_have_text(stored)
    assert page.console_errors == []


def test_a_rate_limited_message_during_handoff_is_marked_not_sent(serve, page, tmp_path):
    base_url, secret, _ = serve("echo", RATELIMIT_ENABLED=True, RATE_LIMIT="10 per minute", RATELIMIT_KEY_PREFIX=uuid.uuid4().hex)
    start_conversation(page, base_url, secret)
    ask_for_a_human(page)
    support = Support(page, base_url, secret, serve.staff_key(base_url))
    support.spend_the_rate_limit(page)
    reads = []
    page.on("request", lambda request: "/get_conversation" in request.url and reads.append(request.url))

    page.get_by_label("Message").fill("Are you still there?")
    page.get_by_label("Message").press("Enter")

    expect(page.get_by_role("alert")).to_contain_text("Rate limited")
    refused = page.locator("#messages .user").last
    expect(refused.locator(".text")).to_have_text("Are you still there?")
    expect(refused).to_have_class(re.compile(r"\bfailed\b"))
    expect(refused.locator(".meta")).to_have_text("not sent (not stored)")
    expect(page.locator("#messages .assistant")).to_have_count(0)  # no empty reply
    expect(page.locator("#messages .user .meta").first).to_have_text("sent to support")
    expect(page.get_by_label("Message")).to_be_enabled()
    expect(page.get_by_label("Message")).to_have_value("Are you still there?")  # kept to send again
    page.screenshot(path=str(tmp_path / "chat-rate-limited.png"), full_page=True)
    page.wait_for_timeout(4_000)  # more than a poll interval: the page waits for Retry-After
    assert reads == []


def test_polling_waits_out_the_rate_limit_and_then_clears_its_error(serve, page):
    base_url, secret, _ = serve("echo", RATELIMIT_ENABLED=True, RATE_LIMIT="8 per 10 seconds", RATELIMIT_KEY_PREFIX=uuid.uuid4().hex)
    start_conversation(page, base_url, secret)
    ask_for_a_human(page)
    support = Support(page, base_url, secret, serve.staff_key(base_url))
    support.spend_the_rate_limit(page, at_least=6)  # at the start of a window: the message below is refused too
    reads = []
    page.on("request", lambda request: "/get_conversation" in request.url and reads.append(time.monotonic()))

    page.get_by_label("Message").fill("Hello?")
    page.get_by_label("Message").press("Enter")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Rate limited")
    refused_at = time.monotonic()
    wait = int(re.search(r"Try again in (\d+) s", alert.text_content()).group(1))
    assert wait >= 5

    expect(alert).to_be_hidden(timeout=(wait + 8) * 1000)  # a later read succeeded
    assert reads and reads[0] >= refused_at + wait - 1.5, (reads, refused_at, wait)
    expect(page.locator("#messages .user.failed .meta")).to_have_text(["not sent (not stored)"])
    assert page.console_errors == [] or all("429" in error for error in page.console_errors)


def stored_conversation(page: Page) -> str | None:
    return page.evaluate("sessionStorage.getItem('parley.conversation')")


def test_a_reload_while_rate_limited_keeps_the_conversation(serve, page):
    base_url, secret, _ = serve("echo", RATELIMIT_ENABLED=True, RATE_LIMIT="8 per 10 seconds", RATELIMIT_KEY_PREFIX=uuid.uuid4().hex)
    start_conversation(page, base_url, secret)
    page.get_by_label("Message").fill("remember me")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .assistant .meta")).to_have_count(1, timeout=15_000)
    conversation_id = stored_conversation(page)
    Support(page, base_url, secret, "").spend_the_rate_limit(page, at_least=4)

    page.reload()

    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Rate limited")
    assert stored_conversation(page) == conversation_id
    expect(alert).to_contain_text("The conversation is kept")
    expect(page.locator("#new-panel")).to_be_hidden()
    # Once Retry-After has passed the page reads it again by itself, and a reload shows it too.
    expect(page.locator("#chat-title")).to_have_text("Browser test", timeout=15_000)
    expect(alert).to_be_hidden()
    page.reload()
    expect(page.locator("#messages .user .text")).to_have_text(["remember me"])


def test_a_reload_that_cannot_reach_parley_keeps_the_conversation(serve, page):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    page.get_by_label("Message").fill("still here?")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .assistant .meta")).to_have_count(1, timeout=15_000)
    conversation_id = stored_conversation(page)

    page.route("**/get_conversation*", lambda route: route.abort("internetdisconnected"))
    page.reload()
    expect(page.get_by_role("alert")).to_contain_text("Could not reach Parley")
    assert stored_conversation(page) == conversation_id

    page.unroute("**/get_conversation*")
    page.reload()
    expect(page.locator("#chat-title")).to_have_text("Browser test")
    expect(page.locator("#messages .user .text")).to_have_text(["still here?"])
    expect(page.get_by_role("alert")).to_be_hidden()


def test_a_reload_forgets_a_conversation_that_is_gone(serve, page):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    page.evaluate(f"sessionStorage.setItem('parley.conversation', '{uuid.uuid4()}')")

    page.reload()

    expect(page.get_by_role("alert")).to_be_visible()
    expect(page.locator("#new-panel")).to_be_visible()
    assert stored_conversation(page) is None


def test_a_stream_that_breaks_shows_what_parley_kept(serve, page):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)

    def cut_after_the_first_delta(route) -> None:
        # The server streams the whole reply and stores it; the page gets only its first words.
        response = route.fetch()
        events = response.text().split("\n\n")
        first = next(n for n, event in enumerate(events) if event.startswith("event: delta"))
        route.fulfill(response=response, body="\n\n".join(events[: first + 1]) + "\n\n")

    page.route("**/chat", cut_after_the_first_delta)
    page.get_by_label("Message").fill("a reply cut short by the network")
    page.get_by_label("Message").press("Enter")

    expect(page.get_by_role("alert")).to_contain_text("connection was lost")
    expect(page.locator("#messages")).not_to_contain_text("not stored")
    stored = Support(page, base_url, secret, "").read().json()["messages"]
    assert [message["role"] for message in stored] == ["user", "assistant"]
    # The page read the conversation again and shows the stored reply in place of its copy.
    expect(page.locator("#messages .assistant .text")).to_have_text([stored[1]["content"]], timeout=10_000)
    expect(page.locator("#messages .user .text")).to_have_text(["a reply cut short by the network"])
    expect(page.locator("#messages .failed")).to_have_count(0)
    shown_seqs = page.eval_on_selector_all("#messages > .message", "items => items.map(item => Number(item.dataset.seq))")
    assert shown_seqs == [1, 2]


class StallOnceParleyHasAnswered:
    """A route for POST /chat: the server gets the message, streams its whole reply and stores it
    (asked apart from the page's request, which a stop would end); the page gets nothing and waits."""

    def __init__(self, page: Page):
        self.page = page
        self.answered = False

    def __call__(self, route) -> None:
        headers = {name: route.request.headers[name] for name in ("authorization", "content-type", "accept")}
        assert self.page.context.request.post(route.request.url, headers=headers, data=route.request.post_data).ok
        self.answered = True

    def wait(self) -> None:
        for _ in range(100):
            if self.answered:
                return
            self.page.wait_for_timeout(100)
        pytest.fail("Parley never answered")


def test_stop_gives_up_a_stalled_reply_and_shows_what_parley_kept(serve, page, tmp_path):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_hidden()
    stall = StallOnceParleyHasAnswered(page)
    page.route("**/chat", stall)

    box = page.get_by_label("Message")
    box.fill("a reply that never comes")
    box.press("Enter")
    expect(stop).to_be_visible()
    expect(stop).to_be_enabled()
    expect(page.get_by_role("button", name="Send")).to_be_hidden()  # Stop takes its place
    page.screenshot(path=str(tmp_path / "chat-stop.png"), full_page=True)
    stall.wait()
    box.press("Tab")
    expect(stop).to_be_focused()
    page.keyboard.press("Enter")

    expect(page.get_by_role("alert")).to_contain_text("You stopped the reply")
    expect(stop).to_be_hidden()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(box).to_be_focused()
    stored = Support(page, base_url, secret, "").read().json()["messages"]
    assert [message["role"] for message in stored] == ["user", "assistant"]
    expect(page.locator("#messages .assistant .text")).to_have_text([stored[1]["content"]], timeout=10_000)
    expect(page.locator("#messages .user .text")).to_have_text(["a reply that never comes"])
    expect(page.locator("#messages .failed")).to_have_count(0)
    expect(page.get_by_role("alert")).to_have_text("You stopped the reply; Parley kept what is shown.")
    assert page.console_errors == []


def test_a_reply_that_stalls_is_given_up_by_itself(serve, page):
    base_url, secret, _ = serve("echo")
    page.add_init_script("window.PARLEY_STALL_MS = 1500")  # instead of 60 s
    start_conversation(page, base_url, secret)
    page.route("**/chat", StallOnceParleyHasAnswered(page))

    page.get_by_label("Message").fill("is anyone there?")
    page.get_by_label("Message").press("Enter")

    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The reply stalled: nothing came for 1.5 s, so the page stopped waiting", timeout=10_000)
    expect(page.locator("#messages .assistant .text")).to_have_text([re.compile("is anyone there")], timeout=10_000)
    expect(alert).to_have_text("The reply stalled: nothing came for 1.5 s, so the page stopped waiting; Parley kept what is shown.")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(page.locator("#messages .failed")).to_have_count(0)


def test_a_conversation_ended_while_a_reply_is_awaited_takes_no_more_messages(serve, page):
    base_url, secret, _ = serve("echo")
    page.add_init_script("window.PARLEY_STALL_MS = 1500")
    start_conversation(page, base_url, secret)
    page.route("**/chat", lambda route: None)  # the page's request is never answered
    page.get_by_label("Message").fill("hello?")
    page.get_by_label("Message").press("Enter")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()

    page.get_by_role("button", name="End conversation").click()
    expect(page.locator("#chat-status")).to_have_text("ended")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden(timeout=10_000)  # given up as stalled

    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    expect(page.get_by_label("Message")).to_be_disabled()


def test_stop_in_the_middle_of_a_reply_shows_it_kept_incomplete(serve, page, fake_model):
    base_url, secret, _ = serve("anthropic")
    start_conversation(page, base_url, secret)
    fake_model.stream_interval = 0.3  # slow enough to stop it mid-reply

    page.get_by_label("Message").fill("tell me a long story " * 5)
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .assistant.streaming .text")).not_to_be_empty(timeout=10_000)
    page.get_by_role("button", name="Stop").click()

    expect(page.get_by_role("alert")).to_contain_text("You stopped the reply")
    # The server stored the words it had sent, marked incomplete; the page reads them back.
    expect(page.locator("#messages .assistant .meta")).to_have_text(["incomplete: the reader left before the end"], timeout=15_000)
    stored = Support(page, base_url, secret, "").read().json()["messages"]
    assert [(message["role"], message["incomplete"]) for message in stored] == [("user", False), ("assistant", True)]
    expect(page.locator("#messages .assistant .text")).to_have_text([stored[1]["content"]])
    expect(page.get_by_role("alert")).to_have_text("You stopped the reply; Parley kept what is shown.")


def test_a_lost_reply_is_read_back_for_longer_than_two_heartbeats(serve, page):
    """Parley may notice a reader that left only at its second write after the break: with a model
    that says nothing for a while, its second heartbeat, 30 s on (STREAM_HEARTBEAT_SECONDS=15).
    The page keeps reading the conversation back past that (it gave up after 10 s)."""
    base_url, secret, _ = serve("echo")
    page.clock.install()
    start_conversation(page, base_url, secret)
    # A stream that breaks before Parley stored anything: the page reads back in vain.
    page.route("**/chat", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body='event: delta\ndata: {"text": "Hel"}\n\n'))
    page.get_by_label("Message").fill("lost on the way")
    page.get_by_label("Message").press("Enter")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("reading the conversation again")
    page.clock.pause_at(page.evaluate("Date.now()") + 10)

    def run_for(seconds: int) -> None:
        for _ in range(seconds):
            page.clock.run_for(1_000)
            time.sleep(0.15)  # each read's answer, in real time, before the page plans the next

    run_for(31)
    expect(alert).to_contain_text("reading the conversation again")  # a store at the second heartbeat is still seen
    run_for(8)

    expect(alert).to_contain_text("Reload the page later to see whether Parley kept it")  # 36 s on, it gives up


@pytest.mark.parametrize("action", ["End conversation", "New conversation"])
def test_ending_or_leaving_a_conversation_stops_reading_a_lost_reply_back(serve, page, action):
    base_url, secret, _ = serve("echo")
    start_conversation(page, base_url, secret)
    conversation_id = stored_conversation(page)
    reads = []
    page.on("request", lambda request: "/get_conversation" in request.url and conversation_id in request.url
            and reads.append(request.url))
    # A stream that breaks before Parley saw the message: the page keeps reading for a reply it never stored.
    page.route("**/chat", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body='event: delta\ndata: {"text": "Hel"}\n\n'))
    page.get_by_label("Message").fill("lost on the way")
    page.get_by_label("Message").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("reading the conversation again")

    page.get_by_role("button", name=action).click()
    if action == "End conversation":
        expect(page.locator("#chat-status")).to_have_text("ended")
    else:
        expect(page.locator("#new-panel")).to_be_visible()
    read_before = len(reads)
    page.wait_for_timeout(5_000)  # a recovery reads again 1, 3, 6, 10, 15 ... s after the break

    assert len(reads) == read_before, reads
    expect(page.get_by_role("alert")).to_be_hidden()


def test_a_long_unbroken_name_fits_a_phone_screen(serve, page):
    base_url, secret, _ = serve("echo")
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(base_url + "/")
    page.get_by_label("Paste a client key").fill(secret)
    page.get_by_label("Paste a client key").press("Enter")
    page.get_by_label("Name (optional)").fill("N" * 150)
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#chat-title")).to_have_text("N" * 150)
    page.get_by_label("Message").fill("w" * 300)
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .assistant .meta")).to_have_count(1, timeout=15_000)

    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_the_page_sends_a_policy_against_inline_scripts(client):
    page = client.get("/")

    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert b"<script>" not in page.data and b"onclick" not in page.data
    assert b"https://" not in page.data and b"http://" not in page.data  # nothing from elsewhere



class DroppingProxy:
    """A TCP proxy in front of the served app whose open connections can be cut, as a network drop does."""

    def __init__(self, base_url: str):
        self.upstream = ("127.0.0.1", int(base_url.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.open += [downstream, upstream]
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drops every connection open now (new ones still go through)."""
        ends, self.open = self.open, []
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_reply_cut_short_by_a_network_drop_shows_as_kept_incomplete(serve, page, fake_model):
    base_url, secret, _ = serve("anthropic")
    proxy = DroppingProxy(base_url)
    try:
        start_conversation(page, proxy.url, secret)
        fake_model.stream_interval = 0.2  # slow enough to drop the network mid-reply

        page.get_by_label("Message").fill("tell me a long story " * 5)
        page.get_by_label("Message").press("Enter")
        expect(page.locator("#messages .assistant.streaming .text")).not_to_be_empty(timeout=10_000)
        proxy.cut()
        expect(page.get_by_role("alert")).to_contain_text("connection was lost")
        expect(page.locator("#messages")).not_to_contain_text("not stored")

        # The server stored the words it had sent, marked incomplete; the page reads them back.
        expect(page.locator("#messages .assistant .meta")).to_have_text(["incomplete: the reader left before the end"], timeout=15_000)
        stored = Support(page, base_url, secret, "").read().json()["messages"]
        assert [(message["role"], message["incomplete"]) for message in stored] == [("user", False), ("assistant", True)]
        expect(page.locator("#messages .assistant .text")).to_have_text([stored[1]["content"]])
        expect(page.locator("#messages .failed")).to_have_count(0)
    finally:
        proxy.close()
