"""The catcher's UI in a real browser: headless Chromium driven by Selenium.

The catcher runs as a real C{twistd -n smtpd --web} process (the browser
and the reactor must not share a thread); one browser serves the module.
Set C{TWISTED_SMTPD_SCREENSHOTS=DIR} to save the screenshots the docs use.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import smtplib
import tempfile
import urllib.request

import pytest

from .helpers import free_port, require_program, start_twistd, wait_for_port
from .web_helpers import PROBE_HTML, make_message

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 20  # seconds; only a ceiling for waits that normally end at once


@pytest.fixture(scope="module")
def catcher(tmp_path_factory):
    """A twistd with --web; yields (smtp_port, base_url)."""
    directory = tmp_path_factory.mktemp("catcher")
    smtp_port, web_port = free_port(), free_port()
    proc = start_twistd(
        directory,
        "--port",
        f"tcp:{smtp_port}:interface=127.0.0.1",
        "--web",
        f"tcp:{web_port}",
        "--hostname",
        "mx.test",
    )
    try:
        wait_for_port(smtp_port, proc)
        wait_for_port(web_port, proc)
        yield smtp_port, f"http://127.0.0.1:{web_port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def browser():
    require_program("chromium")
    require_program("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="smtpd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1360,860",
    ):
        options.add_argument(flag)
    service = Service(shutil.which("chromedriver") or CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(catcher, browser):
    """The UI, freshly loaded over an empty catcher, with live updates on."""
    _smtp_port, url = catcher
    _api(url, "DELETE", "/api/v1/messages")
    browser.get(url + "/")
    _wait(
        browser, lambda d: "on" in d.find_element("id", "live").get_attribute("class")
    )
    # Set in the page: if the page reloaded, it would be gone.
    browser.execute_script("window.loadedOnce = 'yes'")
    return browser


def _api(url, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        content = response.read()
        if response.headers.get("Content-Type") == "application/json":
            return json.loads(content)
        return content


def _wait(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition)


def _subjects(driver):
    # Read in one script: the list is re-rendered as live updates come in.
    return driver.execute_script(
        "return [...document.querySelectorAll('#messages .message .subject')]"
        ".map((e) => e.textContent)"
    )


def _send(smtp_port, message, recipients=None):
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
        smtp.send_message(message, to_addrs=recipients)


def _screenshot(driver, name):
    directory = os.environ.get("TWISTED_SMTPD_SCREENSHOTS")
    if directory:
        os.makedirs(directory, exist_ok=True)
        driver.save_screenshot(os.path.join(directory, name))


def test_message_appears_live_renders_sandboxed_search_and_delete(catcher, page):
    smtp_port, url = catcher
    driver = page
    _send(
        smtp_port,
        make_message(
            "Welcome aboard",
            html=PROBE_HTML,
            attachment=("terms.txt", b"the terms", "text/plain"),
        ),
        ["bob@example.org", "ops@example.net"],
    )
    _wait(driver, lambda d: _subjects(d) == ["Welcome aboard"])
    assert driver.execute_script("return window.loadedOnce") == "yes"  # no reload
    mailboxes = driver.execute_script(
        "return [...document.querySelectorAll('#mailboxes a')]"
        ".map((e) => e.textContent)"
    )
    assert any(m.startswith("ops@example.net") for m in mailboxes), mailboxes

    driver.find_element("css selector", "#messages .message").click()
    _wait(driver, lambda d: d.find_element("id", "viewer").is_displayed())
    assert driver.find_element("id", "message-subject").text == "Welcome aboard"
    frame = driver.find_element("id", "html-frame")
    sandbox = frame.get_attribute("sandbox")
    assert "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    driver.switch_to.frame(frame)
    try:
        _wait(driver, lambda d: d.find_element("tag name", "h1").text == "Welcome")
        # The script in the mail would have rewritten this and the title.
        assert driver.find_element("id", "probe").text == "script did not run"
        assert driver.execute_script("return document.title") != "script ran"
    finally:
        driver.switch_to.default_content()
    _screenshot(driver, "catcher-message.png")

    driver.find_element("id", "tab-text").click()
    _wait(driver, lambda d: "plain text" in d.find_element("id", "message-text").text)
    driver.find_element("id", "tab-raw").click()
    _wait(
        driver,
        lambda d: "Subject: Welcome aboard" in d.find_element("id", "message-raw").text,
    )
    driver.find_element("id", "tab-headers").click()
    _wait(
        driver, lambda d: "Return-Path" in d.find_element("id", "message-headers").text
    )
    driver.find_element("id", "tab-attachments").click()
    link = driver.find_element("css selector", "#message-attachments a")
    assert link.text == "terms.txt"
    assert "/part/" in link.get_attribute("href")

    # A second message; search finds each by what it contains.
    _send(smtp_port, make_message("Quarterly report", text="numbers inside"))
    _wait(driver, lambda d: _subjects(d) == ["Quarterly report", "Welcome aboard"])
    _screenshot(driver, "catcher-list.png")
    search = driver.find_element("id", "search")
    search.send_keys("subject:welcome\n")
    _wait(driver, lambda d: _subjects(d) == ["Welcome aboard"])
    search.clear()
    search.send_keys("numbers\n")
    _wait(driver, lambda d: _subjects(d) == ["Quarterly report"])
    search.clear()
    search.send_keys("\n")
    _wait(driver, lambda d: len(_subjects(d)) == 2)

    # Delete the open message: gone from the list and from the API.
    driver.find_element("id", "close-message").click()
    assert not driver.find_element("id", "viewer").is_displayed()
    driver.find_element("css selector", "#messages .message:last-child").click()
    _wait(driver, lambda d: d.find_element("id", "viewer").is_displayed())
    assert driver.find_element("id", "message-subject").text == "Welcome aboard"
    driver.find_element("id", "delete-message").click()
    _wait(driver, lambda d: _subjects(d) == ["Quarterly report"])
    assert not driver.find_element("id", "viewer").is_displayed()
    listing = _api(url, "GET", "/api/v1/messages")
    assert [m["Subject"] for m in listing["messages"]] == ["Quarterly report"]

    # Deleting elsewhere (the API) empties the page live, too.
    _api(url, "DELETE", "/api/v1/messages")
    _wait(driver, lambda d: _subjects(d) == [])
    assert driver.find_element("id", "empty").is_displayed()
    assert driver.execute_script("return window.loadedOnce") == "yes"


def test_the_probe_script_does_run_outside_the_sandbox(browser):
    """Control: the same HTML without the sandbox runs its script, so the
    check above would catch a sandbox that let scripts through."""
    encoded = base64.b64encode(PROBE_HTML.encode()).decode()
    browser.get(f"data:text/html;base64,{encoded}")
    _wait(browser, lambda d: d.find_element("id", "probe").text == "script ran")


def test_opening_the_view_url_directly_still_runs_no_script(catcher, browser):
    """The CSP sandbox header protects /view/ID.html even outside the iframe."""
    smtp_port, url = catcher
    _api(url, "DELETE", "/api/v1/messages")
    _send(smtp_port, make_message("direct", html=PROBE_HTML))
    [message] = _api(url, "GET", "/api/v1/messages")["messages"]
    browser.get(f"{url}/view/{message['ID']}.html")
    _wait(browser, lambda d: d.find_element("tag name", "h1").text == "Welcome")
    assert browser.find_element("id", "probe").text == "script did not run"


def test_release_from_the_ui(catcher, page):
    """Release the open message to an SMTP server: here the catcher itself."""
    smtp_port, url = catcher
    driver = page
    _send(smtp_port, make_message("to be released"))
    _wait(driver, lambda d: _subjects(d) == ["to be released"])
    driver.find_element("css selector", "#messages .message").click()
    _wait(driver, lambda d: d.find_element("id", "viewer").is_displayed())
    driver.find_element("id", "release-message").click()
    _wait(driver, lambda d: d.find_element("id", "release-dialog").is_displayed())
    driver.find_element("id", "release-to").send_keys("again@example.org")
    driver.find_element("id", "release-relay").send_keys(f"127.0.0.1:{smtp_port}")
    driver.find_element("id", "release-send").click()
    status = "return document.getElementById('release-status').textContent"
    _wait(driver, lambda d: d.execute_script(status) == "Sent.")
    _wait(driver, lambda d: _subjects(d) == ["to be released", "to be released"])
    boxes = _api(url, "GET", "/api/v1/mailboxes")
    assert {"Name": "again@example.org", "Total": 1, "Unread": 1} in boxes
