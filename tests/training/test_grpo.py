"""GRPO on the boundary predictors: sampling forward, advantages, clipped objective, a toy problem on which
the reward must rise, the Trainer integration (only predictors change) and the demo config."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

from magnet_asr.compression import BoundaryPredictor, BoundaryPredictorConfig, group_samples
from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.schema import load_run_config
from magnet_asr.training.grpo import (
    GRPOConfig,
    GRPOTrainer,
    clipped_surrogate,
    collect_rollout,
    count_penalty,
    frame_log_probs,
    freeze_for_grpo,
    group_advantages,
    grpo_loss,
    load_policy_model,
    per_sample_asr_loss,
    policy_predictors,
    trainer_class,
)
from magnet_asr.training.trainer import MagnetTrainer
from tiny import TINY_WHISPER

TINY = TINY_WHISPER
FIXED = {"variant": "mlp", "prior": 0.3, "target": "fixed", "loss": ["binomial"]}


def tiny_model(seed: int = 0, init_std: float = 0.2, **settings) -> MagnetWhisper:
    """A random MagnetWhisper with one predictor before encoder layer 1. ``init_std=0.2`` (Whisper's is
    0.02) makes the random decoder's output depend visibly on how its input is pooled."""
    torch.manual_seed(seed)
    settings = {"predictor_layers": [1], "predictor_settings": FIXED, **settings}
    model = MagnetWhisper(MagnetWhisperConfig(**TINY, init_std=init_std, **settings))
    fresh_predictors(model, seed)
    return model.train()


def fresh_predictors(model: MagnetWhisper, seed: int) -> None:
    """``post_init`` re-initializes every Linear, predictors included; give them their own init back."""
    torch.manual_seed(seed + 1)
    settings = model.config.predictor_settings
    for key in list(model.model.encoder.predictors):
        config = BoundaryPredictorConfig(hidden_size=model.config.d_model, **settings)
        model.model.encoder.predictors[key] = BoundaryPredictor(config)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than several, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    """A task where some boundary placements give a lower ASR loss than others.

    A *teacher* (the same random network with a confident random predictor, biased to end a segment on
    about one frame in three) greedily transcribes 8 random inputs; its transcripts are the labels. A
    student with a fresh predictor must find placements that make those transcripts likely again.
    """
    student = tiny_model()
    torch.manual_seed(3)
    batch, frames, tokens = 8, 60, 8
    features = torch.randn(batch, 8, frames)
    mask = torch.ones(batch, frames, dtype=torch.long)
    teacher = MagnetWhisper(student.config).eval()
    teacher.load_state_dict(student.state_dict())
    predictor = teacher.model.encoder.predictors["1"]
    with torch.no_grad():
        for param in predictor.parameters():
            param.normal_(0.0, 0.5)
        states = teacher.model.encoder(features, num_boundary_samples=2).predictor_inputs[0]
        logits = predictor.boundary_logits(states[0], states[1].bool())
        predictor.mlp[-1].bias -= logits.quantile(2 / 3)
        ids = torch.full((batch, 1), TINY["decoder_start_token_id"])
        for _ in range(tokens):
            step = teacher(input_features=features, attention_mask=mask, decoder_input_ids=ids).logits
            ids = torch.cat([ids, step[:, -1:].argmax(-1)], dim=1)
    return {"input_features": features, "attention_mask": mask, "labels": ids[:, 1:]}


def clone_inputs(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items()}


