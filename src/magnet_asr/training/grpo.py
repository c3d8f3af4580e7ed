"""GRPO: reinforcement learning of the boundary predictors on the ASR loss they cause.

The supervised recipe trains a predictor through a straight-through estimator and a count loss. GRPO
instead treats it as a stochastic policy over boundary configurations and rewards each configuration by
the transcript loss it leads to, so the predictor learns *where* boundaries help recognition, not only
*how many* there are. One training step on ``B`` utterances ``x_i`` with transcripts ``y_i``:

1. **Rollout**, one batched forward pass (``MagnetWhisper(..., num_boundary_samples=K)``): the first
   predictor draws ``K`` configurations per utterance, ``b_ik ~ pi_theta(. | s_i) = prod_t Bernoulli(p_t)``
   over the free frames ``t`` (the last real frame is always a boundary, padding never is); rows are
   input-major, row ``i * K + k`` is draw ``k`` of utterance ``i``.
2. **Reward** per configuration: ``r_ik = -l_ASR(y_i | x_i, b_ik) - lambda * c(b_ik)``, with ``l_ASR``
   the utterance's mean token cross-entropy and ``c`` a per-utterance compression penalty
   (:data:`PENALTIES`).
3. **Group-normalized advantage** (GRPO's outcome supervision: Shao et al., 2024, *DeepSeekMath*,
   arXiv:2402.03300, section 4.1.2)::

       A_ik = (r_ik - mean_k r_i.) / (std_k r_i. + eps)

   The group of ``K`` draws of one utterance is its own baseline: no value network, and utterances of
   different difficulty contribute equally.
4. **Clipped surrogate** on per-frame probability ratios ``rho_ikt = pi_theta(b_ikt) / pi_old(b_ikt)``
   (PPO: Schulman et al., 2017, arXiv:1707.06347, eq. 7), averaged over all free frames of the batch
   (the token-level mean of DAPO, Yu et al., 2025, arXiv:2503.14476, rather than GRPO's per-sequence
   ``1/|o_i|``, which would weigh a frame of a short utterance more than one of a long utterance)::

       L = -sum_ikt min(rho_ikt A_ik, clip(rho_ikt, 1 - epsilon, 1 + epsilon) A_ik) / sum_ik |free_ik|

5. **Inner iterations** (``mu = num_iterations``, GRPO's Algorithm 1): a rollout is buffered and reused
   for ``mu`` optimizer steps, recomputing only the predictors' log-probabilities of the stored draws on
   the stored predictor inputs (the policy's states). TRL's ``GRPOTrainer`` buffers rollouts the same
   way but has its sampler repeat each batch for the reuse steps; here the batches the Trainer fetches
   during the ``mu - 1`` reuse steps are skipped, so a run sees ``max_steps / mu`` distinct batches.
   With ``mu = 1``, ``rho = 1`` and the gradient is REINFORCE with a group baseline, ``-A grad log pi``;
   clipping only matters from the second iteration on.

The policy gradient reaches the predictors' boundary logits only: everything else is frozen by
:func:`freeze_for_grpo` unless ``train_all``; then the layers below a predictor learn through
``log pi`` and, with ``asr_loss_weight > 0``, the whole model (an attention-pooling query included)
also learns the mean ASR loss of the sampled configurations. Not implemented: DeepSeekMath's
``beta * KL(pi_theta || pi_ref)`` anchor to a reference policy (the compression penalty anchors the
boundary rate; nothing anchors the placement). Predictor dropout (off by default) makes the stored and
recomputed log-probabilities differ; keep it at 0 for exact ratios.

Select it with ``training.grpo: true`` (fields ``training.grpo_*`` in :class:`~magnet_asr.schema.TrainingConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magnet_asr.compression import BoundaryPredictor, binomial_count_loss, group_samples, ratio_loss
from magnet_asr.compression.losses import repulsion_loss
from magnet_asr.compression.pooling import frame_mask, last_real_frame
from magnet_asr.compression.predictor import threshold_boundaries
from magnet_asr.data.collator import IGNORE_INDEX
from magnet_asr.training.trainer import MagnetTrainer

if TYPE_CHECKING:
    from magnet_asr.models import MagnetWhisper

__all__ = [
    "PENALTIES",
    "GRPOConfig",
    "FrameLogProbs",
    "GRPOTrainer",
    "PredictorStep",
    "Rollout",
    "boundary_penalty",
    "clipped_surrogate",
    "collect_rollout",
    "count_penalty",
    "frame_log_probs",
    "freeze_for_grpo",
    "grpo_enabled",
    "grpo_loss",
    "group_advantages",
    "load_policy_model",
    "per_sample_asr_loss",
    "policy_predictors",
    "setup_grpo",
    "trainer_class",
]

#: ``count``: ``sum_j |k_j - k*_j| / max(k*_j, 1)`` (relative error of each predictor's segment count
#: against its target count); ``boundary``: the predictors' own configured boundary losses, per
#: utterance; ``none``: the ASR loss alone (the compression is then free to drift).
PENALTIES = ("count", "boundary", "none")


@dataclass
class GRPOConfig:
    """GRPO settings (from ``training.grpo_*`` in a run config, see :meth:`from_run_config`).

    Attributes:
        num_samples: ``K``, boundary configurations drawn per utterance (>= 2: a group needs a spread).
        penalty: compression penalty ``c`` in the reward, one of :data:`PENALTIES`.
        penalty_weight: ``lambda``, its weight against the ASR loss.
        clip_epsilon: PPO clip range ``epsilon``; ``None`` for the unclipped importance-weighted objective.
        num_iterations: ``mu``, optimizer steps per rollout.
        advantage_eps: ``eps`` in the advantage's denominator.
        boundary_loss_weight: weight of the predictors' own (supervised) boundary loss, from their regular
            forward on the stored inputs, added to the loss. It anchors the *evaluation* compression:
            eval mode thresholds ``p > threshold`` while GRPO trains the Bernoulli(p) sampling rate, and
            the two drift apart unless the probabilities are confident. 0 = pure GRPO.
        asr_loss_weight: weight of the sampled configurations' mean ASR loss added to the loss (only useful
            with ``train_all``: the predictors get no ASR gradient through sampled boundaries).
        train_all: keep every weight trainable instead of freezing all but the predictors.
    """

    num_samples: int = 4
    penalty: str = "count"
    penalty_weight: float = 1.0
    clip_epsilon: float | None = 0.2
    num_iterations: int = 1
    advantage_eps: float = 1e-4
    boundary_loss_weight: float = 0.0
    asr_loss_weight: float = 0.0
    train_all: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.num_samples < 2:
            problems.append(
                f"num_samples must be >= 2 (advantages are normalized per group), got {self.num_samples}"
            )
        if self.penalty not in PENALTIES:
            problems.append(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if min(self.penalty_weight, self.asr_loss_weight, self.boundary_loss_weight) < 0:
            problems.append("penalty_weight, boundary_loss_weight and asr_loss_weight must be >= 0")
        if self.clip_epsilon is not None and not 0 < self.clip_epsilon < 1:
            problems.append(f"clip_epsilon must be in (0, 1) or None, got {self.clip_epsilon}")
        if self.num_iterations < 1:
            problems.append(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.advantage_eps <= 0:
            problems.append(f"advantage_eps must be > 0, got {self.advantage_eps}")
        if problems:
            raise ValueError("invalid GRPO settings: " + "; ".join(problems))

    @classmethod
    def from_run_config(cls, cfg: Any) -> GRPOConfig:
        """From the ``training.grpo_*`` fields of a composed run config."""
        t = cfg.training
        return cls(
            num_samples=t.grpo_num_samples,
            penalty=t.grpo_penalty,
            penalty_weight=t.grpo_penalty_weight,
            clip_epsilon=t.grpo_clip_epsilon,
            num_iterations=t.grpo_num_iterations,
            boundary_loss_weight=t.grpo_boundary_loss_weight,
            asr_loss_weight=t.grpo_asr_loss_weight,
            train_all=t.grpo_train_all,
        )


def grpo_enabled(cfg: Any) -> bool:
    """Whether a run config asks for GRPO (``training.grpo: true``) rather than supervised training."""
    return bool(getattr(cfg.training, "grpo", False))


# ---- rewards and advantages ------------------------------------------------------------------------
def per_sample_asr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` mean token cross-entropy of each row of ``logits (N, T, V)`` against ``labels (N, T)``
    (-100 = ignored); a row without labels gets 0."""
    tokens = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    valid = labels != IGNORE_INDEX
    return (tokens * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


def count_penalty(boundary_outputs: tuple[Any, ...]) -> Tensor:
    """``(N,)`` ``sum_j |k_j - k*_j| / max(k*_j, 1)``: each predictor's relative segment-count error."""
    total = None
    for out in boundary_outputs:
        counts = out.num_boundaries.float()
        error = (counts - out.target_counts).abs() / out.target_counts.clamp_min(1)
        total = error if total is None else total + error
    if total is None:
        raise ValueError("no boundary outputs: the model has no predictor")
    return total


def boundary_penalty(boundary_outputs: tuple[Any, ...], predictors: list[BoundaryPredictor]) -> Tensor:
    """``(N,)`` each utterance's boundary loss: the predictors' configured losses (``loss``,
    ``loss_weights``) evaluated on that row alone, summed over predictors (the losses normalize by the
    row's real frames, so this is the per-utterance version of ``BoundaryOutput.loss``)."""
    total = None
    for out, predictor in zip(boundary_outputs, predictors, strict=True):
        c = predictor.config
        rows = []
        for i in range(out.boundaries.shape[0]):
            b, m = out.boundaries[i : i + 1].detach(), out.mask[i : i + 1]
            t = out.target_counts[i : i + 1]
            value = b.new_zeros(())
            for name, weight in zip(c.loss, c.loss_weights or (), strict=True):
                if name == "binomial":
                    term = binomial_count_loss(b, m, target_counts=t)
                elif name == "ratio":
                    term = ratio_loss(b, out.probs[i : i + 1].detach(), m, target_counts=t)
                else:
                    term = repulsion_loss(b, m, distance=c.repulsion_distance)
                value = value + weight * term
            rows.append(value)
        per_row = torch.stack(rows)
        total = per_row if total is None else total + per_row
    if total is None:
        raise ValueError("no boundary outputs: the model has no predictor")
    return total


def group_advantages(rewards: Tensor, num_samples: int, eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``A_ik = (r_ik - mean_k r_i.) / (std_k r_i. + eps)`` for input-major rewards
    ``(B*K,)`` (row ``i*K + k``); ``std`` is the unbiased sample standard deviation. Same layout out.
    A group whose rewards are all equal gets zero advantages (nothing to learn from it). Computed in
    float64: reward spreads within a group can be tiny next to the rewards themselves."""
    groups = group_samples(rewards.double(), num_samples)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1).float()


# ---- the policy ------------------------------------------------------------------------------------
def policy_predictors(model: nn.Module) -> list[BoundaryPredictor]:
    """The predictors of a (possibly wrapped) ``MagnetWhisper``, in the order the encoder runs them."""
    module: Any = getattr(model, "module", model)  # DDP
    predictors = module.model.encoder.predictors
    return [predictors[key] for key in sorted(predictors, key=int)]


class FrameLogProbs(NamedTuple):
    """Per-frame quantities of a policy evaluation, all ``(N, L)``."""

    log_prob: Tensor  # log pi(b_t), 0 off the free frames
    free: Tensor  # bool: real and not the forced last frame
    entropy: Tensor  # Bernoulli entropy, 0 off the free frames
    logits: Tensor  # boundary logits z_t


def frame_log_probs(
    predictor: BoundaryPredictor, hidden: Tensor, mask: Tensor, actions: Tensor
) -> FrameLogProbs:
    """Per-frame log-probabilities of drawn boundaries under the predictor's current parameters.

    ``hidden (B, L, D)`` and ``mask (B, L)`` are what the predictor decided on; ``actions (R*B, L)`` the
    drawn 0/1 boundaries, ``R`` draws per row, input-major (the logits are repeated to match). Returns
    ``log_prob (R*B, L)`` = ``b log p + (1 - b) log(1 - p)`` on free frames and 0 elsewhere, the free-frame
    mask ``(R*B, L)`` (real and not the forced last frame), and the Bernoulli entropy per frame
    ``H = softplus(z) - p z`` (0 off the free frames), and the logits. Summed over frames, ``log_prob``
    equals ``BoundaryOutput.log_prob`` of the draw.
    """
    real = frame_mask(mask, hidden.shape[0], hidden.shape[1], hidden.device)
    logits = predictor.boundary_logits(hidden, real)
    repeats = actions.shape[0] // hidden.shape[0]
    if repeats * hidden.shape[0] != actions.shape[0]:
        raise ValueError(f"actions {tuple(actions.shape)} are not a multiple of hidden {tuple(hidden.shape)}")
    if repeats > 1:
        logits = logits.repeat_interleave(repeats, dim=0)
        real = real.repeat_interleave(repeats, dim=0)
    free = real & ~last_real_frame(real)
    log_prob = -F.binary_cross_entropy_with_logits(logits, actions.float(), reduction="none") * free
    entropy = (F.softplus(logits) - torch.sigmoid(logits) * logits) * free
    return FrameLogProbs(log_prob, free, entropy, logits)


@dataclass
class PredictorStep:
    """One predictor's part of a rollout: its state, the draws and their log-probabilities then."""

    hidden: Tensor  # (B_j, L_j, D) detached predictor input
    mask: Tensor  # (B_j, L_j)
    actions: Tensor  # (N, L_j) drawn boundaries
    old_log_prob: Tensor  # (N, L_j) per-frame log pi_old, 0 off the free frames
    target_counts: Tensor | None = None  # (B_j,) the boundary counts the predictor aimed at


@dataclass
class Rollout:
    """``K`` sampled boundary configurations per utterance with their rewards and advantages."""

    num_samples: int
    rewards: Tensor  # (N,) N = K * B, input-major
    advantages: Tensor  # (N,)
    steps: list[PredictorStep]
    stats: dict[str, float] = field(default_factory=dict)


def collect_rollout(
    model: nn.Module, inputs: dict[str, Any], config: GRPOConfig, track_grad: bool = False
) -> tuple[Rollout, Any]:
    """Draw ``K`` configurations per utterance in one forward pass; reward them and normalize per group.

    ``inputs`` are a ``WhisperCollator`` batch (``input_features``, ``attention_mask``, ``labels`` per
    utterance, optional ``target_counts``). Returns the :class:`Rollout` and the model output, whose
    ``predictor_inputs`` keep their graph when ``track_grad`` (for :func:`grpo_loss`'s ``live_inputs``:
    then trainable layers below a predictor learn too, and ``asr_loss`` can be backpropagated).
    """
    k = config.num_samples
    with torch.set_grad_enabled(track_grad):
        outputs = model(**inputs, num_boundary_samples=k)
    predictors = policy_predictors(model)
    with torch.no_grad():
        asr = per_sample_asr_loss(outputs.logits, inputs["labels"].repeat_interleave(k, dim=0))
        if config.penalty == "count":
            penalty = count_penalty(outputs.boundary_outputs)
        elif config.penalty == "boundary":
            penalty = boundary_penalty(outputs.boundary_outputs, predictors)
        else:
            penalty = torch.zeros_like(asr)
        rewards = -asr - config.penalty_weight * penalty
        advantages = group_advantages(rewards, k, config.advantage_eps)
        steps = []
        for predictor, (hidden, mask), out in zip(
            predictors, outputs.predictor_inputs, outputs.boundary_outputs, strict=True
        ):
            actions = out.boundaries.detach()
            old = frame_log_probs(predictor, hidden.detach(), mask, actions).log_prob
            targets = out.target_counts[:: actions.shape[0] // hidden.shape[0]]  # one per input row
            steps.append(PredictorStep(hidden.detach(), mask, actions, old, targets))
        groups = group_samples(rewards, k)
        stats = {
            "grpo_reward": float(rewards.mean()),
            "grpo_reward_std": float(groups.std(dim=1).mean()),  # spread within a group, averaged
            "grpo_asr_loss": float(asr.mean()),
            "grpo_penalty": float(penalty.mean()),
            "grpo_advantage_mean": float(advantages.mean()),
            "grpo_advantage_std": float(advantages.std()),
            "grpo_advantage_abs_max": float(advantages.abs().max()),
        }
    return Rollout(k, rewards, advantages, steps, stats), outputs


def clipped_surrogate(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    free: Tensor,
    clip_epsilon: float | None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped objective on per-frame ratios, averaged over the free frames (negated: a loss).

    ``rho = exp(log_prob - old_log_prob)`` ``(N, L)``, ``advantages (N,)`` broadcast over frames::

        loss = -sum_{n,t} free_nt min(rho_nt A_n, clip(rho_nt, 1 - eps, 1 + eps) A_n) / sum free

    ``clip_epsilon=None`` drops the clipped branch. Also returns the mean ratio, the fraction of frames
    where the clipped branch is active, and the sample estimate ``mean(old - new)`` of KL(old || new).
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.detach().to(ratio.dtype).unsqueeze(1)
    objective = ratio * adv
    clipped = torch.zeros_like(free)
    if clip_epsilon is not None:
        bounded = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv
        clipped = (bounded < objective) & free
        objective = torch.minimum(objective, bounded)
    n = free.sum().clamp_min(1)
    loss = -(objective * free).sum() / n
    with torch.no_grad():
        stats = {
            "grpo_ratio": float((ratio * free).sum() / n),
            "grpo_clip_fraction": float(clipped.sum() / n),
            "grpo_approx_kl": float(((old_log_prob - log_prob) * free).sum() / n),
        }
    return loss, stats


def grpo_loss(
    predictors: list[BoundaryPredictor],
    rollout: Rollout,
    config: GRPOConfig,
    live_inputs: tuple[tuple[Tensor, Tensor], ...] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped GRPO loss of a rollout under the predictors' current parameters.

    Log-probabilities are recomputed from the stored predictor inputs, or from ``live_inputs`` (the
    rollout forward's ``predictor_inputs`` with their graph) so that trainable layers below a predictor
    get the gradient too. Frames of all predictors are pooled into one average.
    """
    log_probs, olds, frees, entropies, anchors = [], [], [], [], []
    eval_rates: dict[str, float] = {}
    for j, (predictor, step) in enumerate(zip(predictors, rollout.steps, strict=True)):
        hidden, mask = live_inputs[j] if live_inputs is not None else (step.hidden, step.mask)
        frames = frame_log_probs(predictor, hidden, mask, step.actions)
        log_probs.append(frames.log_prob)
        olds.append(step.old_log_prob)
        frees.append(frames.free)
        entropies.append(frames.entropy)
        with torch.no_grad():  # what eval mode decides on the free frames
            c = predictor.config
            decided = threshold_boundaries(frames.logits, frames.free, c.threshold, c.peak_threshold)
            eval_rates[f"grpo_eval_rate_{j}"] = float(decided.sum() / frames.free.sum().clamp_min(1))
        if config.boundary_loss_weight > 0:
            anchors.append(predictor(hidden, mask, target_counts=step.target_counts).loss)
    free = torch.cat(frees, dim=1)
    loss, stats = clipped_surrogate(
        torch.cat(log_probs, dim=1), torch.cat(olds, dim=1), rollout.advantages, free, config.clip_epsilon
    )
    stats["grpo_entropy"] = float(torch.cat(entropies, dim=1).detach().sum() / free.sum().clamp_min(1))
    stats.update(eval_rates)
    if anchors:
        anchor = torch.stack(anchors).sum()
        stats["grpo_boundary_loss"] = float(anchor.detach())
        loss = loss + config.boundary_loss_weight * anchor
    return loss, stats


# ---- model setup -----------------------------------------------------------------------------------
def freeze_for_grpo(model: nn.Module, train_all: bool = False) -> list[str]:
    """Freeze every parameter outside the boundary predictors (unless ``train_all``); returns the names
    of the parameters left trainable. A model without predictors is an error: there is no policy."""
    from magnet_asr.compression.schedules import freeze_all_but_predictors

    if not policy_predictors(model):
        raise ValueError("GRPO trains boundary predictors, and this model has none (compressor.enabled)")
    if not train_all:
        freeze_all_but_predictors(model)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_policy_model(cfg: Any) -> MagnetWhisper:
    """The model GRPO starts from (:func:`~magnet_asr.training.builders.build_magnet_whisper`: a
    ``MagnetWhisper`` checkpoint with its trained predictors, or any Whisper checkpoint with new ones),
    frozen by :func:`freeze_for_grpo`. ``encoder.freeze`` and ``encoder.gradient_checkpointing`` apply
    as in the supervised recipe.
    """
    from magnet_asr.training.builders import build_magnet_whisper

    if not cfg.compressor.enabled:
        raise ValueError("GRPO trains boundary predictors: set compressor.enabled (and its layers)")
    model = build_magnet_whisper(cfg)
    freeze_for_grpo(model, train_all=cfg.training.grpo_train_all)
    if cfg.encoder.freeze:
        for name, param in model.model.encoder.named_parameters():
            param.requires_grad = param.requires_grad and "predictors." in name
    if cfg.encoder.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def setup_grpo(cfg: Any) -> Any:
    """A GRPO run's :class:`~magnet_asr.training.builders.ModelSetup`: :func:`load_policy_model`, the
    checkpoint's tokenizer, a ``WhisperCollator`` with the compressor's targets, the recognizer for
    validation WER, and the predictors' learning rate."""
    from magnet_asr.training.builders import magnet_whisper_setup

    return magnet_whisper_setup(cfg, load_policy_model(cfg))


def trainer_class(cfg: Any) -> tuple[type[MagnetTrainer], dict[str, Any]]:
    """The Trainer class for a run config and its extra keyword arguments: ``(GRPOTrainer, {"grpo":
    GRPOConfig})`` when ``training.grpo`` is set, else ``(MagnetTrainer, {})``."""
    if grpo_enabled(cfg):
        return GRPOTrainer, {"grpo": GRPOConfig.from_run_config(cfg)}
    return MagnetTrainer, {}


# ---- the trainer -----------------------------------------------------------------------------------
class GRPOTrainer(MagnetTrainer):
    """``MagnetTrainer`` whose training loss is GRPO's (module docstring); evaluation is unchanged.

    Each ``mu = num_iterations`` steps (per gradient-accumulation slot) a new rollout is drawn from the
    incoming batch; the steps in between reuse it (their batches are not used). Logged next to
    ``loss``: ``grpo_reward`` (mean), ``grpo_reward_std`` (within groups), ``grpo_asr_loss``,
    ``grpo_penalty``, advantage mean / std / max, ratio, clip fraction, approximate KL, policy entropy,
    and the sampled configurations' ``compression`` and boundary rates.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; the Trainer divides

    def __init__(self, *args: Any, grpo: GRPOConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grpo = grpo or GRPOConfig()
        if self.grpo.num_iterations > 1 and self.accelerator.num_processes > 1:
            raise ValueError(
                "GRPO num_iterations > 1 recomputes log-probabilities outside the model's forward, which "
                "DDP cannot synchronize; use num_iterations=1 with several processes"
            )
        assert self.model is not None  # Trainer.__init__ builds it (model or model_init)
        policy_predictors(self.model)  # fails early on a model that is not a MagnetWhisper
        self._rollouts: dict[int, Rollout | None] = {}
        self._micro_step = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation / prediction: the supervised loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        accumulation = max(self.args.gradient_accumulation_steps, 1)
        slot = self._micro_step % accumulation
        iteration = (self._micro_step // accumulation) % self.grpo.num_iterations
        self._micro_step += 1
        outputs = None
        if iteration == 0:
            loss, outputs = self._rollout_loss(model, inputs, slot)
        else:
            loss = self._reuse_loss(model, slot)
        return (loss, outputs) if return_outputs else loss

    def _zero_loss(self) -> Tensor:
        return torch.zeros((), device=self.args.device, requires_grad=True)

    def _rollout_loss(self, model, inputs: dict[str, Any], slot: int) -> tuple[Tensor, Any]:
        dropped = int(inputs.pop("num_skipped", 0))
        self._rollouts[slot] = None
        # decided by every rank together (MagnetTrainer.skip_together): a rank that skipped the rollout
        # alone would leave the others in the forward's and the backward's collectives
        if self.skip_together("input_features" not in inputs, dropped):  # the whole batch was bad
            return self.skipped_loss(model), None
        predictors = policy_predictors(model)
        inside = {id(p) for predictor in predictors for p in predictor.parameters()}
        # Without a graph from the forward pass, the loss is recomputed on the stored predictor inputs
        # (cheaper: no activations kept). A graph is needed when layers below a predictor train, for the
        # ASR term, and under DDP, whose gradient synchronization is armed by a forward with gradients.
        track = (
            self.grpo.asr_loss_weight > 0
            or self.accelerator.num_processes > 1
            or any(p.requires_grad for p in model.parameters() if id(p) not in inside)
        )
        rollout, outputs = collect_rollout(model, inputs, self.grpo, track_grad=track)
        live = outputs.predictor_inputs if track else None
        loss, stats = grpo_loss(predictors, rollout, self.grpo, live_inputs=live)
        if self.grpo.asr_loss_weight > 0:
            loss = loss + self.grpo.asr_loss_weight * outputs.asr_loss
        # a NaN reward would poison every advantage of its group; the zero-weighted loss keeps the graph
        # a normal step backpropagates through
        finite = bool(torch.isfinite(rollout.rewards).all()) and bool(torch.isfinite(loss))
        if self.skip_together(not finite):
            return self.skipped_loss(model, loss), outputs
        self._rollouts[slot] = rollout
        self._record(outputs)
        self._log_stats({**rollout.stats, **stats})
        return loss, outputs

    def _reuse_loss(self, model, slot: int) -> Tensor:
        rollout = self._rollouts.get(slot)
        if rollout is None:  # its rollout batch was skipped
            return self._zero_loss()
        loss, stats = grpo_loss(policy_predictors(model), rollout, self.grpo)
        self._log_stats(stats)
        return loss

    def _log_stats(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self._window[key].append(value)
