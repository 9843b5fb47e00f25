"""export.py: ONNX, safetensors and torch.export files that translate as the checkpoint does,
and inference.py / app.py reading them. The generators have random weights and batch-norm
statistics: a freshly initialised one gives near-constant photos, which any export matches."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, draw_label_map, run_in_process, save_image

import export
import inference
from checkpoints import Progress, make_checkpoint, save_checkpoint
from config import TrainConfig
from exported import load_onnx
from models import build_generator

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("safetensors")

FORMATS = (".onnx", ".safetensors", ".pt2")
pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(generator, seed):
    """Weights and batch-norm statistics far from the initialisation's near-identity."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in generator.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=rng) * 1.5 + 0.5)
            elif tensor.is_floating_point():
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
                std = 1.5 / fan_in ** 0.5 if tensor.dim() > 1 else 0.3
                tensor.copy_(torch.randn(tensor.shape, generator=rng) * std)
    return generator


def random_checkpoint(path, seed=0, image_size=32, **options):
    config = TrainConfig(**{**TINY_MODEL, "image_size": image_size, **options})
    generator = randomise(build_generator(config.model_config()), seed)
    save_checkpoint(make_checkpoint(config, generator, Progress(step=7)), path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    # 64 pixels: deep enough for the decoder's dropout, which the exports must leave out.
    return {"transposed": random_checkpoint(folder / "transposed.pth", image_size=64,
                                            upsample="transposed"),
            "resize": random_checkpoint(folder / "resize.pth", seed=1, upsample="resize"),
            "shallow": random_checkpoint(folder / "shallow.pth", seed=2, upsample="resize",
                                         padding="shallow")}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """{(kind, suffix): (exported file, its parity check's (mean, max))}."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for kind, path in checkpoints.items():
        for suffix in FORMATS:
            output = folder / f"{kind}{suffix}"
            files[kind, suffix] = output, export.export(path, output)
    return files


def test_random_generators_are_not_flat(checkpoints):
    """The parity tests mean something only if the photos vary."""
    for path in checkpoints.values():
        generator, config = inference.load_generator(path)
        maps = export.parity_label_maps(config["model"]["image_size"])[1]
        photos = inference.Translator(generator, config, "cpu").translate(maps)
        assert all(p.std() > 20 for p in photos)


@pytest.mark.parametrize("kind", ["transposed", "resize", "shallow"])
@pytest.mark.parametrize("suffix", FORMATS)
def test_each_format_round_trips_with_parity(exported, checkpoints, kind, suffix):
    path, (mean, worst) = exported[kind, suffix]
    assert mean < 1 and worst < 4  # the check export.py ran on 6 label maps before writing
    generator, config = inference.load_generator(checkpoints[kind])
    candidate, candidate_config = export.FORMATS[suffix][1](path)
    assert candidate_config == config
    # Dynamic batch, height and width: any multiples of 2^depth.
    block = config["model"]["image_size"]
    label = torch.rand(3, 3, 2 * block, 3 * block) * 2 - 1
    with torch.no_grad():
        assert (candidate(label) - generator(label)).abs().max() < 1e-3


def test_onnx_graph_contract(exported):
    import onnx
    model = onnx.load(str(exported["resize", ".onnx"][0]))
    assert model.opset_import[0].version == export.ONNX_OPSET
    (label,), (photo,) = model.graph.input, model.graph.output
    assert (label.name, photo.name) == ("label", "photo")
    dims = [d.dim_param or d.dim_value for d in label.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert json.loads({p.key: p.value for p in model.metadata_props}["config"])["model"][
        "upsample"] == "resize"


def test_a_changed_weight_fails_the_check(exported, checkpoints, tmp_path):
    """Negative control: the check catches an export whose weights differ."""
    generator, config = inference.load_generator(checkpoints["transposed"])
    candidate, _ = inference.load_generator(exported["transposed", ".safetensors"][0])
    with torch.no_grad():
        candidate.decoder.up2.conv.weight.mul_(1.5)
    with pytest.raises(inference.UserError, match="over the limits"):
        export.check_parity(generator, candidate, config, "changed")
    onnx_generator, _ = load_onnx(exported["transposed", ".onnx"][0])
    with torch.no_grad():
        generator.decoder.up2.conv.weight.mul_(1.5)
    with pytest.raises(inference.UserError, match="over the limits"):
        export.check_parity(generator, onnx_generator, config, "changed")


def test_export_fails_loudly_and_writes_nothing(checkpoints, tmp_path, monkeypatch, capsys):
    write, read = export.FORMATS[".safetensors"]

    def write_changed(generator, config, path):
        changed = copy.deepcopy(generator)
        with torch.no_grad():
            changed.decoder.up1.conv.bias.add_(0.3)
        return write(changed, config, path)

    monkeypatch.setitem(export.FORMATS, ".safetensors", (write_changed, read))
    output = tmp_path / "g.safetensors"
    status, _, err = run_in_process(export.main, ["--model_path", checkpoints["transposed"],
                                                  "--output", output], capsys)
    assert status == 2 and "over the limits" in err and "Traceback" not in err
    assert not output.exists()


def test_inference_and_app_read_the_exports(exported, checkpoints, tmp_path):
    """inference.py on .onnx and .safetensors gives the .pth run's photos (fp32)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for k, (height, width) in enumerate([(32, 32), (40, 70), (64, 32)]):
        save_image(draw_label_map(height, width, rng), tmp_path / "in" / f"{k}.png")
    outputs = {}
    for name, path in [("pth", checkpoints["resize"]),
                       ("onnx", exported["resize", ".onnx"][0]),
                       ("safetensors", exported["resize", ".safetensors"][0])]:
        inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                        str(tmp_path / name), "--model_path", str(path), "--precision", "fp32",
                        "--batch_size", "2"])
        outputs[name] = [np.asarray(Image.open(p), np.int16)
                         for p in sorted((tmp_path / name).glob("*.png"))]
    for name in ("onnx", "safetensors"):
        differences = [np.abs(a - b) for a, b in zip(outputs["pth"], outputs[name])]
        assert len(differences) == 3
        assert np.mean([d.mean() for d in differences]) < 1 and max(d.max() for d in
                                                                     differences) < 4
    import app
    for suffix in (".onnx", ".safetensors"):
        service = app.load_service(exported["resize", suffix][0], torch.device("cpu"))
        assert service is not None


