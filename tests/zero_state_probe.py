"""`python tests/zero_state_probe.py DUMP_DIR train_pretrain.py FLAGS...` (or under `torchrun`): the
trainer, run as users run it, which also writes what its DeepSpeed engine holds, read back whole through
DeepSpeed's own accessors (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`): right after a
resume as `DUMP_DIR/loaded.pth`, and at the end, the state of its last checkpoint, as
`DUMP_DIR/finished.pth`. A test compares one run's `finished` with the next run's `loaded`."""

import runpy
import sys
from pathlib import Path

import torch

from trainer import engine


def full_state(trainer: engine.Trainer) -> dict:
    """Every parameter's fp32 master weights and AdamW moments, the optimizer's step counts and each
    group's weight decay. Every process takes part (the pieces are gathered) and gets the whole tensors."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = trainer.zero.engine.optimizer
    if trainer.zero.stage < 3:
        # ZeRO-1/2 link each weight to its slice of the moments once, after the first group's first
        # step, when the other groups' moments do not exist yet (torch creates them at their step):
        # link them again, now that all exist, or reading a norm's moments fails
        for weights, partition in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(weights, partition, zero.optimizer.state)
    state = {name: {"fp32": safe_get_full_fp32_param(param).cpu(),
                    **{key: safe_get_full_optimizer_state(param, key).cpu() for key in ("exp_avg", "exp_avg_sq")}}
             for name, param in engine.unwrap(trainer.model).named_parameters()}
    return {"params": state, "adam_steps": sorted({float(s["step"]) for s in trainer.optimizer.state.values()}),
            "weight_decay": [group["weight_decay"] for group in trainer.optimizer.param_groups]}


def dump(trainer: engine.Trainer, name: str) -> None:
    state = full_state(trainer)
    if trainer.runtime.is_main:
        torch.save(state, DUMP_DIR / f"{name}.pth")


def load_resume_and_dump(trainer: engine.Trainer) -> bool:
    resumed = load_resume(trainer)
    if resumed:
        dump(trainer, "loaded")
    return resumed


def dump_and_finish(trainer: engine.Trainer) -> None:
    dump(trainer, "finished")
    finish(trainer)


if __name__ == "__main__":
    DUMP_DIR, script = Path(sys.argv[1]), sys.argv[2]
    DUMP_DIR.mkdir(parents=True, exist_ok=True)
    load_resume, finish = engine.Trainer.load_resume, engine.Trainer.finish
    engine.Trainer.load_resume, engine.Trainer.finish = load_resume_and_dump, dump_and_finish
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(str(engine.REPO_ROOT / "trainer" / script), run_name="__main__")
