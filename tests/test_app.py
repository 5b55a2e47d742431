"""The app: generation callback, safety of uploads and paths, the HTTP API, and a real browser (sampling,
and training the bundled star from the Train tab)."""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import boft_diffusion as bd
from boft_diffusion.app.studio import NO_ADAPTER, GenerationRequest, Limits, Studio, StudioError, png_with_parameters
from boft_diffusion.app.training_runs import RUNS_FOLDER
from boft_diffusion.tiny.bundled import example_subject_dir
from conftest import randomize_adapter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, request):
    """Adapters made without training: random BOFT values on the tiny model, and one for another model.
    The Train tab's class images persist in pytest's cache (see class_image_cache)."""
    root = tmp_path_factory.mktemp("adapters")
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    bd.apply_boft(pipe.unet, bd.BOFTConfig(block_size=8, n_butterfly_factor=2))
    randomize_adapter(pipe.unet, scale=0.5)
    bd.save_adapter(pipe.unet, root / "star", metadata={"instance_prompt": "a photo of sks star", "train_steps": 7})
    shutil.copytree(root / "star", root / "other_model")  # the same adapter, reshaped as for a wider model
    tensors = load_file(root / "other_model" / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("to_q.boft_R"))[0]
    tensors[key] = torch.zeros(2, tensors[key].shape[1] * 2, 8, 8)
    save_file(tensors, root / "other_model" / "adapter_model.safetensors")
    (root / "star" / "checkpoint-1").mkdir()
    shutil.copy(root / "star" / "adapter_config.json", root / "star" / "checkpoint-1")
    with class_image_cache(root / RUNS_FOLDER, request.config.cache.mkdir("boft_class_images")):
        yield root


@contextlib.contextmanager
def class_image_cache(runs: Path, cache: Path):
    """Class image folders of the app's runs, kept between test sessions: a folder is named after what
    draws its pictures (model, class prompt, preset file), and a run tops up a short one itself, as
    `make demo` does with outputs/demo/class_images; so only a machine's first session draws the demo
    recipe's 160 (a minute on an idle 2-core CPU, a quarter of an hour on a busy one)."""
    for folder in cache.iterdir():
        shutil.copytree(folder, runs / folder.name, ignore=shutil.ignore_patterns(".*"))
    yield
    for folder in runs.glob("class-*"):
        shutil.copytree(folder, cache / folder.name, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)


@pytest.fixture(scope="module")
def studio(adapters_dir):
    return Studio("tiny", adapters_dir, Limits(max_size=128, max_steps=10, max_images=2))


def request(**changes):
    values = dict(prompt="a photo of sks star on a blue background", steps=2, seed=3)
    values.update(changes)
    return GenerationRequest(**values)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_lists_adapters_but_not_checkpoints(studio):
    assert studio.list_adapters() == [NO_ADAPTER, "other_model", "star"]


def test_generate_base_adapter_compare_and_strength(studio):
    base = studio.generate(request())
    assert len(base) == 1 and base[0][0].size == (64, 64)
    adapted = studio.generate(request(adapter="star"))
    assert np.abs(pixels(adapted[0][0]) - pixels(base[0][0])).mean() > 1
    compared = studio.generate(request(adapter="star", compare_with_base=True, num_images=2))
    assert [json.loads(p)["rendered"] for _, p in compared] == ["base", "base", "adapter", "adapter"]
    assert np.array_equal(pixels(compared[0][0]), pixels(base[0][0]))
    assert np.array_equal(pixels(compared[2][0]), pixels(adapted[0][0]))
    zero = studio.generate(request(adapter="star", strength=0.0))
    assert np.array_equal(pixels(zero[0][0]), pixels(base[0][0]))
    again = studio.generate(request(adapter="star"))
    assert np.array_equal(pixels(again[0][0]), pixels(adapted[0][0])), "switching must not drift the base weights"


