"""Retake docs/app_train.png, the README's Train-tab screenshot, with the browser test's machinery: the
Train tab after a 4-step run of the demo recipe on the bundled star. (docs/app.png shows `make demo`'s
adapter, which the tests do not train, so it is not retaken here.) Needs Chromium and ChromeDriver
(see tests/test_app.py).

    python scripts/app_screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "app_train.png"


def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BOFT_REQUIRE_BROWSER": "1",
           "BOFT_SAVE_TRAIN_SCREENSHOT": str(SCREENSHOT)}
    test = "tests/test_app.py::test_browser_trains_the_star_and_samples_it"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
