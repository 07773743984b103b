"""Drives the Swagger UI at /api/docs in headless Chromium with every request off this server cut
off: the page must render from the binary alone, and "Try it out" must work against the demo.

Reads TOLLGATE_URL, TOLLGATE_DEMO_KEY and SCREENSHOT (where to save a picture of the page).
Prints one line per check; exits non-zero on the first failure.
"""

import json
import os
import sys
import urllib.request
from urllib.parse import urlparse

from openapi_spec_validator import validate
from offline_chromium import CHROMIUM_FLAGS, only
from playwright.sync_api import expect, sync_playwright

URL = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_DEMO_KEY"]
ORIGIN = urlparse(URL).netloc

# The document validates against the OpenAPI 3.1 specification (schema and semantic rules).
with urllib.request.urlopen(f"{URL}/api/openapi.json") as response:
    document = json.load(response)
validate(document)
print(f"openapi.json is valid OpenAPI {document['openapi']}: {len(document['paths'])} paths")

outside = []
only_this_server = only(ORIGIN, outside)


with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
        executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS
    )
    page = browser.new_page(viewport={"width": 1280, "height": 2000})
    page.route("**/*", only_this_server)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{URL}/api/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Tollgate", timeout=20000)
    operations = page.locator(".opblock")
    expect(operations.first).to_be_visible()
    print(f"the UI rendered {operations.count()} operations")

    # Authorize with the demo's master key, as a user would: the dialog, the key, Authorize.
    page.locator("button.authorize").first.click()
    dialog = page.locator(".dialog-ux .modal-ux")
    name = page.locator("h4 code").get_by_text("api_key", exact=True)
    scheme = dialog.locator(".auth-container").filter(has=name)
    scheme.locator("input").fill(KEY)
    scheme.locator("button.authorize").click()
    expect(scheme.get_by_text("Logout")).to_be_visible()
    scheme.locator("button.btn-done").click()
    print("authorized with the demo key")

    # Try it out: the balance, a GET with the key.
    balance = page.locator("#operations-billing-balance")
    balance.locator(".opblock-summary").click()
    balance.get_by_role("button", name="Try it out").click()
    balance.get_by_role("button", name="Execute").click()
    status = balance.locator(".live-responses-table .response .response-col_status").first
    expect(status).to_have_text("200", timeout=20000)
    body = balance.locator(".live-responses-table .response-col_description pre").first
    expect(body).to_contain_text('"available"')
    print("try it out: GET /api/v1/billing/balance answered 200 with the wallet")

    # Try it out: create a key, a POST whose body is the document's example.
    create = page.locator("#operations-keys-create_key")
    create.locator(".opblock-summary").click()
    create.get_by_role("button", name="Try it out").click()
    create.get_by_role("button", name="Execute").click()
    status = create.locator(".live-responses-table .response .response-col_status").first
    expect(status).to_have_text("201", timeout=20000)
    expect(create.locator(".live-responses-table .response-col_description pre").first).to_contain_text(
        '"secret"'
    )
    print("try it out: POST /api/v1/keys with the example body answered 201 with the new key")

    page.screenshot(path=os.environ.get("SCREENSHOT", "swagger-ui.png"), full_page=False)
    browser.close()

if errors:
    sys.exit(f"the page raised: {errors}")
if outside:
    sys.exit(f"the page asked for something beyond this server: {outside}")
print("no request left this server")
