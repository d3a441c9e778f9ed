"""Take the README's picture of the web demo: start `streamlit run scripts/web_demo.py`, ask it
questions in a headless Chromium, open the thinking blocks, and save a 1280x900 screenshot.

    apt-get install -y chromium fonts-wqy-zenhei     # the browser, and a font with Chinese glyphs
    pip install playwright                           # drives the system chromium; no browser download
    python scripts/screenshot_web_demo.py -- --load_from out/full_sft_512.pth --open_thinking 1

Everything after `--` goes to web_demo.py as it is. The answers are the model's own, typed into the
page as a user would; nothing is prefilled. Not part of the tests (CI has no browser).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_DEMO = REPO_ROOT / "scripts" / "web_demo.py"
QUESTIONS = ["97 和 89 中较大的数是哪个？", "44 减 19 等于多少？"]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own_args = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "images" / "web_demo.png"), help="where the PNG goes")
    parser.add_argument("--question", action="append", default=None, help=f"ask this (repeatable; default: {QUESTIONS})")
    parser.add_argument("--port", type=int, default=0, help="port for streamlit (default: a free one)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser to drive")
    parser.add_argument("--answer_timeout", type=float, default=300, help="seconds to wait for each answer")
    return parser.parse_args(own_args), demo_args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"streamlit did not answer at {url} within {timeout:.0f}s")


def converse(page, questions: list[str], answer_timeout: float) -> None:
    """Type each question and wait for its answer: the finished exchange gets a Delete button."""
    for asked, question in enumerate(questions, start=1):
        box = page.get_by_test_id("stChatInputTextArea")
        box.fill(question)
        box.press("Enter")
        page.get_by_role("button", name="Delete").nth(asked - 1).wait_for(timeout=answer_timeout * 1000)
    for summary in page.locator("[data-testid='stExpander'] summary").all():  # show the thinking
        summary.click()
    page.wait_for_timeout(1000)


def main() -> None:
    args, demo_args = parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(WEB_DEMO), "--server.headless", "true",
                               "--server.port", str(port), "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
                               "--", *demo_args])
    try:
        wait_until_up(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_test_id("stChatInputTextArea").wait_for(timeout=120_000)
            converse(page, args.question or QUESTIONS, args.answer_timeout)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
        print(f"saved {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
