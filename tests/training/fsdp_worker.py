"""One rank of a torch FSDP2 run on CPU processes (gloo), started by ``torchrun`` from test_distributed.py.

``python fsdp_worker.py OUT_DIR OVERRIDE...``: builds the run's model as ``magnet-asr train`` does, shards it with
``fully_shard`` on the units accelerate's FSDP2 policy picks from :func:`wrap_classes`, trains a few steps (each
rank half of every batch), gathers the full state dict with the options accelerate's ``get_state_dict`` uses
for FSDP2, and rank 0 saves it with the model's ``save_pretrained`` into ``OUT_DIR/final``, loads it back and
transcribes. Rank 0 also trains an unsharded copy on whole batches (the mean of the two halves' losses, as
FSDP averages the ranks' gradients) and writes what it measured to ``OUT_DIR/report.json``.

Everything runs in eval mode (no dropout, deterministic predictors) and each half's random draws are seeded alike,
so both runs compute the same function. The last forward reads a batch that only rank 0 trained on: with
SpeechLLM's encoder cache on, rank 0 would skip the encoder that rank 1 runs, and their all-gathers would mismatch.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 3
PER_RANK = 2  # utterances per rank and step


def model_inputs(batch: dict) -> dict:
    from magnet_asr.training.distillation import BATCH_KEYS

    return {k: v for k, v in batch.items() if k != "num_skipped" and k not in BATCH_KEYS}


def main() -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from magnet_asr.data.collator import SpeechDataset
    from magnet_asr.evaluation.evaluate import evaluate
    from magnet_asr.schema import load_run_config
    from magnet_asr.training.distributed import same_forwards_on_every_rank, unsharded_class, wrap_classes
    from magnet_asr.training.recipe import _setup_data, _setup_model

    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_run_config(overrides)
    torch.manual_seed(cfg.training.seed)
    data = _setup_data(cfg)
    setup = _setup_model(cfg)
    model = setup.model.eval()
    same_forwards_on_every_rank(model)  # as prepare_sharding does for the Trainer
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model) if rank == 0 else None

    names = wrap_classes(model)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=names
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    mesh = init_device_mesh("cpu", (world,))
    units = [module for module in model.modules() if policy(module)]
    unit_classes = sorted({type(module).__name__ for module in units})
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}

    dataset = SpeechDataset([u for u in data.train if u.id != "corrupt"], max_seconds=cfg.data.max_seconds)
    per_step = PER_RANK * world

    def batch(step: int, part: int) -> dict:
        start = (step * per_step + part * PER_RANK) % len(dataset)
        items = [dataset[(start + i) % len(dataset)] for i in range(PER_RANK)]
        return model_inputs(setup.collator(items))

    def optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        trained = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW(trained, lr=cfg.training.learning_rate, weight_decay=0.0)

    opt = optimizer(model)
    ref_opt = optimizer(reference) if reference is not None else None
    losses = []
    for step in range(STEPS):
        # each half's random draws (SpeechLLM's CTC negatives) seeded alike in both runs
        torch.manual_seed(1000 * step + rank)
        loss = model(**batch(step, rank)).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over the ranks
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if reference is not None and ref_opt is not None:
            parts = []
            for part in range(world):
                torch.manual_seed(1000 * step + part)
                parts.append(reference(**batch(step, part)).loss)
            (sum(parts) / world).backward()
            ref_opt.step()
            ref_opt.zero_grad()

    probe = batch(0, 0)
    with torch.no_grad():
        sharded_logits = model(**probe).logits  # a forward of the sharded model: every rank takes part
    # what accelerate's Accelerator.get_state_dict does for FSDP2 (rank 0 gets it, the others an empty dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if rank != 0:
        assert state == {}, sorted(state)[:3]
        dist.barrier()
        dist.destroy_process_group()
        return

    final = out_dir / "final"
    # what the Trainer's _save does with a gathered state (a copy: save_pretrained empties the dict it writes)
    model.save_pretrained(str(final), state_dict=dict(state))
    setup.tokenizer.save_pretrained(str(final))
    loaded = unsharded_class(model).from_pretrained(str(final)).eval()
    loaded_state = loaded.state_dict()
    assert reference is not None
    reference_state = reference.state_dict()
    trained = [n for n, p in reference.named_parameters() if p.requires_grad]

    def max_diff(a: dict, b: dict, keys: list[str]) -> float:
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)

    with torch.no_grad():
        loaded_logits = loaded(**probe).logits
    test = next(iter(data.test.values()))
    summary = evaluate(setup.make_recognizer(loaded), test[:1], batch_size=1)
    name, param = next(iter(sharded.items()))
    report = {
        "wrap_classes": names,
        "units": len(units),
        "unit_classes": unit_classes,
        "sharded_parameters": len(sharded),
        "example": {"name": name, "full": list(param.shape), "local": list(param.to_local().shape)},
        "losses": losses,
        "gathered_keys": len(state),
        "saved_files": sorted(p.name for p in final.iterdir()),
        "trained": len(trained),
        # the gathered weights vs the unsharded reference, and how far training moved them
        "vs_reference": max_diff(state, reference_state, trained),
        "moved": max_diff(reference_state, initial, trained),
        "loaded_vs_gathered": max_diff(loaded_state, state, trained),
        "logits_loaded_vs_sharded": float((loaded_logits - sharded_logits).abs().max()),
        "transcribed": summary["num_utterances"],
        "hypothesis": summary["utterances"][0]["hypothesis"] if summary["utterances"] else None,
        "finite_losses": all(math.isfinite(v) for v in losses),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