def test_learned_identifier_follows_the_selected_adapter_and_its_strength(adapters_dir, tmp_path):
    shutil.copytree(adapters_dir / "star", tmp_path / "star_id", ignore=shutil.ignore_patterns("checkpoint-*"))
    save_file({"sks": torch.randn(128, generator=torch.Generator().manual_seed(0))},
              tmp_path / "star_id" / "learned_embeds.safetensors")
    shutil.copytree(adapters_dir / "star", tmp_path / "star", ignore=shutil.ignore_patterns("checkpoint-*"))
    studio = Studio("tiny", tmp_path, Limits(max_size=128, max_steps=10, max_images=2))
    base = pixels(studio.generate(request())[0][0])
    plain = pixels(studio.generate(request(adapter="star"))[0][0])
    with_identifier = pixels(studio.generate(request(adapter="star_id"))[0][0])
    assert np.abs(with_identifier - plain).mean() > 1
    assert np.array_equal(pixels(studio.generate(request(adapter="star"))[0][0]), plain)
    assert np.array_equal(pixels(studio.generate(request(adapter="star_id", strength=0.0))[0][0]), base)
    assert np.array_equal(pixels(studio.generate(request())[0][0]), base)


def test_parameters_travel_in_png(studio):
    image, parameters = studio.generate(request(adapter="star", scheduler="DPM++ 2M"))[0]
    data = png_with_parameters(image, parameters)
    saved = json.loads(Image.open(io.BytesIO(data)).text["parameters"])
    assert saved["adapter"] == "star" and saved["scheduler"] == "DPM++ 2M" and saved["seed"] == 3


def test_limits_are_clamped(studio):
    clamped = studio.clamp(request(width=10_000, height=3, steps=500, num_images=50, strength=9))
    assert (clamped.width, clamped.height, clamped.steps, clamped.num_images, clamped.strength) == (128, 8, 10, 2, 1.5)


def test_errors_are_readable_and_app_survives(studio, adapters_dir):
    with pytest.raises(StudioError, match="to_q.*another model"):
        studio.generate(request(adapter="other_model"))
    with pytest.raises(StudioError, match="outside"):
        studio.generate(request(adapter="../../etc"))
    with pytest.raises(StudioError, match="scheduler"):
        studio.generate(request(scheduler="nope"))
    assert studio.generate(request(adapter="star"))[0][0].size == (64, 64)
    info = studio.adapter_info("star")
    assert info["trigger_prompt"] == "a photo of sks star" and info["boft"]["n_butterfly_factor"] == 2
    assert info["trainable_parameters"] > 0 and info["training_steps"] == 7


def test_the_model_card_is_shown_without_front_matter_or_pictures(adapters_dir, tmp_path):
    shutil.copytree(adapters_dir / "star", tmp_path / "carded", ignore=shutil.ignore_patterns("checkpoint-*"))
    (tmp_path / "carded" / "README.md").write_text("---\nbase_model: tiny\n---\n# BOFT adapter\n\n"
                                                    "![validation samples](validation/latest.png)\nTrigger: `sks`\n")
    studio = Studio("tiny", tmp_path)
    card = studio.adapter_card("carded")
    assert card.startswith("# BOFT adapter") and "Trigger: `sks`" in card
    assert "base_model" not in card and "![" not in card
    assert studio.adapter_card(NO_ADAPTER) == ""


