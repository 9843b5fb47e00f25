"""Reading the generator files export.py writes, each back to a callable generator and the
run's configuration: .safetensors (weights, no pickle), .onnx (run by onnxruntime) and .pt2
(a torch.export program). The names of the ONNX graph's ends and of the .pt2's configuration
file, which the writer and the readers share, are defined here. inference.load_generator
reads .safetensors and .onnx through it; export.py reads each format back for its check.
"""

import importlib
import json

import numpy as np
import torch

from checkpoints import EXPORT_FORMAT
from models import ModelConfig
from utils import UserError, one_line

ONNX_INPUT, ONNX_OUTPUT = "label", "photo"  # the names export.py gives the graph's ends
PT2_CONFIG = "pix2pix_config.json"  # the .pt2's extra file holding the run's configuration


def optional_module(name, path):
    """import `name`, or a one-line error saying what to install to read `path`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{path}: reading it needs the {name} package: pip install -r "
                        "requirements-extras.txt") from None


def exported_config(metadata, path):
    """The run's configuration dict from an exported file's metadata (export.py writes it)."""
    if (metadata or {}).get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}: not a pix2pix generator exported by export.py (no "
                        f"'format: {EXPORT_FORMAT}' in its metadata)")
    try:
        config = json.loads(metadata["config"])
        ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: the configuration in its metadata is unreadable "
                        f"({type(e).__name__}: {one_line(e)[:120]})") from None
    return config


def read_safetensors(path):
    """(state dict, configuration) of export.py's .safetensors: no pickle involved."""
    safetensors = optional_module("safetensors", path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
            state_dict = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as e:  # noqa: BLE001 (corrupt headers fail in several ways)
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{one_line(e)[:120]})") from None
    return state_dict, exported_config(metadata, path)


class OnnxGenerator:
    """An exported .onnx generator behind the call a PyTorch one has: (B, 3, H, W) float
    tensor in [-1, 1] -> photo tensor, H and W multiples of 2^depth (Translator pads to them).
    onnxruntime computes in fp32 on the CPU, or on CUDA where its CUDA provider is installed."""

    def __init__(self, session):
        self.session = session

    def __call__(self, label):
        array = np.ascontiguousarray(label.detach().float().cpu().numpy())
        (photo,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: array})
        return torch.from_numpy(photo).to(label.device)


def load_onnx(path, device="cpu"):
    """(OnnxGenerator, configuration) of export.py's .onnx."""
    ort = optional_module("onnxruntime", path)
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and \
            "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's concern
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch's
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                        f"{one_line(e)[:120]})") from None
    config = exported_config(session.get_modelmeta().custom_metadata_map, path)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([ONNX_INPUT], [ONNX_OUTPUT]):
        raise UserError(f"{path}: expected one input {ONNX_INPUT!r} and one output "
                        f"{ONNX_OUTPUT!r}, found {names[0]} and {names[1]}")
    return OnnxGenerator(session), config


def read_pt2(path):
    """(the program as an nn.Module, the run's configuration) of a .pt2 written here."""
    extra = {PT2_CONFIG: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[PT2_CONFIG])
