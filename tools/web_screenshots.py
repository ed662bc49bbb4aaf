"""Screenshots of the chat web app for docs/screenshots/: the shipped model answering in a real
conversation, at desktop (1280x800) and phone (390x844) sizes, light and dark, plus the welcome screen.

    python tools/web_screenshots.py [--model DIR] [--out docs/screenshots]

Starts `nanoseek serve` (with a fresh conversation store in a temporary folder), asks the questions below in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright),
and photographs the page. Replies are greedy (temperature 0), so a rerun shows the same answers."""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

SHIPPED = Path(__file__).parents[1] / "nanoseek" / "assets" / "model"
QUESTIONS = ["what's 58 times 23?", "What is 4821 * 37?"]  # the second one goes to the calculator
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
SETTINGS = "localStorage.setItem('nanoseek.temperature', '0');"


@contextmanager
def serve(model: Path, db: Path):
    """`nanoseek serve` in its own process (so the speeds the page shows are the server's) -> its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port),
                             "--db", str(db)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise SystemExit("nanoseek serve did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def converse(browser, url: str, out: Path) -> str:
    """The welcome screen, then the questions answered; -> the conversation's address."""
    page = browser.new_page(viewport=SIZES["desktop"], color_scheme="light", bypass_csp=True)  # (its waits evaluate strings)
    page.add_init_script(SETTINGS)
    page.goto(url)
    page.wait_for_selector("#examples .example")
    page.screenshot(path=out / "welcome-desktop-light.png")
    for q in QUESTIONS:
        page.fill("#input", q)
        page.press("#input", "Enter")
        page.wait_for_function("!state.busy", timeout=120_000)
    page.wait_for_function("location.hash.length > 1 && !document.getElementById('conv-menu').hidden")
    time.sleep(0.5)  # the last save
    address = page.url
    page.close()
    return address


def photograph(browser, address: str, out: Path) -> list[Path]:
    shots = []
    for size, viewport in SIZES.items():
        for scheme in ("light", "dark"):
            page = browser.new_page(viewport=viewport, color_scheme=scheme, bypass_csp=True)
            page.add_init_script(SETTINGS)
            page.goto(address)
            page.wait_for_selector(".msg.assistant .body")
            page.locator(".msg.assistant details.thinking").first.evaluate("d => d.open = true")  # the worked steps
            page.evaluate("document.getElementById('messages').scrollTop = 0")
            shots.append(out / f"chat-{size}-{scheme}.png")
            page.screenshot(path=shots[-1])
            page.close()
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "screenshots")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, serve(args.model, Path(tmp) / "chats.db") as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    headless=True, args=["--no-sandbox"])
        shots = photograph(browser, converse(browser, url, args.out), args.out)
        browser.close()
    for s in [args.out / "welcome-desktop-light.png", *shots]:
        print(s)


if __name__ == "__main__":
    main()
