"""Retake the README's app screenshots with the browser test's machinery (needs Chromium and
ChromeDriver, see tests/test_app.py):

- docs/app_train.png: the Train tab after a 4-step run of the demo recipe on the bundled star;
- docs/app.png, with ``--demo_adapter DIR`` (``make demo``'s ``outputs/demo/adapter``): the Sample
  tab drawing "a photo of sks ohwx star" with that adapter beside the base model.

    python scripts/app_screenshots.py [--demo_adapter outputs/demo/adapter]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCREENSHOT = ROOT / "docs" / "app_train.png"
SAMPLE_SCREENSHOT = ROOT / "docs" / "app.png"


def train_tab() -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BOFT_REQUIRE_BROWSER": "1",
           "BOFT_SAVE_TRAIN_SCREENSHOT": str(TRAIN_SCREENSHOT)}
    test = "tests/test_app.py::test_browser_trains_the_star_and_samples_it"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env).returncode


def sample_tab(demo_adapter: Path) -> None:
    """Serve ``demo_adapter`` as "star", draw it beside the base model in the browser, screenshot the page."""
    sys.path.insert(0, str(ROOT / "tests"))
    from selenium.webdriver.support.ui import WebDriverWait
    from test_app import chrome, free_port, generate_with_base, pick_adapter, save_screenshot

    with tempfile.TemporaryDirectory() as scratch:
        adapters = Path(scratch) / "adapters"
        shutil.copytree(demo_adapter, adapters / "star", ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
        port = free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--adapters_dir",
                                   str(adapters)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        driver = None
        try:
            deadline = time.time() + 120
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError("the app did not start") from None
                    time.sleep(0.5)
            driver = chrome(Path(scratch) / "profile", height=1000)
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 300)
            pick_adapter(driver, wait, lambda text: text == "star")
            generate_with_base(driver, wait)
            save_screenshot(driver, Path(scratch) / "app.png", "BOFT_SAVE_SCREENSHOT")
            shutil.copy(Path(scratch) / "app.png", SAMPLE_SCREENSHOT)
        finally:
            if driver is not None:
                driver.quit()
            server.terminate()
            server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_adapter", type=Path, help="Also retake docs/app.png with this adapter folder.")
    args = parser.parse_args()
    if args.demo_adapter:
        sample_tab(args.demo_adapter)
    return train_tab() if not args.demo_adapter else 0


if __name__ == "__main__":
    sys.exit(main())
