"""MagnetTrainer on bad batches in one process: a skipped step moves no weight (not even by AdamW's
momentum or weight decay); the checksum reads trained parameters only; the sharded-engine rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from magnet_asr.training.recipe import weights_checksum
from magnet_asr.training.trainer import MagnetTrainer, shards_parameters


class Regression(torch.nn.Module):
    """The least a MagnetTrainer batch needs: ``input_features`` and ``labels`` in, ``.loss`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, input_features: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.linear(input_features).squeeze(-1) - labels) ** 2).mean())


def collate(items: list[dict]) -> dict:
    good = [it for it in items if it["kind"] != "unreadable"]
    batch: dict = {"num_skipped": len(items) - len(good)}
    if good:
        batch["input_features"] = torch.stack([it["x"] for it in good])
        batch["labels"] = torch.stack([it["y"] for it in good])
    return batch


class Snapshots(TrainerCallback):
    def __init__(self) -> None:
        self.trainer: MagnetTrainer | None = None
        self.steps: list[tuple[int, torch.Tensor]] = []  # (skipped batches so far, weights after the step)

    def on_step_end(self, args, state, control, **kwargs):
        assert self.trainer is not None
        weights = torch.cat([p.detach().flatten().clone() for p in self.trainer.model.parameters()])
        self.steps.append((self.trainer.skipped_batches, weights))


def test_skipped_batches_leave_every_weight_where_it_was(tmp_path):
    torch.manual_seed(0)
    items = [{"kind": "good", "x": torch.randn(4), "y": torch.randn(())} for _ in range(6)]
    items[2] = {"kind": "nan", "x": torch.full((4,), float("nan")), "y": torch.zeros(())}  # a NaN loss
    items[4] = {"kind": "unreadable"}  # a batch of only bad samples
    snapshots = Snapshots()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=len(items),
        per_device_train_batch_size=1,
        learning_rate=0.1,
        weight_decay=0.5,  # with zero gradients AdamW would still shrink the weights, and use its momentum
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    model = Regression()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer = MagnetTrainer(
        model=model, args=args, train_dataset=items, data_collator=collate, callbacks=[snapshots]
    )
    snapshots.trainer = trainer
    trainer.train()
    assert trainer.skipped_batches == 2 and trainer.skipped_samples == 1
    before = start
    skipped_steps = 0
    for step, (skipped, weights) in enumerate(snapshots.steps):
        was_skipped = skipped > (snapshots.steps[step - 1][0] if step else 0)
        skipped_steps += was_skipped
        assert torch.isfinite(weights).all()
        if was_skipped:
            assert torch.equal(weights, before), f"step {step + 1} was skipped but the weights moved"
        else:
            assert not torch.equal(weights, before), f"step {step + 1} trained but nothing moved"
        before = weights
    assert skipped_steps == 2
    assert any(entry.get("skipped_batches") == 2 for entry in trainer.state.log_history)


def test_weights_checksum_reads_only_trained_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)  # a frozen part (an LLM beside LoRA)
    first = weights_checksum(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert weights_checksum(model) == first  # frozen: neither copied nor hashed
    with torch.no_grad():
        model[1].weight[0, 0] += 1e-3
    assert weights_checksum(model) != first
    assert len(weights_checksum(model.to(torch.bfloat16))) == 16  # its own dtype, no float32 copy


@pytest.mark.parametrize(
    ("distributed_type", "processes", "zero_stage", "sharded"),
    [
        ("FSDP", 2, None, True),
        ("DEEPSPEED", 2, 3, True),
        ("DEEPSPEED", 2, 2, False),
        ("MULTI_GPU", 2, None, False),
        ("FSDP", 1, None, False),
    ],
)
def test_generation_is_synced_only_when_parameters_are_sharded(
    distributed_type, processes, zero_stage, sharded
):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    accelerator = SimpleNamespace(
        num_processes=processes,
        distributed_type=DistributedType[distributed_type],
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )
    assert shards_parameters(accelerator) is sharded
