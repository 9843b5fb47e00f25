"""What tests/test_distributed.py launches under torchrun: train.py's main, plus a record of
what each process ended with.

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR [train.py flags...]

Every process saves OUT_DIR/rank{RANK}.pt: the state dicts of the generator and discriminator
it built as they were when training started ("start": after any resume, before DDP) and as
they ended, and train.main's summary. DDP_TEST_FAIL_RANK and DDP_TEST_FAIL_STEP make that rank
raise during that step's generator update, to test that one failing process ends the run.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402
from utils import run_cli  # noqa: E402


def record_built(modules):
    """Wrap train.py's builders so that the modules it trains are kept in `modules`."""
    for name in ("generator", "discriminator"):
        build = getattr(train, f"build_{name}")

        def build_and_keep(*args, _build=build, _name=name, **kwargs):
            modules[_name] = module = _build(*args, **kwargs)
            return module

        setattr(train, f"build_{name}", build_and_keep)


def record_start(starts, modules):
    """Wrap distributed.wrap, which train.py calls once the weights are loaded, to copy them."""
    wrap = train.distributed.wrap

    def copy_then_wrap(*args, **kwargs):
        for name, module in modules.items():
            starts[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return wrap(*args, **kwargs)

    train.distributed.wrap = copy_then_wrap


def fail_at_step(step, rank):
    """Make train.py's generator loss raise on its `step`-th call (1-based)."""
    generator_loss, calls = train.generator_loss, [0]

    def failing_generator_loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        return generator_loss(*args, **kwargs)

    train.generator_loss = failing_generator_loss


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    modules, starts = {}, {}
    record_built(modules)
    record_start(starts, modules)
    if os.environ.get("DDP_TEST_FAIL_RANK") == str(rank):
        fail_at_step(int(os.environ["DDP_TEST_FAIL_STEP"]), rank)
    summary = run_cli(train.main, argv)
    record = {name: module.state_dict() for name, module in modules.items()}
    torch.save({**record, "start": starts, "summary": summary}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
