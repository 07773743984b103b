"""Drives the console at /console/ in headless Chromium with every request off this server cut
off: sign in with the demo's master key, see the balance, sign out. Nothing may be refused by
the page's Content-Security-Policy, nothing may leave the server, and the key must never reach
a cookie, the page or browser storage.

Then buys credits by card: "Add credits" goes to the demo's fake Stripe (the one other origin
the browser may reach), pays there, comes back, and the balance shows the credit once; a refund
made at the fake's dashboard takes back exactly its amount.

Reads TOLLGATE_URL, TOLLGATE_DEMO_KEY, TOLLGATE_DEMO_STRIPE and SCREENSHOTS (a folder for a
picture of each page).
Prints one line per check; exits non-zero on the first failure.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from offline_chromium import CHROMIUM_FLAGS, only
from playwright.sync_api import expect, sync_playwright

URL = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_DEMO_KEY"]
ADMIN = os.environ["TOLLGATE_ADMIN_TOKEN"]
STRIPE = os.environ["TOLLGATE_DEMO_STRIPE"]
HOOKS = os.environ["TOLLGATE_DEMO_WEBHOOKS"]
SHOTS = Path(os.environ.get("SCREENSHOTS", "."))
ORIGIN = urlparse(URL).netloc

outside = []
failed = []
refused_by_policy = []
only_this_server = only(ORIGIN, outside)


def record_failure(request):
    """A request the network or the server failed. Chromium cancels the loads of a page it
    navigates away from and reports them as net::ERR_ABORTED: the test's clicks do that, not
    the server, so those are left out (requests to other origins, which the route aborts, are
    recorded in `outside`)."""
    if request.failure != "net::ERR_ABORTED":
        failed.append(f"{request.url} ({request.failure})")


def watched_page(browser, viewport):
    """A new context and page of this size, cut off from everything but this server, whose
    failed requests and Content-Security-Policy refusals are recorded."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.route("**/*", only_this_server)
    page.on("requestfailed", record_failure)
    page.on(
        "console",
        lambda message: refused_by_policy.append(message.text)
        if "Content Security Policy" in message.text
        else None,
    )
    return context, page


def fits(page, name):
    """No horizontal scroll at this size, and a picture of the page."""
    # Measured once the stylesheet has applied: a heading can show before it has loaded.
    page.wait_for_load_state("load")
    width = page.evaluate("document.documentElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    if width > inner:
        sys.exit(f"{name}: the page is {width}px wide in a {inner}px window")
    page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)


def available(page):
    page.goto(f"{URL}/console/")
    return int(page.locator("dd").first.get_attribute("data-nanos"))


def admin(method, path, body):
    """A management call with the admin token; its JSON answer."""
    request = urllib.request.Request(
        f"{URL}{path}",
        method=method,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def echo(key):
    """Calls the echo route with `key`: the status and the request ID it was answered with."""
    request = urllib.request.Request(f"{URL}/echo/hello", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers["x-request-id"]
    except urllib.error.HTTPError as error:
        return error.code, error.headers["x-request-id"]


def make_a_key_use_it_and_revoke_it(page):
    """The keys page: create a key, read its secret once, call with it, see the balance move,
    revoke it and see it refused."""
    before = available(page)
    page.get_by_role("link", name="Keys").click()
    expect(page.get_by_role("heading", name="Keys")).to_be_visible()
    page.get_by_label("Name").fill("from the browser")
    page.get_by_label("Scopes").fill("echo")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("heading", name="Key created")).to_be_visible()
    secret = page.locator("#secret").input_value()
    fits(page, "key-created-desktop")
    status, request_id = echo(secret)
    if status != 200:
        sys.exit("the new key's call was not answered 200")
    after = available(page)
    if not after < before:
        sys.exit(f"the balance did not move: {before} then {after}")
    print(f"desktop: made a key, called with it, the balance moved by {before - after} nanos")

    page.get_by_role("link", name="Requests").click()
    page.get_by_label("Find a request by its ID").fill(request_id)
    page.get_by_role("button", name="Find").click()
    expect(page.get_by_role("heading", name=f"Request {request_id}")).to_be_visible()
    charged = int(page.locator("dd[data-nanos]").nth(1).get_attribute("data-nanos"))
    if charged != before - after:
        sys.exit(f"the request was charged {charged}, the balance moved {before - after}")
    fits(page, "request-desktop")
    print("desktop: found the call by its request ID; it was charged what the balance moved")
    page.get_by_role("link", name="Keys").click()
    if secret in page.content():
        sys.exit("the keys page shows a secret again")
    row = page.locator("tr", has_text="from the browser")
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("tr", has_text="from the browser")).to_contain_text("revoked")
    fits(page, "keys-desktop")
    if echo(secret)[0] != 401:
        sys.exit("a revoked key was not refused")
    print("desktop: revoked the key in the console; it is refused")

    page.get_by_role("link", name="Wallet").click()
    expect(page.get_by_role("heading", name="Wallet")).to_be_visible()
    fits(page, "wallet-desktop")


def roll_a_key(page):
    """A key's page: roll it, and the new secret is shown once with a working copy button."""
    page.get_by_role("link", name="Keys").click()
    page.get_by_label("Name").fill("to roll")
    page.get_by_role("button", name="Create key").click()
    old = page.locator("#secret").input_value()
    page.get_by_role("link", name="Back to the keys").click()
    page.locator("tr", has_text="to roll").get_by_role("link", name="Edit or roll").click()
    expect(page.get_by_role("heading", name="Change it")).to_be_visible()
    fits(page, "key-desktop")
    page.get_by_role("button", name="Roll the key").click()
    expect(page.get_by_role("heading", name="Key rolled")).to_be_visible()
    expect(page.get_by_text("The previous secret keeps working until")).to_be_visible()
    new = page.locator("#secret").input_value()
    if new == old or echo(new)[0] != 200 or echo(old)[0] != 200:
        sys.exit("after a roll with a grace period, both secrets should work")
    copy = page.get_by_role("button", name="Copy the secret")
    expect(copy).to_be_visible()  # shown by the console's own script
    fits(page, "key-rolled-desktop")
    print("desktop: rolled a key; both secrets work through the grace period; the copy button shows")


def charts_and_filters(page, size):
    """The usage page draws its charts; the requests filter swaps the results in place."""
    page.goto(f"{URL}/console/usage")
    expect(page.get_by_role("heading", name="Usage")).to_be_visible()
    expect(page.locator(".charts canvas")).to_have_count(3)
    expect(page.locator("figcaption").first).to_contain_text("UTC")
    fits(page, f"usage-{size}")
    page.goto(f"{URL}/console/requests")
    page.locator("select[name=status_class]").select_option("2xx")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**status_class=2xx**")
    statuses = page.locator("#results tbody tr td:nth-child(6)").all_inner_texts()
    if not statuses or any(not s.startswith("2") for s in statuses):
        sys.exit(f"the 2xx filter showed {statuses}")
    fits(page, f"requests-{size}")
    print(f"{size}: the usage charts drew; the requests filter showed only 2xx, in place")


def a_revoked_master_key_ends_its_session(browser):
    """Sign in with a second master key, revoke it through the API: the next page is the
    sign-in page, and the key is refused on the data plane."""
    with urllib.request.urlopen(
        urllib.request.Request(f"{URL}/api/v1/key", headers={"Authorization": f"Bearer {KEY}"})
    ) as response:
        account = json.loads(response.read())["account_id"]
    made = admin(
        "POST", "/api/v1/keys", {"name": "second master", "kind": "master", "account_id": account}
    )
    context, page = watched_page(browser, (1280, 800))
    page.goto(f"{URL}/console/")
    page.get_by_label("Master key or admin token").fill(made["secret"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    admin("POST", f"/api/v1/keys/{made['id']}/revoke", {})
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    if echo(made["secret"])[0] != 401:
        sys.exit("the revoked master key was not refused")
    print("desktop: revoking the key a session was made with ended the session; the key is refused")
    context.close()


def operator_pages(browser):
    """The operator signs in with the admin token and sees every account."""
    context, page = watched_page(browser, (1280, 800))
    page.goto(f"{URL}/console/")
    page.get_by_label("Master key or admin token").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Signed in as the operator")).to_be_visible()
    page.get_by_role("link", name="Accounts").click()
    expect(page.get_by_role("heading", name="Accounts")).to_be_visible()
    fits(page, "accounts-desktop")
    page.locator("tbody a").first.click()
    expect(page.get_by_role("heading", name="Grant credits")).to_be_visible()
    fits(page, "account-desktop")
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_text("The chain holds")).to_be_visible()
    fits(page, "audit-desktop")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    print("operator: signed in with the admin token, saw the accounts, signed out")
    context.close()


def webhooks(browser):
    """Add an endpoint at the demo's receiver, see its secret once, send it a test, find the
    delivery in its log, and check the receiver got it signed."""
    context, page = watched_page(browser, (1280, 800))
    page.goto(f"{URL}/console/")
    page.get_by_label("Master key or admin token").fill(KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    page.get_by_role("link", name="Webhooks").click()
    expect(page.get_by_role("heading", name="Webhooks")).to_be_visible()
    target = f"{HOOKS}/console"
    page.get_by_label("URL (https, on the public internet)").fill(target)
    page.get_by_label("Events (names, comma-separated; empty for all)").fill("balance.low")
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.get_by_role("heading", name="Endpoint added")).to_be_visible()
    if not page.locator("#secret").input_value().startswith("whsec_"):
        sys.exit("the new endpoint's secret is not shown")
    fits(page, "webhook-secret-desktop")
    page.get_by_role("link", name="Back to the webhooks").click()
    row = page.locator("tbody tr", has_text=target)
    row.get_by_role("button", name="Send a test").click()
    expect(page.get_by_role("status")).to_contain_text("on its way")
    fits(page, "webhooks-desktop")
    page.locator("tbody tr", has_text=target).get_by_role("link", name="Deliveries").click()
    expect(page.get_by_role("heading", name="Deliveries to")).to_be_visible()
    for _ in range(50):
        if page.locator(".delivery-delivered").count() > 0:
            break
        time.sleep(0.1)
        page.reload()
        page.wait_for_load_state("load")
    expect(page.locator(".delivery-delivered").first).to_have_text("delivered")
    fits(page, "webhook-log-desktop")
    with urllib.request.urlopen(f"{HOOKS}/received") as response:
        received = json.loads(response.read())
    signed = [
        item
        for item in received
        if item["path"] == "/console" and (item["webhook_signature"] or "").startswith("v1,")
    ]
    if len(signed) != 1 or '"webhook.ping"' not in signed[0]["body"]:
        sys.exit(f"the receiver did not get one signed ping: {received}")
    print("desktop: added a webhook endpoint, saw its secret once; a test arrived signed and shows in its log")
    context.close()


def wallet_available(page):
    # Each load runs to its end (scripts included) before the next navigation, so no request
    # is cut off by the test itself.
    page.goto(f"{URL}/console/wallet")
    page.wait_for_load_state("load")
    return int(page.locator("#available").get_attribute("data-nanos"))


def add_credits_by_card(browser):
    """Add credits on the wallet page, pay at the fake Stripe, come back to the credit; then
    refund part of it at the fake's dashboard."""
    stripe_origin = urlparse(STRIPE).netloc
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    this_server = only(ORIGIN, outside)
    payment_page = only(stripe_origin, outside)
    page.route(
        "**/*",
        lambda route: payment_page(route)
        if urlparse(route.request.url).netloc == stripe_origin
        else this_server(route),
    )
    page.on("requestfailed", record_failure)
    page.on(
        "console",
        lambda message: refused_by_policy.append(message.text)
        if "Content Security Policy" in message.text
        else None,
    )
    page.goto(f"{URL}/console/")
    page.get_by_label("Master key or admin token").fill(KEY)
    page.get_by_label("Master key or admin token").press("Enter")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    page.wait_for_load_state("load")
    before = wallet_available(page)
    page.get_by_label("Credits").fill("25")
    page.get_by_role("button", name="Add credits").click()
    expect(page.get_by_role("heading", name="Fake Stripe Checkout")).to_be_visible()
    if "25.00 USD" not in page.content():
        sys.exit("the payment page does not ask for 25.00 USD")
    page.get_by_role("button", name="Pay").click()
    expect(page.locator("#returned")).to_contain_text("Payment received")
    fits(page, "wallet-paid")
    after = int(page.locator("#available").get_attribute("data-nanos"))
    if after - before != 25_000_000_000:
        sys.exit(f"paying 25 moved the balance by {after - before} nanos")
    page.reload()
    page.wait_for_load_state("load")
    if wallet_available(page) != after:
        sys.exit("the credit moved again on reload")
    print("desktop: added 25 credits by card at the payment page; the balance shows them once")

    page.goto(f"{STRIPE}/dashboard")
    page.locator("input[name=amount]").last.fill("10")
    page.get_by_role("button", name="Refund").last.click()
    expect(page.get_by_role("heading", name="Fake Stripe dashboard")).to_be_visible()
    page.wait_for_load_state("load")
    refunded = wallet_available(page)
    if after - refunded != 10_000_000_000:
        sys.exit(f"refunding 10 moved the balance by {after - refunded} nanos")
    expect(page.locator("#topups")).to_contain_text("partially_refunded")
    page.wait_for_load_state("load")
    print("desktop: refunded 10 at the payment provider; the wallet took back exactly that")
    context.close()


