"""The Space in headless Chromium (Playwright + Debian's chromium): chat streams, a valid report is
accepted and a tampered one rejected, the leaderboard and a report page open. Screenshots go to
test-artifacts/. Needs what .ci/space_deps.sh installs; without it the tests are skipped, unless
DSV41_REQUIRE_BROWSER=1 (CI), where a missing browser is an error.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dsv41.audit import signing as S
from dsv41.registry.testing import free_port, reid, shared_fixture, zip_dir
from dsv41.release.identity import Identity

CHROMIUM = os.environ.get("DSV41_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _browser_available() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    return None


_missing = _browser_available()
if _missing:
    if os.environ.get("DSV41_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser tests required but {_missing}: run .ci/space_deps.sh")
    pytest.skip(f"browser tests skipped: {_missing} (run .ci/space_deps.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_tokenizer_dir):
    """valid.zip, tampered.zip, injection.zip and the auditor's identity.pub.json."""
    _, rep = shared_fixture(tmp_path_factory, tiny_tokenizer_dir)
    base = tmp_path_factory.mktemp("space_bundles")
    alice = Identity.generate(name="alice-browser")
    pub = alice.public.save(base / "identity.pub.json")
    valid = base / "valid-report"
    shutil.copytree(rep, valid)
    S.sign_report(valid, alice)
    tampered = base / "tampered-report"
    shutil.copytree(valid, tampered)
    doc = json.loads((tampered / "report.json").read_text())
    doc["created_at"] = "2001-01-01T00:00:00+00:00"  # a consistent edit: only the signature catches it
    (tampered / "report.json").write_text(json.dumps(reid(doc)))
    inj = base / "injection-report"
    shutil.copytree(rep, inj)
    doc = copy.deepcopy(json.loads((inj / "report.json").read_text()))
    doc["model"]["id"] = '<img src=x onerror="document.title=\'pwned\'">'
    (inj / "report.json").write_text(json.dumps(reid(doc)))
    S.sign_report(inj, alice)  # correctly signed: the registry's text policy must reject it
    return {"valid": zip_dir(valid, base / "valid.zip"), "tampered": zip_dir(tampered, base / "tampered.zip"),
            "injection": zip_dir(inj, base / "injection.zip"), "pub": pub,
            "report_id": json.loads((valid / "report.json").read_text())["report_id"]}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    home = tmp_path_factory.mktemp("space_home")
    port = free_port()
    env = {**os.environ, "DSV41_REGISTRY_HOME": str(home), "DSV41_SPACE_WORKDIR": str(home / "work")}
    env.pop("DATABASE_URL", None)
    env.pop("DSV41_REGISTRY_URL", None)
    log = open(home / "space.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dsv41.space.app", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (home / "space.log").read_text()[-3000:]
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Space did not start: " + (home / "space.log").read_text()[-3000:])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(space):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 1100})
        pg.set_default_timeout(60_000)
        pg.goto(space + "/")
        pg.wait_for_selector("#chat-input textarea")
        yield pg
        browser.close()


def _tab(page, name):
    page.get_by_role("tab", name=name).first.click()


def test_chat_streams(page):
    page.evaluate("""() => {
        window.__lengths = [];
        const root = document.querySelector('#chatbot');
        new MutationObserver(() => {
            const bots = root.querySelectorAll('[data-testid="bot"]');
            if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input textarea", "Tell me a short story about a king.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_selector('#chatbot [data-testid="bot"]')
    page.wait_for_selector('[data-testid="stop-button"]', state="hidden", timeout=120_000)
    page.wait_for_function("() => document.querySelector('#chatbot [data-testid=\"bot\"]').innerText.trim().length > 0")
    page.screenshot(path=str(ARTIFACTS / "space-chat.png"), full_page=True)
    lengths = page.evaluate("window.__lengths")
    distinct = sorted({n for n in lengths if n > 0})
    assert len(distinct) >= 3, f"the reply did not arrive in pieces: {lengths}"
    final = page.inner_text('#chatbot [data-testid="bot"]')
    assert len(final.strip()) > 0 and distinct[-1] >= len(final.strip()) - 5
    # the stop button ends a long reply
    page.get_by_text("Sampling and system prompt").click()
    page.get_by_label("Max new tokens").first.fill("1024")
    page.fill("#chat-input textarea", "Now a very long one, please.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 2"
                           " && document.querySelectorAll('#chatbot [data-testid=\"bot\"]')[1].innerText.trim().length > 0")
    page.click('[data-testid="stop-button"]')
    page.wait_for_selector('[data-testid="stop-button"]', state="hidden", timeout=10_000)
    stopped = page.inner_text('#chatbot [data-testid="bot"] >> nth=1')
    page.wait_for_timeout(1500)
    assert page.inner_text('#chatbot [data-testid="bot"] >> nth=1') == stopped
    page.screenshot(path=str(ARTIFACTS / "space-chat-stopped.png"), full_page=True)


def _upload(page, sel, path):
    if page.locator(f"{sel} input[type=file]").count() == 0:  # a file is shown: clear it first
        page.locator(f"{sel} button[aria-label='Clear']").first.click()
        page.wait_for_selector(f"{sel} input[type=file]", state="attached")
    page.set_input_files(f"{sel} input[type=file]", str(path))
    page.wait_for_function("([sel, name]) => document.querySelector(sel).innerText.replace(/\\s/g, '').includes(name)",
                           arg=[sel, path.name])


def _submit(page, zip_path, pub=None):
    _upload(page, "#submit-zip", zip_path)
    if pub is not None:
        _upload(page, "#submit-pub", pub)
    sel = "#submit-result [data-result]"
    before = page.get_attribute(sel, "data-nonce") if page.locator(sel).count() else None
    page.click("#submit-btn")
    page.wait_for_function("([sel, before]) => { const r = document.querySelector(sel);"
                           " return r && r.getAttribute('data-nonce') !== before; }", arg=[sel, before])
    return page.inner_text(sel)


def test_submit_valid_tampered_and_injection(page, bundles):
    _tab(page, "Submit")
    text = _submit(page, bundles["valid"], bundles["pub"])
    page.screenshot(path=str(ARTIFACTS / "space-submit-accepted.png"), full_page=True)
    assert "ACCEPTED" in text and bundles["report_id"] in text and "log index 0" in text, text
    assert page.get_attribute("#submit-result [data-result]", "data-result") == "accepted"
    text = _submit(page, bundles["tampered"])
    page.screenshot(path=str(ARTIFACTS / "space-submit-rejected.png"), full_page=True)
    assert "REJECTED" in text and "changed after it was signed" in text, text
    assert page.get_attribute("#submit-result [data-result]", "data-result") == "rejected"
    text = _submit(page, bundles["injection"])
    page.screenshot(path=str(ARTIFACTS / "space-submit-injection.png"), full_page=True)
    assert "REJECTED" in text and "model.id" in text and "possible injection" in text, text
    assert page.locator("#submit-result img").count() == 0 and page.title() != "pwned"


def test_leaderboard_and_report_page(page, bundles, space):
    _tab(page, "Reports")
    page.click("#lb-refresh")
    rid = bundles["report_id"]
    page.wait_for_function(f"() => document.querySelector('#leaderboard').innerText.includes('{rid}')")
    board = page.inner_text("#leaderboard")
    assert "alice-browser" in board and "verified" in board and "unregistered model" in board
    page.screenshot(path=str(ARTIFACTS / "space-leaderboard.png"), full_page=True)
    page.locator("#leaderboard .body-cell", has_text="alice-browser").first.click()  # the row's auditor cell
    page.wait_for_selector("#report-head [data-signature]")
    assert page.get_attribute("#report-head [data-signature]", "data-signature") == "verified"
    head = page.inner_text("#report-head")
    assert "VERIFIED" in head and "transparency log: index 0 of 1" in head
    page.screenshot(path=str(ARTIFACTS / "space-report-page.png"), full_page=True)
    # per-report page by URL
    page.goto(f"{space}/?report={rid}")
    page.wait_for_selector("#report-head [data-signature=verified]")
    assert rid[:16] in page.inner_text("#report-head")


def test_quick_audit_shows_progress_and_offers_download(page):
    _tab(page, "Audit")
    page.evaluate("""() => {
        window.__progress = [];
        window.__poll = setInterval(() => {
            const t = Array.from(document.querySelectorAll('.progress-text, .progress-level, .meta-text, .eta-bar'))
                .map(e => e.innerText).join(' | ');
            if (t.trim()) window.__progress.push(t);
        }, 100);
    }""")
    page.locator("label", has_text="xstest").first.click()  # deselect the slow generation task
    page.fill("#audit-limit input", "2")
    page.click("#audit-run")
    page.wait_for_function("() => document.querySelector('#audit-status').innerText.includes('Audit finished')",
                           timeout=180_000)
    page.evaluate("() => clearInterval(window.__poll)")
    page.screenshot(path=str(ARTIFACTS / "space-audit.png"), full_page=True)
    progress = " ".join(page.evaluate("window.__progress"))
    assert "loading the model" in progress or "audit tasks" in progress, progress[:500]
    link = page.locator("#audit-zip a").first
    assert link.get_attribute("href") and ".zip" in page.inner_text("#audit-zip").replace("\n", "")