def run_grpo(model: MagnetWhisper, inputs: dict, config: GRPOConfig, steps: int, lr: float) -> list[dict]:
    """Plain GRPO loop (what GRPOTrainer does per step, without the Trainer): stats of every step."""
    freeze_for_grpo(model)
    predictors = policy_predictors(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        if step % config.num_iterations == 0:
            rollout, _ = collect_rollout(model, clone_inputs(inputs), config)
        loss, stats = grpo_loss(predictors, rollout, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({**rollout.stats, **stats, "new_rollout": step % config.num_iterations == 0})
    return history


def greedy_asr_loss(model: MagnetWhisper, inputs: dict) -> float:
    model.eval()
    with torch.no_grad():
        out = model(**clone_inputs(inputs))
    model.train()
    return float(per_sample_asr_loss(out.logits, inputs["labels"]).mean())


# ---- the sampling forward --------------------------------------------------------------------------
def test_sampling_forward_is_input_major_and_log_probs_agree(toy):
    model = tiny_model(predictor_layers=[0, 2])  # two predictors: the second samples once per row
    k, batch = 3, 4
    inputs = {key: value[:batch].clone() for key, value in toy.items()}
    inputs["attention_mask"][1, 40:] = 0  # a shorter utterance
    torch.manual_seed(0)
    out = model(**inputs, num_boundary_samples=k)
    n = k * batch
    assert out.logits.shape[0] == n and out.boundary_log_prob.shape == (n,)
    assert [h.shape[0] for h, _ in out.predictor_inputs] == [batch, n]
    assert out.frames_before.tolist() == [30] * k + [20] * k + [30] * (2 * k)
    # draws of one input differ, and its ASR loss is scored against that input's labels
    first = out.boundary_outputs[0].boundaries
    assert not torch.equal(first[0], first[1])
    per_row = per_sample_asr_loss(out.logits, inputs["labels"].repeat_interleave(k, dim=0))
    assert per_row.shape == (n,) and torch.isfinite(per_row).all()
    # replayed per-frame log-probabilities sum to the sampler's, predictor by predictor and jointly
    total = torch.zeros(n)
    for j, (predictor, (hidden, mask), bo) in enumerate(
        zip(policy_predictors(model), out.predictor_inputs, out.boundary_outputs, strict=True)
    ):
        log_prob, free, entropy, _ = frame_log_probs(predictor, hidden, mask, bo.boundaries)
        torch.testing.assert_close(log_prob.sum(1), bo.log_prob)
        assert (entropy >= 0).all() and (log_prob <= 0).all()
        if j == 0:  # input 1 has 20 real frames: the forced last one and the padding are not free
            assert free[k : 2 * k, :19].all() and not free[k : 2 * k, 19:].any()
        total += log_prob.sum(1)
    torch.testing.assert_close(total, out.boundary_log_prob)
    # the default path is untouched: no sampling outputs
    plain = model(**inputs)
    assert (
        plain.logits.shape[0] == batch and plain.boundary_log_prob is None and plain.predictor_inputs is None
    )


def test_sampling_needs_a_predictor():
    model = tiny_model(predictor_layers=[])
    with pytest.raises(ValueError, match="at least one boundary predictor"):
        model(input_features=torch.randn(1, 8, 20), num_boundary_samples=2)


# ---- advantages and the objective ------------------------------------------------------------------
def test_advantages_are_normalized_within_each_group():
    torch.manual_seed(0)
    k = 4
    rewards = torch.cat([torch.randn(k) * 5 + 100, torch.randn(k) * 0.01 - 3, torch.full((k,), 2.0)])
    advantages = group_samples(group_advantages(rewards, k, eps=1e-6), k)
    torch.testing.assert_close(advantages[:2].mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(advantages[:2].std(1), torch.ones(2), atol=1e-3, rtol=0)
    assert advantages[2].abs().max() == 0  # equal rewards: nothing to learn
    # input-major: the order within a group is kept, and groups do not mix
    assert (
        advantages[0].argmax() == rewards[:k].argmax()
        and advantages[1].argmin() == rewards[k : 2 * k].argmin()
    )
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        GRPOConfig(num_samples=1)


def test_clipped_surrogate_stops_the_gradient_outside_the_trust_region():
    old = torch.log(torch.full((2, 3), 0.5))
    new = old.clone().requires_grad_(True)
    free = torch.tensor([[True, True, False], [True, True, True]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = clipped_surrogate(new, old, advantages, free, clip_epsilon=0.2)
    loss.backward()
    # ratio 1: the policy gradient -A / |free| on free frames, zero elsewhere
    torch.testing.assert_close(new.grad, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]) / 5)
    assert stats["grpo_ratio"] == pytest.approx(1.0) and stats["grpo_clip_fraction"] == 0.0
    # ratio 1.5 > 1 + eps with a positive advantage (and 0.5 < 1 - eps with a negative one): clipped
    moved = (old + torch.log(torch.tensor([[1.5], [0.5]]))).requires_grad_(True)
    loss, stats = clipped_surrogate(moved, old, advantages, free, clip_epsilon=0.2)
    loss.backward()
    assert moved.grad.abs().max() == 0 and stats["grpo_clip_fraction"] == 1.0
    assert stats["grpo_approx_kl"] != 0
    unclipped, _ = clipped_surrogate(moved.detach().requires_grad_(True), old, advantages, free, None)
    assert unclipped < loss


def test_count_penalty_is_the_relative_count_error():
    out = SimpleNamespace(
        num_boundaries=torch.tensor([10, 5, 1]), target_counts=torch.tensor([5.0, 5.0, 0.5])
    )
    # |k - k*| / max(k*, 1): a target below one segment is not divided by a tiny number
    torch.testing.assert_close(count_penalty((out, out)), 2 * torch.tensor([1.0, 0.0, 0.5]))


# ---- learning --------------------------------------------------------------------------------------
def test_grpo_raises_the_reward_on_a_toy_problem(toy):
    model = tiny_model()
    before = greedy_asr_loss(model, toy)
    config = GRPOConfig(num_samples=8, penalty="none")
    torch.manual_seed(0)
    history = run_grpo(model, toy, config, steps=150, lr=1e-2)
    rewards = [h["grpo_reward"] for h in history]
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    spread = statistics.mean(h["grpo_reward_std"] for h in history[:10])
    print(f"toy GRPO: mean reward {first:.3f} -> {last:.3f} (within-group std at start {spread:.3f})")
    assert last - first > 0.25 and last - first > 2 * spread
    after = greedy_asr_loss(model, toy)  # the deterministic (eval) boundaries improved as well
    print(f"toy GRPO: eval-mode ASR loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.25


def test_ppo_iterations_with_count_penalty_reach_the_target_rate(toy):
    """Start far from the target compression (p = 0.6 against a prior of 0.2): several clipped updates
    per rollout with a count penalty bring the sampled rate down, and the ratio moves off 1."""
    model = tiny_model(predictor_settings={**FIXED, "prior": 0.2})
    with torch.no_grad():
        model.model.encoder.predictors["1"].mlp[-1].bias.fill_(0.4)
    config = GRPOConfig(
        num_samples=4, penalty="count", penalty_weight=1.0, num_iterations=4, clip_epsilon=0.2
    )
    torch.manual_seed(0)
    history = run_grpo(model, toy, config, steps=120, lr=1e-2)
    fresh = [h for h in history if h["new_rollout"]]
    reused = [h for h in history if not h["new_rollout"]]
    assert all(h["grpo_ratio"] == pytest.approx(1.0) for h in fresh)
    assert (
        max(h["grpo_clip_fraction"] for h in reused) > 0 and max(abs(h["grpo_approx_kl"]) for h in reused) > 0
    )
    first, last = fresh[0]["grpo_penalty"], statistics.mean(h["grpo_penalty"] for h in fresh[-5:])
    reward_first, reward_last = fresh[0]["grpo_reward"], statistics.mean(h["grpo_reward"] for h in fresh[-5:])
    print(
        f"PPO-GRPO: count penalty {first:.3f} -> {last:.3f}, reward {reward_first:.3f} -> {reward_last:.3f}"
    )
    assert last < 0.5 * first and reward_last > reward_first + 0.3


def test_boundary_loss_anchor_keeps_the_eval_rate_at_the_target(toy):
    """GRPO trains the sampling rate, eval mode thresholds p: with a count penalty alone the p-values
    spread below 0.5 and the eval rate falls far under the target; the predictors' own boundary loss
    (weight ``boundary_loss_weight``) keeps the thresholded rate near it."""
    rates = {}
    for weight in (0.0, 1.0):
        model = tiny_model(predictor_settings={**FIXED, "prior": 0.25, "train_sampling": "threshold"})
        config = GRPOConfig(num_samples=4, penalty="count", boundary_loss_weight=weight)
        torch.manual_seed(0)
        history = run_grpo(model, toy, config, steps=60, lr=1e-2)
        rates[weight] = statistics.mean(h["grpo_eval_rate_0"] for h in history[-5:])
        assert ("grpo_boundary_loss" in history[-1]) == (weight > 0)
    print(f"eval-mode boundary rate after GRPO (target 0.25): {rates}")
    assert abs(rates[1.0] - 0.25) < abs(rates[0.0] - 0.25)


# ---- the Trainer -----------------------------------------------------------------------------------
class ToyDataset(Dataset):
    def __init__(self, inputs: dict) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return self.inputs["labels"].shape[0]

    def __getitem__(self, index: int) -> dict:
        return {k: v[index] for k, v in self.inputs.items()}


def stack(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_trainer_changes_only_the_predictors_and_logs_grpo(toy, tmp_path):
    model = tiny_model()
    freeze_for_grpo(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    grpo = GRPOConfig(num_samples=3, num_iterations=2)
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=ToyDataset(toy), data_collator=stack, grpo=grpo
    )
    rollouts = []
    original = trainer._rollout_loss
    trainer._rollout_loss = lambda *a: (rollouts.append(1), original(*a))[1]
    trainer.train()
    assert len(rollouts) == 4  # 4 steps x 2 micro-batches, one rollout per 2 iterations
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".predictors." in k for k in changed)
    logs = [h for h in trainer.state.log_history if "grpo_reward" in h]
    assert len(logs) == 2
    for key in ("grpo_reward_std", "grpo_advantage_std", "grpo_clip_fraction", "compression", "loss"):
        assert key in logs[-1]


# ---- configuration ---------------------------------------------------------------------------------
def test_demo_config_selects_grpo_from_the_supervised_checkpoint():
    cfg = load_run_config(["+experiments=magnet_demo_grpo"])
    assert cfg.training.grpo and cfg.encoder.name == "runs/magnet_demo/final"
    assert cfg.compressor.enabled and cfg.compressor.curriculum == "none"
    supervised = load_run_config(["+experiments=magnet_demo"])
    assert list(cfg.compressor.layers) == list(supervised.compressor.layers)
    assert cfg.compressor.target == supervised.compressor.target
    assert cfg.compressor.boundaries_per_unit == supervised.compressor.boundaries_per_unit
    cls, extra = trainer_class(cfg)
    assert cls is GRPOTrainer and extra["grpo"] == GRPOConfig.from_run_config(cfg)
    grpo = extra["grpo"]
    assert (
        grpo.num_samples >= 2
        and grpo.num_iterations > 1
        and grpo.clip_epsilon
        and grpo.boundary_loss_weight > 0
    )
    assert trainer_class(supervised) == (MagnetTrainer, {})


def test_policy_model_loads_a_magnet_checkpoint_with_its_predictors(tmp_path):
    model = tiny_model(predictor_settings={**FIXED, "target": "phoneme"})
    with torch.no_grad():
        model.model.encoder.predictors["1"].mlp[-1].bias.fill_(1.25)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = load_run_config(["+experiments=magnet_demo_grpo", f"encoder.name={tmp_path / 'ckpt'}"])
    loaded = load_policy_model(cfg)
    assert loaded.model.encoder.predictors["1"].mlp[-1].bias.item() == 1.25
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".predictors." in n for n in trainable)
    bad = load_run_config(
        ["+experiments=magnet_demo_grpo", f"encoder.name={tmp_path / 'ckpt'}", "compressor.layers=[0]"]
    )
    with pytest.raises(ValueError, match="make them agree"):
        load_policy_model(bad)