def zip_bytes(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_uploads(studio, adapters_dir, tmp_path):
    config = (adapters_dir / "star" / "adapter_config.json").read_bytes()
    weights = (adapters_dir / "star" / "adapter_model.safetensors").read_bytes()
    good = tmp_path / "mystar.zip"
    good.write_bytes(zip_bytes({"mystar/adapter_config.json": config, "mystar/adapter_model.safetensors": weights}))
    name = studio.import_upload([good])
    assert name in studio.list_adapters()
    assert studio.generate(request(adapter=name))[0][0].size == (64, 64)

    traversal = tmp_path / "evil.zip"
    traversal.write_bytes(zip_bytes({"../evil/adapter_config.json": config}))
    with pytest.raises(StudioError, match="unsafe path"):
        studio.import_upload([traversal])
    pickle = tmp_path / "pickle.zip"
    pickle.write_bytes(zip_bytes({"adapter_config.json": config, "adapter_model.bin": b"\x80\x04"}))
    with pytest.raises(StudioError, match="only JSON"):
        studio.import_upload([pickle])
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "adapter_config.json").write_bytes(config)
    (pair / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(StudioError, match="not a valid safetensors"):
        studio.import_upload([pair / "adapter_config.json", pair / "adapter_model.safetensors"])
    small = Studio("tiny", adapters_dir, Limits(max_upload_bytes=100))
    with pytest.raises(StudioError, match="limit"):
        small.import_upload([good])
    assert not any(p.name.startswith(".upload-") for p in (adapters_dir / "uploads").iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapters_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--adapters_dir",
                                str(adapters_dir), "--max_steps", "10"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while True:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "the app did not start in 120 s"
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/"
    process.terminate()
    process.wait(timeout=30)


def readme_section_code(title: str) -> str:
    """The first python block under the README heading ``title``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_gradio_client_call_generates(server):
    """The README's "Use the app from Python" call, against this server (at most 10 steps) and its adapter "star"."""
    code = readme_section_code("Use the app from Python")
    here = {"http://127.0.0.1:7860/": server, '"demo/adapter"': '"star"', "steps=25": "steps=5"}
    namespace: dict = {}
    for readme_value, test_value in here.items():
        assert readme_value in code
        code = code.replace(readme_value, test_value)
    exec(code, namespace)
    gallery, files = namespace["gallery"], namespace["files"]
    assert len(gallery) == 2 and len(files) == 2  # "compare with base": base and adapter
    saved = Image.open(files[1])
    assert json.loads(saved.text["parameters"])["adapter"] == "star"


BROWSER_INSTALL = "apt-get install chromium chromium-driver"
#: CI sets this, so that a missing browser fails the run instead of skipping the test.
REQUIRE_BROWSER = "BOFT_REQUIRE_BROWSER"


def browser_paths() -> tuple[str, str]:
    """Chromium and ChromeDriver on PATH; else skip (or fail where REQUIRE_BROWSER is set) saying how to install them."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and chromedriver:
        return chromium, chromedriver
    missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path)
    message = f"the browser test needs {missing} on PATH: `sudo {BROWSER_INSTALL}` (Debian/Ubuntu)"
    if os.environ.get(REQUIRE_BROWSER):
        pytest.fail(f"{message}; {REQUIRE_BROWSER} is set, so it may not be skipped")
    pytest.skip(message)


def image_from_src(src: str) -> Image.Image:
    """The picture an <img> shows: a data: URL decoded, or the app's file URL fetched."""
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    with urllib.request.urlopen(src, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def gallery_images(driver) -> list[Image.Image] | bool:
    """The gallery's base and adapter pictures, once both are shown; False before."""
    sources = [img.get_attribute("src") for img in driver.find_elements("css selector", "#gallery img")]
    return [image_from_src(src) for src in sources] if len(sources) == 2 and all(sources) else False


def chrome(profile: Path, height: int = 1500):
    """A headless Chromium driven by Selenium (skipped without one; see browser_paths)."""
    chromium, chromedriver = browser_paths()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size=1280,{height}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


def pick_adapter(driver, wait, matches) -> None:
    """Open the adapter dropdown and choose the first option whose text ``matches``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#adapter input"))).click()
    wait.until(lambda d: next((li for li in d.find_elements(By.CSS_SELECTOR, "ul.option-list li")
                               if matches(li.text)), False)).click()
    wait.until(lambda d: matches(d.find_element(By.CSS_SELECTOR, "#adapter input").get_attribute("value")))


def generate_with_base(driver, wait) -> tuple[np.ndarray, np.ndarray]:
    """Tick "compare with base", generate, and return the base and adapter pictures."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#compare input").click()
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    base, adapted = (np.asarray(image, dtype=float) for image in wait.until(gallery_images))
    assert base.shape == adapted.shape == (64, 64, 3), "the tiny model's default size"
    assert min(base.std(), adapted.std()) > 20, "a generated picture, not a blank one"
    return base, adapted


def save_screenshot(driver, path: Path, variable: str) -> None:
    """The page from its top, copied to the file the environment variable names (docs screenshots)."""
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    if os.environ.get(variable):
        shutil.copy(path, os.environ[variable])


@pytest.mark.slow
def test_browser_picks_adapter_and_generates(server, tmp_path):
    """In a real browser: pick the adapter, ask for the base beside it, and see two generated
    pictures (decoded from the page's <img>s) that the adapter tells apart."""
    driver = chrome(tmp_path / "profile")
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        pick_adapter(driver, wait, lambda text: text == "star")
        base, adapted = generate_with_base(driver, wait)
        assert np.abs(base - adapted).mean() > 10, "the adapter changes the picture drawn from the same seed"
        save_screenshot(driver, tmp_path / "app.png", "BOFT_SAVE_SCREENSHOT")
    finally:
        driver.quit()


STAR = example_subject_dir()
#: Long enough for the demo recipe's 160 class images where no earlier session drew them (class_image_cache).
TRAINING_TIMEOUT = 2400


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    next(tab for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text.strip() == name).click()


@pytest.mark.slow
def test_browser_trains_the_star_and_samples_it(server, tmp_path):
    """In a real browser: upload the bundled star (images and captions), train 4 steps of the demo
    recipe, watch the steps go by, reload and find the run again, then sample with its adapter."""
    driver = chrome(tmp_path / "profile", height=1150)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "button[role=tab]")))
        open_tab(driver, "Train")
        upload = wait.until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#train_files input[type=file]")))
        upload.send_keys("\n".join(str(path) for path in sorted(STAR.iterdir())))
        wait.until(lambda d: "on a green background" in d.find_element(By.CSS_SELECTOR, "#captions").text)
        assert "a photo of sks ohwx star" in driver.find_element(By.CSS_SELECTOR, "#prompts").text
        steps = driver.find_element(By.CSS_SELECTOR, "#train_steps input")
        steps.clear()
        steps.send_keys("4")
        driver.find_element(By.CSS_SELECTOR, "#train").click()

        seen: set[int] = set()

        def finished(d) -> bool:
            text = d.find_element(By.CSS_SELECTOR, "#run_status").text
            seen.update(int(step) for step in re.findall(r"step (\d+) of 4", text))
            assert "failed" not in text, text
            return "finished" in text

        WebDriverWait(driver, TRAINING_TIMEOUT, poll_frequency=0.2).until(finished)
        assert 4 in seen and min(seen) < 4, f"the steps shown: {sorted(seen)}"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#validation img"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#run_download a"))
        run_id = parse_qs(urlparse(driver.current_url).query)["run"][0]
        assert re.fullmatch(r"[0-9a-f]{32}", run_id)
        save_screenshot(driver, tmp_path / "app_train.png", "BOFT_SAVE_TRAIN_SCREENSHOT")

        driver.refresh()  # the address bar holds the run: the reloaded page reconnects to it
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "button[role=tab]")))
        open_tab(driver, "Train")
        wait.until(lambda d: run_id[:8] in d.find_element(By.CSS_SELECTOR, "#run_status").text)
        open_tab(driver, "Sample")
        pick_adapter(driver, wait, lambda text: text == f"trained: run {run_id[:8]}")
        base, adapted = generate_with_base(driver, wait)
        assert np.abs(base - adapted).mean() > 0.5, "the trained adapter changes the picture drawn from the same seed"
    finally:
        driver.quit()


