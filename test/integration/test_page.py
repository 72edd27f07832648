# The operator page (GET /test, agent/test-page.html) in headless Chromium through Selenium,
# against emberd on fcsim: a sandbox's whole life clicked through on the page and every step
# checked in its DOM, a screenshot per step under <EMBER_BUILD>/screenshots/; and a
# cross-site form POST, sent by the browser while it holds the token cookie, refused; and the
# live sandbox list reconnecting from its last revision when its connection breaks.
# emberd's HTTP listener (127.0.0.1:7071 in emberd's network namespace) is reached through a
# relay (Emberd.tcp_port). Skips when chromium, chromedriver or python3-selenium are missing.

import base64
import hashlib
import http.server
import os
import re
import socket
import threading

import grpc
import pytest

from conftest import BUILD, SLOW, wait_for
from test_sandbox import S, code_of, create, stub

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.path.join(BUILD, "screenshots")
WAIT = 60 * SLOW  # a create or resume on a loaded machine

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    SELENIUM = None
except ImportError as err:
    SELENIUM = str(err)


@pytest.fixture
def browser():
    """A headless Chromium, quit at teardown whatever happened."""
    if SELENIUM:
        pytest.skip(f"python3-selenium is not installed ({SELENIUM})")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1440,1100", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def http_base(e):
    """The listener's address as the test reaches it, and the token emberd wrote."""
    path = os.path.join(e.run_dir, "http-token")
    wait_for(lambda: os.path.exists(path) and os.path.getsize(path) > 0, 10, "the HTTP token")
    with open(path) as f:
        token = f.read().strip()
    return f"http://127.0.0.1:{e.tcp_port(7071)}", token


class Page:
    """The page in the browser: waits on its DOM (no fixed sleeps) and screenshots."""

    def __init__(self, driver, first_shot=1):
        self.d = driver
        self.shot_no = first_shot - 1
        os.makedirs(SHOTS, exist_ok=True)

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def until(self, what, fn, timeout=WAIT):
        """Waits for fn() to be truthy; on timeout says what, with the page's errors."""
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.05,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda _: fn())
        except TimeoutException:
            self.shot("timeout")
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"errors on the page: {self.errors()}") from None

    def errors(self):
        return self.js("return [...document.querySelectorAll('.error')]"
                       ".filter(e => e.textContent).map(e => e.id + ': ' + e.textContent)")

    def text(self, css):
        return self.js("return document.querySelector(arguments[0])?.textContent ?? null", css)

    def attr(self, css, name):
        return self.js("return document.querySelector(arguments[0])?.getAttribute(arguments[1])"
                       " ?? null", css, name)

    def click(self, css):
        """A real click, once the element is there and enabled (the page re-renders rows as
        events arrive, so a stale element is looked up again)."""
        def go():
            el = self.d.find_element(By.CSS_SELECTOR, css)
            if not el.is_displayed() or not el.is_enabled():
                return False
            el.click()
            return True
        self.until(f"{css} to be clickable", go, timeout=15 * SLOW)

    def type(self, css, value):
        el = self.d.find_element(By.CSS_SELECTOR, css)
        el.clear()
        el.send_keys(value)

    def state(self, sid):
        return self.attr(f'#sandboxes tr[data-sandbox-id="{sid}"]', "data-state")

    def wait_state(self, sid, state):
        self.until(f"sandbox {sid} to be {state} on the page", lambda: self.state(sid) == state)

    def shot(self, step):
        self.shot_no += 1
        path = os.path.join(SHOTS, f"page-{self.shot_no:02d}-{step}.png")
        try:  # the whole page, not only the window (Chromium's DevTools protocol)
            # (the capture drops the scrollbar: the page is as wide as the window)
            height = self.d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            png = self.d.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": self.js("return window.innerWidth"),
                         "height": height["height"], "scale": 1}})["data"]
            with open(path, "wb") as f:
                f.write(base64.b64decode(png))
        except Exception:  # noqa: BLE001 (a screenshot is a by-product: the window will do)
            self.d.save_screenshot(path)
        return path


