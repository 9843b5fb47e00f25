"""What a benchmark configuration name means: `bf16+fused+cl` -> the flags of train.py and of
inference.py and the environment, and which configurations share a measurement (fused Adam,
say, changes nothing in inference, so it is measured once for both)."""

# Option -> flags of train.py and of inference.py (None: not available there), and environment.
OPTIONS = {
    "fp32": {"train": ["--precision", "fp32"], "inference": ["--precision", "fp32"]},
    # The command a user runs with no speed flags: precision auto, the data defaults.
    "default": {"train": ["--precision", "auto", "--channels_last", "auto", "--cache", "auto",
                          "--num_workers", "-1", "--fused_adam"],
                "inference": ["--precision", "auto", "--channels_last", "auto",
                              "--io_threads", "2", "--png_compression", "1",
                              "--fold_batch_norm"]},
    "tf32": {"train": ["--precision", "tf32"], "inference": None},
    "bf16": {"train": ["--precision", "bf16"], "inference": ["--precision", "bf16"]},
    "fp16": {"train": ["--precision", "fp16"], "inference": ["--precision", "fp16"]},
    "cl": {"train": ["--channels_last", "on"], "inference": ["--channels_last", "on"]},
    "nocl": {"train": ["--channels_last", "off"], "inference": ["--channels_last", "off"]},
    "compile": {"train": ["--compile"], "inference": ["--compile"]},
    "fused": {"train": ["--fused_adam"], "inference": []},
    "inbwd": {"train": ["--step_in_backward"], "inference": []},
    "data": {"train": ["--cache", "auto", "--num_workers", "-1"],
             "inference": ["--io_threads", "2"]},
    "png1": {"train": [], "inference": ["--png_compression", "1"]},
    # Batch norm folded into the convolutions, and bf16/fp16 weights cast once (inference).
    "fold": {"train": [], "inference": ["--fold_batch_norm"]},
    # The paper's networks and losses (--preset paper): what the reference implementation
    # computes. `paper+fp32` is the reference's work on the plain path; inference and the
    # bare forward use a checkpoint of the paper's generator.
    "paper": {"train": ["--preset", "paper"], "inference": []},
    # OpenMP threads that wait at a barrier sleep at once instead of spinning: on a machine
    # shared with other jobs, a spinning thread keeps the core its partner needs.
    "passive": {"train": [], "inference": [], "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
}
PLAIN_TRAIN = ["--channels_last", "off", "--cache", "off", "--num_workers", "0",
               "--no_fused_adam", "--no_step_in_backward"]
# zlib level 6: what PIL writes by default, as the reference implementation does.
PLAIN_INFERENCE = ["--channels_last", "off", "--io_threads", "0", "--png_compression", "6",
                   "--no_fold_batch_norm"]

DEFAULT_CONFIGS = {
    "cpu": "fp32,default,fp32+fused,fp32+inbwd,fp32+cl,fp32+data,fp32+compile,"
           "fp32+fused+inbwd+cl+data,"
           "fp32+fused+inbwd+cl+data+compile,bf16,bf16+fused+inbwd+cl+data,"
           "bf16+fused+inbwd+cl+data+compile,bf16+fused+inbwd+cl+data+compile+png1",
    "cuda": "fp32,default,fp32+fused+inbwd+data,tf32+fused+inbwd+data,bf16+fused+inbwd+data,"
            "fp16+fused+data,bf16+fused+inbwd+cl+data,bf16+fused+inbwd+cl+data+compile",
}
QUICK_CONFIGS = "fp32,default,bf16+fused+inbwd+cl+data"
EQUIVALENCE_CONFIGS = "fp32,fp32+fused+cl,bf16,bf16+fused+cl,bf16+fused+cl+compile"

def parse_config(name):
    """'bf16+cl' -> (train.py flags, inference.py flags or None, environment)."""
    train_flags, inference_flags, env = list(PLAIN_TRAIN), list(PLAIN_INFERENCE), {}
    for option in name.split("+"):
        if option not in OPTIONS:
            raise SystemExit(f"error: --configs: unknown option {option!r} in {name!r}; "
                             f"choose from {', '.join(OPTIONS)}")
        parts = OPTIONS[option]
        train_flags += parts["train"]
        inference_flags = None if parts["inference"] is None or inference_flags is None else \
            inference_flags + parts["inference"]
        env.update(parts.get("env", {}))
    return train_flags, inference_flags, env


def as_config_dict(flags):
    from config import apply_preset, build_parser
    return apply_preset(vars(build_parser("").parse_args(flags)))


def model_of(name):
    """Which networks a configuration trains and translates with: "paper" or "default"."""
    return "paper" if "paper" in name.split("+") else "default"


def measurement_key(part, name):
    """What a part's figure depends on (None: the part does not apply); configurations with
    the same key are measured once (fused Adam, say, changes nothing in inference)."""
    train_flags, inference_flags, env = parse_config(name)
    if part in ("train", "profile"):
        key = train_flags
    elif part == "loader":
        key = loader_options(name)
    elif part == "inference":
        key = inference_flags
    else:  # the bare forward: precision, memory format, compile
        key = sorted(set(name.split("+")) & {"default", "bf16", "fp16", "cl", "nocl",
                                             "compile", "fold"})
    return None if key is None else (tuple(key), tuple(sorted(env.items())), model_of(name))


def loader_options(name):
    """(cache, num_workers) of a configuration's training loader."""
    config = as_config_dict(parse_config(name)[0])
    return config.get("cache"), config.get("num_workers")


def measured_as(configs, part, name):
    """The first configuration whose measurement stands for `name`'s in this part."""
    key = measurement_key(part, name)
    return next((c for c in configs if key is not None and measurement_key(part, c) == key),
                None)


def unique_configs(configs, part):
    return [name for name in configs if measured_as(configs, part, name) == name]


def slug(name):
    return name.replace("+", "_")
