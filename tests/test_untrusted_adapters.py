"""The app shares one base model with every visitor (issue 16): untrusted adapter files, control
folders and uploads must never change it, exhaust the server or reveal its paths."""

import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import app
import boft_diffusion as bd
from boft_diffusion.app.studio import NO_ADAPTER, GenerationRequest, Limits, Studio, StudioError
from boft_diffusion.app.uploads import UPLOADS_FOLDER, folder_bytes
from boft_diffusion.control.networks import CONTROLNET, ENCODER_CONFIG, LIGHT, controlnet_from_unet, encoder_for_unet
from boft_diffusion.core.adapters import boft_layers
from boft_diffusion.core.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from boft_diffusion.families.loading import quiet_progress
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.outputs.write import CONTROL_INFO, save_control
from conftest import make_tiny_unet, randomize_adapter, run_unet, unet_inputs

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bitwise_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


def saved_adapter(folder: Path, bias: str = "none") -> Path:
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION, bias=bias))
    randomize_adapter(unet)
    bd.save_adapter(unet, folder)
    return folder


def add_tensor(folder: Path, key: str, tensor: torch.Tensor) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors[key] = tensor
    save_file(tensors, folder / WEIGHTS_NAME)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


# 1. the shared base ------------------------------------------------------------------------------------
def test_undeclared_bias_is_refused_before_any_weight_is_touched(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    add_tensor(folder, "base_model.model.conv_out.bias", torch.full((4,), 3.0))
    unet = make_tiny_unet()
    before = snapshot(unet)
    with pytest.raises(ValueError, match="conv_out.bias.*bias='none'"):
        bd.load_adapter(unet, folder)
    assert_bitwise_equal(unet, before)
    assert not list(boft_layers(unet))


def test_undeclared_module_and_unknown_tensor_are_refused(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    add_tensor(folder, "base_model.model.conv_in.boft_R", torch.zeros(1, 9, 4, 4))
    with pytest.raises(ValueError, match="target_modules.*conv_in"):
        bd.load_adapter(make_tiny_unet(), folder)
    folder = saved_adapter(tmp_path / "b")
    add_tensor(folder, "base_model.model.conv_out.weight", torch.zeros(4, 32, 3, 3))
    with pytest.raises(ValueError, match="conv_out.weight"):
        bd.load_adapter(make_tiny_unet(), folder)


def test_trained_biases_are_a_shift_owned_by_the_adapter(tmp_path):
    folder = saved_adapter(tmp_path / "a", bias="all")
    add_tensor(folder, "base_model.model.conv_out.bias", torch.full((4,), 3.0))
    unet = make_tiny_unet()
    inputs = unet_inputs()
    before, base_output = snapshot(unet), run_unet(unet, inputs)
    bd.load_adapter(unet, folder)
    adapted = run_unet(unet, inputs)
    assert (adapted - base_output).abs().mean() > 1
    bd.disable_adapters(unet)
    assert torch.equal(run_unet(unet, inputs), base_output)
    bd.enable_adapters(unet)
    bd.set_adapter_strength(unet, 0.0)
    assert torch.allclose(run_unet(unet, inputs), base_output, atol=1e-6)
    bd.set_adapter_strength(unet, 1.0)
    bd.save_adapter(unet, tmp_path / "again")
    assert torch.equal(load_file(tmp_path / "again" / WEIGHTS_NAME)["base_model.model.conv_out.bias"],
                       torch.full((4,), 3.0))
    bd.delete_adapter(unet, "default")
    assert_bitwise_equal(unet, before)
    assert torch.equal(run_unet(unet, inputs), base_output)


@pytest.fixture(scope="module")
def tiny_pipe():
    return quiet_progress(bd.load_pipeline("tiny", dtype=torch.float32))


def request(**changes) -> GenerationRequest:
    values = dict(prompt="a photo of sks star on a blue background", steps=2, seed=3)
    values.update(changes)
    return GenerationRequest(**values)


def test_app_serves_bias_adapters_without_changing_the_base(tmp_path, tiny_pipe):
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    bd.apply_boft(pipe.unet, bd.BOFTConfig(block_size=8, bias="boft_only"))
    randomize_adapter(pipe.unet, scale=0.5)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if name.endswith("base_layer.bias"):
                param.add_(0.5)
    bd.save_adapter(pipe.unet, tmp_path / "biased")
    studio = Studio("tiny", tmp_path, Limits(max_size=64, max_steps=2, max_images=1))
    base = studio.generate(request())[0][0]
    before = snapshot(studio.pipe.unet)
    adapted = studio.generate(request(adapter="biased"))[0][0]
    assert adapted.tobytes() != base.tobytes()
    assert studio.generate(request())[0][0].tobytes() == base.tobytes()
    studio._activate(NO_ADAPTER, 1.0)
    for key in list(studio._loaded):
        bd.delete_adapter(studio.pipe.unet, key)
    assert_bitwise_equal(studio.pipe.unet, before)


# 2. and 3. control folders --------------------------------------------------------------------------------
def test_light_control_config_numbers_are_bounded(tmp_path, tiny_pipe):
    folder = tmp_path / "light"
    save_control(folder, LIGHT, None, encoder=encoder_for_unet(tiny_pipe.unet, tiny_pipe.vae_scale_factor))
    config = json.loads((folder / ENCODER_CONFIG).read_text())
    (folder / ENCODER_CONFIG).write_text(json.dumps({**config, "in_channels": 400000}))
    with pytest.raises(ValueError, match="in_channels is 400000, this model needs 3"):
        load_outputs(tiny_pipe, folder)
    (folder / ENCODER_CONFIG).write_text(json.dumps({**config, "hidden": 10**6}))
    with pytest.raises(ValueError, match="hidden"):
        load_outputs(tiny_pipe, folder)
    (folder / ENCODER_CONFIG).write_text(json.dumps({**config, "hidden": "32"}))
    with pytest.raises(ValueError, match="hidden must be an integer"):
        load_outputs(tiny_pipe, folder)


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return target


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory, tiny_pipe):
    """A ControlNet control folder, plus the plain ControlNet it was made from inside it."""
    folder = tmp_path_factory.mktemp("control") / "cn"
    controlnet = controlnet_from_unet(tiny_pipe.unet, tiny_pipe.vae_scale_factor)
    controlnet_from_unet(tiny_pipe.unet, tiny_pipe.vae_scale_factor).save_pretrained(folder / "base_controlnet")
    bd.apply_boft(controlnet, bd.BOFTConfig(block_size=8))
    save_control(folder, CONTROLNET, None, controlnet=controlnet, metadata={"controlnet_source": "base_controlnet"})
    return folder


@pytest.mark.parametrize("source", ["/etc", "lllyasviel/sd-controlnet-canny", "../../.."])
def test_uploaded_control_names_no_controlnet_outside_itself(tmp_path, controlnet_folder, source, monkeypatch):
    import diffusers

    folder = tmp_path / "cn"
    shutil.copytree(controlnet_folder, folder)
    info = json.loads((folder / CONTROL_INFO).read_text())
    (folder / CONTROL_INFO).write_text(json.dumps({**info, "controlnet_source": source}))
    studio = Studio("tiny", tmp_path / "adapters")
    name = studio.import_upload([zip_folder(folder, tmp_path / "cn.zip")])
    calls = []
    monkeypatch.setattr(diffusers.ControlNetModel, "from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(StudioError, match="controlnet_source must name a ControlNet folder inside"):
        studio._activate(name, 1.0)
    assert calls == []


def test_uploaded_control_with_its_own_controlnet_loads(tmp_path, controlnet_folder):
    studio = Studio("tiny", tmp_path / "adapters")
    name = studio.import_upload([zip_folder(controlnet_folder, tmp_path / "cn.zip")])
    assert studio._activate(name, 1.0).control.mode == CONTROLNET
    config_path = studio.resolve(name) / "base_controlnet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "block_out_channels": [4096, 4096]}))
    other = Studio("tiny", studio.adapters_dir)
    with pytest.raises(StudioError, match="block_out_channels"):
        other._activate(name, 1.0)


# 4. and 10. numbers and types of adapter files -------------------------------------------------------------
def test_config_numbers_and_types_are_checked(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit_config(folder, boft_diffusion={**config["boft_diffusion"], "cayley_neumann_terms": 10**5})
    with pytest.raises(ValueError, match=r"cayley_neumann_terms must be in \[0, 32\]"):
        read_adapter_config(folder)
    for key, value, message in [("boft_block_size", "8", "boft_block_size must be an integer"),
                                ("boft_dropout", [0.1], "boft_dropout must be a number"),
                                ("boft_n_butterfly_factor", 10**6, "n_butterfly_factor must be <= 16"),
                                ("target_modules", [1, 2], "target_modules must be")]:
        folder = saved_adapter(tmp_path / key)
        edit_config(folder, **{key: value})
        with pytest.raises(ValueError, match=message):
            read_adapter_config(folder)
    (folder / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_adapter_config(folder)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_adapter_weights_are_refused(tmp_path, value):
    folder = saved_adapter(tmp_path / "a")
    tensors = load_file(folder / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("boft_s"))
    tensors[key][0] = value
    save_file(tensors, folder / WEIGHTS_NAME)
    unet = make_tiny_unet()
    before = snapshot(unet)
    with pytest.raises(ValueError, match="NaN or infinite"):
        bd.load_adapter(unet, folder)
    assert_bitwise_equal(unet, before)


def test_studio_validates_every_number(tmp_path):
    studio = Studio("tiny", tmp_path, Limits(max_size=64, max_steps=2, max_images=1))
    for field, value in [("strength", math.nan), ("steps", math.inf), ("width", math.nan), ("height", "big"),
                         ("seed", math.nan), ("num_images", -math.inf), ("guidance_scale", math.nan),
                         ("control_strength", math.inf), ("steps", 2.5)]:
        with pytest.raises(StudioError, match="must be a"):
            studio.clamp(request(**{field: value}))
    assert studio.clamp(request(strength=9, seed=2.0)).strength == 1.5


# 5. upload quotas ---------------------------------------------------------------------------------------
def adapter_members(folder: Path) -> dict[str, bytes]:
    return {f"up/{name}": (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_bomb_and_ten_thousand_entries_are_refused_within_the_quota(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    limits = Limits(max_upload_bytes=64 * 2**20)
    studio = Studio("tiny", tmp_path / "adapters", limits)
    bomb = write_zip(tmp_path / "bomb.zip", {**adapter_members(folder), "up/README.md": bytes(60 * 2**20)})
    assert bomb.stat().st_size < 2**20
    with pytest.raises(StudioError, match="expands .* times its size"):
        studio.import_upload([bomb])
    many = write_zip(tmp_path / "many.zip", {**adapter_members(folder),
                                             **{f"up/notes/{i}.md": b"x" for i in range(10_000)}})
    with pytest.raises(StudioError, match="10002 entries"):
        studio.import_upload([many])
    uploads = tmp_path / "adapters" / UPLOADS_FOLDER
    assert folder_bytes(uploads) == 0 and not list(uploads.iterdir())


def declare_size(data: bytes, member: bytes, size: int) -> bytes:
    """The zip ``data`` with ``member``'s uncompressed size rewritten in its local and central headers."""
    for signature, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        header = data.find(signature)
        while header != -1:
            if data[header + name_at:header + name_at + len(member)] == member:
                data = data[:header + size_at] + size.to_bytes(4, "little") + data[header + size_at + 4:]
            header = data.find(signature, header + 4)
    return data


def test_zip_that_lies_about_its_sizes_is_refused(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    payload = io.BytesIO()
    write_zip(payload, {**adapter_members(folder), "up/README.md": bytes(4 * 2**20)})
    lying = tmp_path / "lying.zip"
    lying.write_bytes(declare_size(payload.getvalue(), b"up/README.md", 1024))
    studio = Studio("tiny", tmp_path / "adapters", Limits(max_upload_bytes=2 * 2**20))
    with pytest.raises(StudioError):
        studio.import_upload([lying])
    assert folder_bytes(tmp_path / "adapters" / UPLOADS_FOLDER) == 0


def test_uploads_folder_cap_evicts_the_oldest_unused(tmp_path):
    import os

    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    bd.apply_boft(pipe.unet, bd.BOFTConfig(block_size=8))
    randomize_adapter(pipe.unet)
    folder = bd.save_adapter(pipe.unet, tmp_path / "a")
    upload = write_zip(tmp_path / "star.zip", adapter_members(folder))
    size = sum(len(data) for data in adapter_members(folder).values())
    studio = Studio("tiny", tmp_path / "adapters", Limits(max_upload_bytes=size, max_uploads_folder_bytes=2 * size))
    first = studio.import_upload([upload])
    studio._activate(first, 1.0)  # in use: never evicted
    second = studio.import_upload([upload])
    os.utime(studio.resolve(second), (1, 1))
    third = studio.import_upload([upload])
    names = studio.list_adapters()
    assert first in names and third in names and second not in names


def test_app_limit_flags_are_the_studio_limits_with_sizes_in_mb():
    assert app.limits_from_flags(app.parse_args([])) == Limits()
    limits = app.limits_from_flags(app.parse_args(["--max_size", "64", "--max_upload_mb", "3",
                                                   "--max_uploads_folder_mb", "5"]))
    assert (limits.max_size, limits.max_upload_bytes, limits.max_uploads_folder_bytes) == (64, 3 * 2**20, 5 * 2**20)
    with pytest.raises(SystemExit):
        app.parse_args(["--max_uploads_folder_mb", "3", "--max_upload_mb", "5"])


# 6. public app ---------------------------------------------------------------------------------------------
def test_public_app_offers_listed_models_and_hides_server_paths(tmp_path):
    assert app.offered_models(app.parse_args([])) is None
    assert app.offered_models(app.parse_args(["--host", "::1"])) is None
    assert app.offered_models(app.parse_args(["--host", "0.0.0.0", "--models", "m2"])) == ["tiny", "m2"]
    assert app.offered_models(app.parse_args(["--share"])) == ["tiny"]
    (tmp_path / "half_model").mkdir()
    studio = Studio("tiny", tmp_path, offered_models=["tiny", str(tmp_path / "half_model")])
    messages = set()
    for name in ("/etc", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(StudioError) as caught:
            studio.set_model(name)
        messages.add(str(caught.value))
    assert len(messages) == 1 and "/" not in messages.pop().replace(str(tmp_path / "half_model"), "")
    with pytest.raises(StudioError) as caught:
        studio.set_model(str(tmp_path / "half_model"))
    assert "model_index.json" not in studio.public_message(caught.value)
    with pytest.raises(StudioError) as caught:
        studio.generate(request(adapter="nowhere"))
    assert str(tmp_path) not in studio.public_message(caught.value)
    loopback = Studio("tiny", tmp_path)
    with pytest.raises(StudioError, match="could not load model"):
        loopback.set_model(str(tmp_path / "missing"))