with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
    for size, viewport in [("desktop", (1280, 800)), ("phone", (390, 844))]:
        context, page = watched_page(browser, viewport)

        page.goto(f"{URL}/console/")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        fits(page, f"sign-in-{size}")

        # As a user would: the field, the key, Enter.
        page.get_by_label("Master key or admin token").fill(KEY)
        page.get_by_label("Master key or admin token").press("Enter")
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        expect(page.get_by_text("Available")).to_be_visible()
        fits(page, f"overview-{size}")
        print(f"{size}: signed in with the demo key and saw the balance")

        cookies = context.cookies()
        if [c["name"] for c in cookies] != ["__Host-tollgate_session"]:
            sys.exit(f"unexpected cookies: {cookies}")
        cookie = cookies[0]
        if not (cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"):
            sys.exit(f"the session cookie is not HttpOnly, Secure and SameSite=Strict: {cookie}")
        if KEY in cookie["value"] or KEY in page.content():
            sys.exit("the key is in the cookie or the page")
        script_sees = page.evaluate(
            "[document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage)]"
        )
        # htmx keeps the page's path in sessionStorage for its history; nothing else is kept.
        stored = json.loads(script_sees[2])
        if script_sees[:2] != ["", "{}"] or set(stored) - {"htmx-current-path-for-history"}:
            sys.exit(f"a script can read something: {script_sees}")
        if any(KEY in text or cookie["value"] in text for text in script_sees):
            sys.exit("the key or the session is readable by a script")
        print(f"{size}: the session is one HttpOnly, Secure, SameSite=Strict cookie; no script sees it")

        if size == "desktop":
            make_a_key_use_it_and_revoke_it(page)
            roll_a_key(page)
        charts_and_filters(page, size)
        for name in ["Keys", "Wallet"]:
            page.get_by_role("link", name=name).click()
            expect(page.get_by_role("heading", name=name)).to_be_visible()
            fits(page, f"{name.lower()}-{size}")

        # The sign-out button is reachable from the keyboard.
        sign_out = page.get_by_role("button", name="Sign out")
        sign_out.focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        if context.cookies():
            sys.exit(f"signing out left cookies: {context.cookies()}")
        print(f"{size}: signed out; the cookie is gone")
        context.close()
    a_revoked_master_key_ends_its_session(browser)
    add_credits_by_card(browser)
    webhooks(browser)
    operator_pages(browser)
    browser.close()

if refused_by_policy:
    sys.exit(f"the Content-Security-Policy refused: {refused_by_policy}")
if outside:
    sys.exit(f"the page asked for something beyond this server: {outside}")
if failed:
    sys.exit(f"requests failed: {failed}")
print("no request left this server, none failed, and the policy refused nothing")