@pytest.mark.slow
def test_gradio_client_trains_and_samples_and_another_visitor_sees_nothing(server):
    """The Train tab through the API: preview the images, train 3 steps, poll the status until the run
    finishes, sample with its adapter; a second client (another visitor) has no run and cannot use it."""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    files = [handle_file(str(path)) for path in sorted(STAR.iterdir())]
    table = client.predict(files=files, api_name="/preview_images")
    assert [row[0] for row in table["data"]] == [f"sks_star_0{i}.png" for i in range(5)]
    run_id = client.predict(files=files, table=table, identifier="sks ohwx", class_noun="star", preset="demo",
                            steps=3, rate=2e-3, api_name="/train")
    deadline, statuses = time.monotonic() + TRAINING_TIMEOUT, []
    while "finished" not in (statuses or [""])[-1]:
        assert time.monotonic() < deadline and "failed" not in (statuses or [""])[-1], statuses[-3:]
        statuses.append(client.predict(api_name="/training_status")[0])
        time.sleep(1)
    assert statuses[-1].startswith(f"run `{run_id[:8]}`") and "step 3 of 3" in statuses[-1]

    adapter = f".runs/{run_id}/adapter"
    other = Client(server, verbose=False)
    assert other.predict(api_name="/training_status")[0] == "no run yet"
    assert other.predict(api_name="/cancel_training") == "no run to cancel"
    call = dict(prompt="a photo of sks ohwx star on a blue background", negative="", strength=1.0, seed=0, steps=5,
                guidance=4.0, scheduler="DDIM", width=64, height=64, count=1, compare=True, control_image=None,
                control_strength=1.0, api_name="/generate")
    with pytest.raises(Exception, match="not in the list of choices"):
        other.predict(adapter=adapter, **call)
    gallery, _ = client.predict(adapter=adapter, **call)
    base, adapted = (np.asarray(Image.open(item["image"]).convert("RGB"), dtype=float) for item in gallery)
    assert np.abs(base - adapted).mean() > 0.5, "the trained adapter changes the picture drawn from the same seed"

    exported = client.predict("lora", api_name="/export_run")
    with zipfile.ZipFile(exported) as archive:
        assert any(name.endswith("-lora.safetensors") for name in archive.namelist()), archive.namelist()
    with pytest.raises(Exception, match="no run yet"):
        other.predict("diff", api_name="/export_run")