@pytest.mark.parametrize("suffix", [".onnx", ".safetensors"])
def test_corrupt_or_foreign_files_get_one_line(tmp_path, exported, suffix, capsys):
    good = exported["transposed", suffix][0].read_bytes()
    files = {"truncated": good[:len(good) // 2], "empty": b"", "text": b"not a model\n"}
    if suffix == ".safetensors":
        from safetensors.torch import save
        files["foreign"] = save({"weight": torch.zeros(2)})
    else:
        import onnx
        from onnx import TensorProto, helper
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        files["foreign"] = helper.make_model(graph).SerializeToString()
        assert onnx.load_from_string(files["foreign"])
    save_image(draw_label_map(32, 32, np.random.default_rng(0)), tmp_path / "in" / "0.png")
    for name, data in files.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        status, _, err = run_in_process(inference.main, [
            "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model_path", path],
            capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), err
        if name == "foreign":
            assert "not a pix2pix generator" in err


def test_bad_output_and_missing_package(checkpoints, exported, tmp_path, monkeypatch, capsys):
    status, _, err = run_in_process(export.main, ["--model_path", checkpoints["transposed"],
                                                  "--output", tmp_path / "g.h5"], capsys)
    assert status == 2 and "unknown format '.h5'" in err
    onnx_file = exported["transposed", ".onnx"][0]
    status, _, err = run_in_process(export.main, ["--model_path", onnx_file,
                                                  "--output", tmp_path / "g.pt2"], capsys)
    assert status == 2 and "already an ONNX graph" in err
    with pytest.raises(inference.UserError, match="a torch.export program"):
        inference.load_generator(exported["transposed", ".pt2"][0])
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if not installed
    status, _, err = run_in_process(export.main, ["--model_path", checkpoints["transposed"],
                                                  "--output", tmp_path / "g.onnx"], capsys)
    assert status == 2 and "pip install -r requirements-extras.txt" in err
    assert len(err.strip().splitlines()) == 1