def sleepers():
    """Pids of `sleep 613` (the guest's processes are the host's under fcsim)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\0" + b"613\0":
                    out.append(pid)
        except OSError:
            pass
    return out


def open_page(driver, base, token, first_shot=1):
    """Opens /test?token=…: emberd sets the cookie and redirects to /test."""
    driver.get(f"{base}/test?token={token}")
    p = Page(driver, first_shot)
    p.until("the redirect to /test", lambda: driver.current_url == f"{base}/test")
    return p


def test_page_sandbox_life(start_emberd, browser):
    e = start_emberd("[network]\npool_size = 0\n")
    base, token = http_base(e)
    p = open_page(browser, base, token)

    # 01: the node, its templates, the live watch; time to first paint
    p.until("the node's facts", lambda: p.text("#node-state") == "SERVING")
    paint = p.until("the paint timings", lambda: p.js(
        "return Object.fromEntries(performance.getEntriesByType('paint')"
        ".map(e => [e.name, e.startTime]))"))
    nav = p.js("const n = performance.getEntriesByType('navigation')[0];"
               "return {redirect: n.redirectEnd - n.redirectStart, response: n.responseEnd,"
               " size: n.transferSize}")
    print(f"\n/test first paint {paint.get('first-paint', -1):.0f} ms, first contentful paint "
          f"{paint.get('first-contentful-paint', -1):.0f} ms after navigation start "
          f"(redirect {nav['redirect']:.0f} ms, page received at {nav['response']:.0f} ms, "
          f"{nav['size']} bytes)")
    assert "first-contentful-paint" in paint
    assert p.attr("#node-vmm", "data-simulated") == "true"
    assert "fcsim" in p.text("#node-vmm")
    assert not p.js("return document.getElementById('node-simulated').hidden")
    p.until("the demo template", lambda: p.attr('#templates tr[data-template-id="demo"]',
                                                "data-state") == "READY")
    p.until("the watch to be live", lambda: p.text("#watch-status") == "live")
    assert p.js("return document.querySelectorAll('#sandboxes tr').length") == 0
    assert p.errors() == []
    p.shot("node")

    # 02: create from the demo template; it turns RUNNING without a reload
    p.js("window.__noReload = true")
    p.until("the demo template in the source list",
            lambda: p.js("return [...document.getElementById('create-source').options]"
                         ".some(o => o.value === 'template:demo')"))
    p.type("#create-id", "web1")
    p.type("#create-memory", "128")
    p.click("#create-submit")
    p.wait_state("web1", "RUNNING")
    row = '#sandboxes tr[data-sandbox-id="web1"]'
    assert p.text(f'{row} [data-field="ip"]').startswith("10.200.")
    assert p.text(f'{row} [data-field="last-op"]').startswith("create ")
    assert "guest-agent" in p.text(f'{row} [data-field="last-op"]')
    p.until("the selected sandbox's details",
            lambda: p.attr("#detail", "data-sandbox-id") == "web1"
            and p.js("return document.querySelectorAll('#detail-timings [data-step]').length") > 3)
    assert p.js("return window.__noReload") is True
    p.shot("created")

    # 03: exec, its output as it streams, and the exit code
    p.type("#exec-cmd", "echo hello")
    p.click("#exec-run")
    p.until("the exec's exit", lambda: p.attr("#exec-exit", "data-exit-code") is not None)
    assert p.attr("#exec-exit", "data-exit-code") == "0", p.text("#exec-exit")
    assert p.text("#exec-exit") == "exit 0"
    assert p.text("#exec-output") == "hello\n"
    p.shot("exec")
    p.type("#exec-cmd", "echo out; echo err >&2; exit 3")
    p.click("#exec-run")
    p.until("the second exec's exit", lambda: p.attr("#exec-exit", "data-exit-code") == "3")
    assert p.text("#exec-output") in ("out\nerr\n", "err\nout\n")
    assert p.text("#exec-output .stderr") == "err\n"
    # output shows as it comes, before the command ends
    p.type("#exec-cmd", "echo first; sleep 3; echo second")
    p.click("#exec-run")
    p.until("the first line", lambda: p.text("#exec-output") == "first\n")
    assert p.attr("#exec-exit", "data-exit-code") is None
    p.until("the exit", lambda: p.attr("#exec-exit", "data-exit-code") == "0")
    assert p.text("#exec-output") == "first\nsecond\n"
    # Stop cancels the call (emberd kills the process)
    p.type("#exec-cmd", "echo sleeping; sleep 613")
    p.click("#exec-run")
    p.until("the sleeper", lambda: p.text("#exec-output") == "sleeping\n"
            and p.text("#exec-exit").startswith("running, pid") and sleepers())
    p.click("#exec-stop")
    p.until("the call stopped", lambda: p.text("#exec-exit") == "stopped")
    assert p.text("#detail-error") == ""
    wait_for(lambda: not sleepers(), 10, "the guest's sleep to be killed")

    # 04: the end time extended (UpdateSandbox, update_mask end_time), and the console
    before = p.attr("#detail-end", "data-end-time")
    start = p.js("return Math.max(Date.now(), Date.parse(arguments[0]) || 0)", before)
    p.type("#extend-minutes", "45")
    p.click("#extend-submit")
    p.until("the new end time", lambda: p.attr("#detail-end", "data-end-time") not in ("", before))
    # 45 min after the old end time, or after now when there was none
    later = p.js("return Date.parse(document.getElementById('detail-end').dataset.endTime)")
    assert abs((later - start) / 60000 - 45) < 2, (before, later, start)
    p.click("#console-show")
    p.until("the console's boot output", lambda: "ember-init" in (p.text("#console-output") or ""))
    assert p.text("#detail-error") == ""
    p.shot("console")

    # 05, 06: pause and resume from the row's buttons
    p.click(f'{row} button[data-action="pause"]')
    p.wait_state("web1", "PAUSED")
    assert p.text(f'{row} [data-field="ip"]') == "—"
    assert p.text(f'{row} [data-field="last-op"]').startswith("pause ")
    p.shot("paused")
    p.click(f'{row} button[data-action="resume"]')
    p.wait_state("web1", "RUNNING")
    p.until("the resume's timings", lambda: p.text(f'{row} [data-field="last-op"]')
            .startswith("resume "))
    p.shot("resumed")

    # 07: a snapshot of the selected sandbox
    p.click(f'{row} td')
    p.until("web1 selected", lambda: p.attr("#detail", "data-sandbox-id") == "web1")
    p.type("#snapshot-id", "snap1")
    p.click("#snapshot-create")
    snap = '#snapshots tr[data-snapshot-id="snap1"]'
    p.until("the snapshot in the list", lambda: p.attr(snap, "data-dependents") == "0")
    assert "web1" in p.text(snap)
    assert p.state("web1") == "RUNNING"
    p.shot("snapshot")

    # 08: fork: the snapshot's Fork button fills the create form
    p.click(f'{snap} button[data-action="fork"]')
    assert p.js("return document.getElementById('create-source').value") == "snapshot:snap1"
    p.type("#create-id", "web2")
    p.click("#create-submit")
    p.wait_state("web2", "RUNNING")
    assert p.text('#sandboxes tr[data-sandbox-id="web2"]').count("snapshot snap1") == 1
    p.until("the fork counted", lambda: p.attr(snap, "data-dependents") == "1")
    p.shot("forked")

    # 09: deleting the snapshot is refused while the fork exists, and the page says why
    p.click(f'{snap} button[data-action="delete"]')
    p.until("the refusal", lambda: p.text("#snapshots-error"))
    err = p.text("#snapshots-error")
    n = stub(e)
    code, details = code_of(lambda: n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="snap1"),
                                                     timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "snap1" in details
    assert err == f"FAILED_PRECONDITION (HTTP 400): {details}", err  # the node's own words
    assert p.attr("#snapshots-error", "data-status") == "FAILED_PRECONDITION"
    assert p.js("return document.getElementById('snapshots-error').offsetHeight") > 0  # visible
    assert p.attr(snap, "data-dependents") == "1"
    p.shot("delete-refused")

    # 10: destroy both; the snapshot can go once its fork is gone; the list ends empty
    p.click('#sandboxes tr[data-sandbox-id="web2"] button[data-action="destroy"]')
    p.until("web2 gone", lambda: p.state("web2") is None)
    p.until("the fork no longer counted", lambda: p.attr(snap, "data-dependents") == "0")
    p.click(f'{snap} button[data-action="delete"]')
    p.until("the snapshot gone", lambda: p.attr(snap, "data-dependents") is None)
    assert p.text("#snapshots-error") == ""
    p.click(f'{row} button[data-action="destroy"]')
    p.until("the sandbox list empty",
            lambda: p.js("return document.querySelectorAll('#sandboxes tr').length") == 0
            and p.js("return !document.getElementById('sandboxes-empty').hidden"))
    assert p.text("#sandbox-count") == "0"
    assert p.attr("#detail", "data-sandbox-id") is None  # the selection went with it
    p.until("the node's count", lambda: p.text('#node-facts [data-fact="sandboxes"]') == "0")
    assert p.js("return window.__noReload") is True  # never reloaded
    assert p.errors() == []
    p.shot("empty")
    assert list(n.ListSandboxes(S.ListSandboxesRequest(), timeout=10).sandboxes) == []
    assert list(n.ListSnapshots(S.ListSnapshotsRequest(), timeout=10).snapshots) == []


class _Evil(http.server.BaseHTTPRequestHandler):
    """Another origin (another port of 127.0.0.1): a page whose form posts to emberd by
    itself. enctype text/plain makes the body look like JSON, the classic CSRF trick."""
    target = ""

    def do_GET(self):
        body = (f'<!doctype html><form method="post" enctype="text/plain" action="{self.target}">'
                '<input type="hidden" name=\'{"sandboxId":"victim","x":"\' value=\'"}\'>'
                '</form><script>document.forms[0].submit()</script>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_cross_site_form_post_refused(start_emberd, browser):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "victim")
    base, token = http_base(e)
    p = open_page(browser, base, token, first_shot=20)  # the browser now holds the cookie
    p.until("the page to show the sandbox",
            lambda: p.state("victim") == "RUNNING" and p.text("#watch-status") == "live")

    handler = type("Evil", (_Evil,), {"target": f"{base}/v1/DestroySandbox"})
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=evil.serve_forever, daemon=True)
    t.start()
    try:
        browser.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        p.until("the form's response", lambda: browser.current_url == f"{base}/v1/DestroySandbox"
                and p.js("return document.readyState") == "complete")
        status = p.js("return performance.getEntriesByType('navigation')[0].responseStatus")
        body = p.js("return document.body.innerText")
        print(f"\ncross-site POST: HTTP {status}: {body.strip()}")
        p.shot("cross-site-refused")
    finally:
        evil.shutdown()
        evil.server_close()
        t.join()
    assert status in (401, 403), (status, body)
    assert "found" not in body
    sb = n.GetSandbox(S.GetSandboxRequest(sandbox_id="victim"), timeout=10)
    assert sb.state == S.SANDBOX_STATE_RUNNING
    # the page, opened again with the same cookie, still sees it
    browser.get(f"{base}/test")
    p.until("the sandbox still on the page", lambda: p.state("victim") == "RUNNING")


def test_watch_reconnects_from_its_revision(start_emberd, browser):
    """When the watch's connection breaks the page reconnects with the last revision it
    processed (sinceRevision) and is live again before anything changes."""
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "w1")
    base, token = http_base(e)
    p = open_page(browser, base, token, first_shot=30)
    ws = "#watch-status"
    p.until("the page to show the sandbox", lambda: p.state("w1") == "RUNNING"
            and p.text(ws) == "live")
    revision = n.ListSandboxes(S.ListSandboxesRequest(), timeout=10).revision
    assert p.attr(ws, "data-connects") == "1" and p.attr(ws, "data-since") == "0"
    for s in list(e.relays[0].socks):  # every connection through the browser's relay, cut
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    p.until("the watch's second connection", lambda: p.attr(ws, "data-connects") == "2")
    assert p.attr(ws, "data-since") == str(revision)
    p.until("the second connection live", lambda: p.text(ws) == "live", timeout=10 * SLOW)
    p.shot("watch-reconnected")
    n.DestroySandbox(S.DestroySandboxRequest(sandbox_id="w1"), timeout=60 * SLOW)
    p.until("the destroy seen through the new connection", lambda: p.state("w1") is None)
    assert p.attr(ws, "data-connects") == "2"


def test_page_shows_a_pull_in_progress(start_emberd, browser, workdir):
    """A PULLING template shows how far its download is, and turns READY on its own."""
    from pullserver import PullServer
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    art = {}
    for name, size in (("kernel", 64 << 10), ("rootfs", 8 << 20)):
        art[name] = os.path.join(workdir, name)
        with open(art[name], "wb") as f:
            f.write(os.urandom(size))
    with PullServer(netns=e.hostns) as srv:
        srv.add("/kernel", art["kernel"])
        srv.add("/rootfs", art["rootfs"], rate=1 << 20)  # about 8 s

        def remote(name):
            with open(art[name], "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            return S.RemoteArtifact(url=srv.url("/" + name), sha256=digest)

        call = n.PullTemplate(S.PullTemplateRequest(template_id="pg", kernel=remote("kernel"),
                                                    rootfs=remote("rootfs")), timeout=120)
        first = next(call)  # the pull runs
        assert first.phase == S.PULL_PHASE_DOWNLOADING
        base, token = http_base(e)
        p = open_page(browser, base, token)
        p.until("the PULLING template's progress",
                lambda: re.fullmatch(r"\d+ % of 8\.\d MiB", p.text('[data-pull="pg"]') or ""))
        assert p.attr('#templates tr[data-template-id="pg"]', "data-state") == "PULLING"
        p.shot("template-pulling")
        p.until("the pulled template to be READY on the page",
                lambda: p.attr('#templates tr[data-template-id="pg"]', "data-state") == "READY")
        assert p.text('[data-pull="pg"]') is None
        call.cancel()