def test_the_app_exports_what_the_export_command_writes(adapters_dir, tmp_path):
    """Studio.export writes from the model it serves (no second copy) the same files as
    python -m boft_diffusion.export does from a fresh pipeline; a format the adapter cannot take is
    refused with the reason."""
    from boft_diffusion.export import export_adapter

    studio = Studio("tiny", adapters_dir, Limits(max_steps=2))
    studio.generate(GenerationRequest(prompt="a photo of star", adapter="star", steps=1))  # another adapter state
    for fmt in ("diff", "lora"):
        archive = studio.export("star", tmp_path, "star", fmt)
        with zipfile.ZipFile(archive) as files:
            name = next(n for n in files.namelist() if n.endswith(f"{fmt}.safetensors"))
            files.extract(name, tmp_path / "app")
        ours = load_file(tmp_path / "app" / name)
        expected = load_file(export_adapter(adapters_dir / "star", fmt, tmp_path / f"cli-{fmt}.safetensors").paths[0])
        assert ours.keys() == expected.keys() and all(torch.allclose(ours[k], expected[k], atol=1e-6) for k in ours)
    with pytest.raises(StudioError, match="cannot export 'star' as lycoris"):
        studio.export("star", tmp_path, "star", "lycoris")
    with pytest.raises(StudioError, match="unknown export format"):
        studio.export("star", tmp_path, "star", "merged")
