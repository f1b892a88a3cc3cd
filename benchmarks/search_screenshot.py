"""A screenshot of the ``florence serve`` page, taken in headless Chromium (the README's picture).

    python -m florence.benchmarks.search_screenshot --db /tmp/fmnist_web.db --collection fmnist \\
        --model runs/demo/pretrain/final --out docs/search_screenshot.png --query "a photo of a Bag" --fmnist 2000

starts the app (:func:`florence.search.webapp.create_app`) on a free localhost port, loads the page in Debian's
``chromium`` driven by ``chromedriver`` through selenium, types the query, waits for the result grid and saves a
``--width`` x ``--height`` PNG. ``--fmnist N`` first writes the first N Fashion-MNIST test images as PNGs
(``florence.benchmarks.fmnist_files``) beside the database, indexes them and tags them zero-shot with the class names, when the collection does not exist
yet.

A browser that downloads its own build cannot run here; Debian's ``chromium`` and ``chromium-driver`` packages can
(``apt-get install chromium chromium-driver``). :func:`chromium_driver` is shared with the page's test.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path


from florence.benchmarks.fmnist_files import write_fashion_mnist_files
from florence.data.sources import FASHION_MNIST_CLASSES
from florence.errors import FlorenceError
from florence.search import Index
from florence.search.webapp import background_server, create_app

__all__ = ["CHROMIUM", "CHROMEDRIVER", "chromium_missing", "chromium_driver", "run_query", "main"]

CHROMIUM = os.environ.get("FLORENCE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FLORENCE_CHROMEDRIVER", "/usr/bin/chromedriver")


def chromium_missing() -> str | None:
    """Why a headless Chromium cannot be driven here (None when it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {package})"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    return None


def chromium_driver(width: int = 1100, height: int = 800):
    """A selenium WebDriver on headless Debian Chromium with a ``width`` x ``height`` viewport; quit it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="florence-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}",
                f"--user-data-dir={profile}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the page's viewport exactly, not the window's
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.set_page_load_timeout(30)
    quit_driver = driver.quit

    def quit_and_clean():
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


def run_query(driver, url: str, query: str, filter: str = "", top_k: int | None = None, timeout: float = 30):
    """Load the page at ``url``, search ``query`` and wait until the grid holds result cards and their thumbnails
    have loaded; the card elements."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: "items" in d.find_element(By.ID, "info").text)
    driver.find_element(By.ID, "text").send_keys(query)
    if filter:
        driver.find_element(By.ID, "filter").send_keys(filter)
    if top_k is not None:
        box = driver.find_element(By.ID, "top-k")
        box.clear()
        box.send_keys(str(top_k))
    driver.find_element(By.ID, "search-button").click()
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result")
               or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    status = driver.find_element(By.ID, "status")
    if "error" in status.get_attribute("class"):
        raise RuntimeError(f"the page reports: {status.text}")
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results .result img')].every(i => i.complete && i.naturalWidth > 0)"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m florence.benchmarks.search_screenshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="Milvus Lite path (*.db) or server URI")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--model", required=True, help="the model bundle that built the collection")
    parser.add_argument("--out", default="docs/search_screenshot.png")
    parser.add_argument("--query", default="a photo of a Bag")
    parser.add_argument("--filter", default="")
    parser.add_argument("--top-k", type=int, default=24)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--fmnist", type=int, default=0, metavar="N",
                        help="index N Fashion-MNIST test images first, when the collection does not exist")
    args = parser.parse_args(argv)
    missing = chromium_missing()
    if missing:
        print(f"error: cannot take the screenshot: {missing}", file=sys.stderr)
        return 2
    try:
        with Index(args.db, args.collection, model=args.model) as index:
            if args.fmnist and not index.store.exists():
                table = write_fashion_mnist_files(Path(args.db).absolute().parent / f"{args.collection}_png",
                                                  splits=("test",), limit=args.fmnist)
                print(index.add(table, workers=0).text())
                print(index.tag(list(FASHION_MNIST_CLASSES)).text())  # zero-shot tags, so the cards show some
            app = create_app(index, allow_index=False)
            driver = chromium_driver(args.width, args.height)
            try:
                with background_server(app) as url:
                    cards = run_query(driver, url + "/", args.query, args.filter, args.top_k)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    except FlorenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(cards)} results for {args.query!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
