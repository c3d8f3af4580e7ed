"""BoundaryPredictor: config validation, conventions, padding invariance, sampling for RL, gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from magnet_asr.compression import (
    BoundaryPredictor,
    BoundaryPredictorConfig,
    downsample,
    group_samples,
    sinusoidal_positions,
)
from magnet_asr.compression.predictor import threshold_boundaries

DIM = 8
VARIANTS = list(itertools.product(["mlp", "cosine"], ["mean", "attention"]))


def batch(seed: int = 0, lengths: tuple[int, ...] = (13, 9, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), max(lengths), DIM, generator=gen)
    mask = (torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    return hidden, mask


def predictor(variant: str = "mlp", pooling: str = "mean", seed: int = 0, **kwargs) -> BoundaryPredictor:
    torch.manual_seed(seed)
    return BoundaryPredictor(
        BoundaryPredictorConfig(hidden_size=DIM, variant=variant, pooling=pooling, **kwargs)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "gru"}, "variant must be one of"),
        ({"prior": 0.0}, "prior is a boundary rate"),
        ({"prior": 1.0}, "prior is a boundary rate"),
        ({"temperature": 0.0}, "temperature"),
        ({"threshold": 1.5}, "threshold"),
        ({"pooling": "max"}, "pooling"),
        ({"target": "word"}, "target"),
        ({"loss": ("binomial", "entropy")}, "unknown loss"),
        ({"loss": ("binomial",), "loss_weights": (1.0, 2.0)}, "loss_weights"),
        ({"repulsion_distance": 1}, "repulsion_distance"),
        ({"reembed_positions": True, "hidden_size": 7}, "even hidden_size"),
        ({"variant": "cosine", "mlp_hidden_size": 4}, "only applies"),
        ({"peak_threshold": 0.5}, "peak_threshold"),
        ({"peak_threshold": 0.0}, "peak_threshold"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    kwargs = {"hidden_size": DIM, **kwargs}
    with pytest.raises(ValueError, match=message):
        BoundaryPredictorConfig(**kwargs)


def test_config_round_trips_through_a_dict() -> None:
    config = BoundaryPredictorConfig(hidden_size=DIM, loss="ratio", prior=0.25)
    assert config.loss == ("ratio",) and config.loss_weights == (1.0,)
    assert config.compression_factor == 4.0
    again = BoundaryPredictorConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown BoundaryPredictorConfig field"):
        BoundaryPredictorConfig.from_dict({**config.to_dict(), "priors": 0.1})


def test_mlp_starts_at_the_prior_rate() -> None:
    model = predictor(prior=0.1)
    hidden, mask = batch()
    probs = torch.sigmoid(model.boundary_logits(hidden, mask.bool()))
    assert probs.sub(0.1).abs().max() < 0.01


def test_cosine_starts_as_identity_routing() -> None:
    model = predictor("cosine")
    hidden, mask = batch()
    probs = torch.sigmoid(model.boundary_logits(hidden, mask.bool()))[:, :-1]
    cos = torch.nn.functional.cosine_similarity(hidden[:, 1:], hidden[:, :-1], dim=-1)
    torch.testing.assert_close(probs, (1 - cos) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant, pooling", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_last_real_frame_closes_and_padding_never_does(variant: str, pooling: str, training: bool) -> None:
    model = predictor(variant, pooling)
    model.train(training)
    hidden, mask = batch()
    out = model(hidden, mask)
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert out.boundaries[i, n - 1] == 1 and out.probs[i, n - 1] == 1
        assert torch.all(out.boundaries[i, n:] == 0) and torch.all(out.probs[i, n:] == 0)
    assert torch.equal(out.num_boundaries, out.boundaries.detach().sum(1).long())
    assert torch.equal(out.num_positions, lengths)
    assert torch.equal(out.pooled_mask.sum(1), out.num_boundaries)
    expected, _ = downsample(hidden, out.boundaries.detach(), mask)
    if pooling == "mean":  # attention starts as the mean too, up to rounding
        assert torch.equal(out.pooled, expected)
    else:
        torch.testing.assert_close(out.pooled, expected)


@pytest.mark.parametrize("variant, pooling", VARIANTS)
def test_eval_padding_invariance(variant: str, pooling: str) -> None:
    model = predictor(variant, pooling, reembed_positions=True).eval()
    if pooling == "attention":  # make the query matter
        with torch.no_grad():
            model.attention.query.normal_()
    hidden, mask = batch(1, lengths=(17, 11, 6, 1))
    hidden[~mask.bool()] = 1e4  # loud padding must not leak into any real output
    out = model(hidden, mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = model(hidden[i : i + 1, :n], None)
        s = int(alone.num_boundaries)
        assert torch.equal(alone.boundaries[0], out.boundaries[i, :n])
        torch.testing.assert_close(alone.pooled[0], out.pooled[i, :s], atol=1e-5, rtol=1e-5)
        assert torch.all(out.pooled[i, s:] == 0)
        torch.testing.assert_close(alone.log_prob[0], out.log_prob[i], atol=1e-5, rtol=1e-5)


def test_eval_thresholds_probabilities() -> None:
    model = predictor(threshold=0.5).eval()
    with torch.no_grad():
        model.mlp[-1].bias.fill_(2.0)  # every probability ~0.88
    hidden, mask = batch()
    out = model(hidden, mask)
    assert torch.equal(out.boundaries, mask.float())
    model.config.threshold = 0.95
    assert torch.equal(model(hidden, mask).num_boundaries, torch.ones(3, dtype=torch.long))


def test_peak_threshold_keeps_local_maxima_below_the_threshold() -> None:
    p = torch.tensor([[0.1, 0.4, 0.45, 0.2, 0.9, 0.95, 0.1, 0.3, 0.3, 0.05, 0.35, 0.0]])
    logits = torch.log(p.clamp_min(1e-6)) - torch.log1p(-p)
    real = torch.ones_like(p, dtype=torch.bool)
    real[0, -1] = False  # padding is never a boundary and never a neighbour that wins
    ends = lambda rule: rule[0].nonzero().flatten().tolist()  # noqa: E731
    assert ends(threshold_boundaries(logits, real)) == [4, 5]
    # the bump 0.4/0.45 fires once at its top; confident neighbours 0.9/0.95 both stay; of the tie
    # 0.3/0.3 the later (p_t >= p_{t-1}, p_t > p_{t+1}); 0.35 before padding is a peak
    assert ends(threshold_boundaries(logits, real, 0.5, 0.25)) == [2, 4, 5, 8, 10]
    assert ends(threshold_boundaries(logits, real, 0.5, 0.42)) == [2, 4, 5]


def test_peak_threshold_applies_in_eval_and_threshold_training() -> None:
    hidden, mask = batch()
    for training in (False, True):
        model = predictor(train_sampling="threshold", peak_threshold=0.2, loss=()).train(training)
        out = model(hidden, mask)
        real = mask.bool()
        logits = torch.log(out.probs) - torch.log1p(-out.probs)
        expected = threshold_boundaries(logits, real, 0.5, 0.2) | (out.probs == 1.0)
        assert torch.equal(out.boundaries.detach().bool(), expected & real)


def test_gumbel_boundary_rate_is_p_at_any_temperature() -> None:
    # docs/architecture.md trap: a Gumbel-sigmoid thresholded at 0.5 fires with probability p whatever tau is.
    model = predictor(prior=0.3).train()
    hidden = torch.randn(64, 200, DIM)
    rates = []
    for tau in (0.1, 1.0, 10.0):
        model.temperature = tau
        torch.manual_seed(1)
        out = model(hidden, None)
        free = out.boundaries[:, :-1]
        rates.append(float(free.detach().mean()))
    expected = float(out.probs[:, :-1].detach().mean())
    assert all(abs(r - expected) < 0.01 for r in rates), (rates, expected)
    model.eval()
    assert float(model(hidden, None).boundaries[:, :-1].mean()) == 0.0  # p ~ 0.3 < 0.5 everywhere


def test_threshold_training_is_deterministic_and_straight_through() -> None:
    # H-Net style: train on p > 0.5 itself, gradient straight through p.
    model = predictor("cosine", train_sampling="threshold", loss=()).train()
    hidden, mask = batch()
    first, second = model(hidden, mask), model(hidden, mask)
    assert torch.equal(first.boundaries, second.boundaries)
    expected = ((first.probs > 0.5) & mask.bool()).float()
    assert torch.equal(first.boundaries.detach(), expected)
    (first.pooled**2).sum().backward()
    assert model.q_proj.weight.grad is not None and model.q_proj.weight.grad.abs().sum() > 0


def test_straight_through_gradient_reaches_the_predictor_from_the_task() -> None:
    for variant in ("mlp", "cosine"):
        model = predictor(variant, loss=()).train()
        hidden, mask = batch()
        out = model(hidden, mask)
        assert out.loss.item() == 0.0
        (out.pooled**2).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 1e-4


def test_loss_combines_configured_terms_with_weights() -> None:
    model = predictor(loss=("binomial", "repulsion", "ratio"), loss_weights=(1.0, 2.0, 0.5), loss_weight=3.0)
    hidden, mask = batch()
    out = model(hidden, mask)
    assert set(out.losses) == {"binomial", "repulsion", "ratio"}
    expected = 3.0 * (out.losses["binomial"] + 2.0 * out.losses["repulsion"] + 0.5 * out.losses["ratio"])
    torch.testing.assert_close(out.loss, expected)
    model.loss_weight = 0.0  # what the schedule's ramp sets
    assert model(hidden, mask).loss.item() == 0.0


def test_target_counts_drive_the_loss_and_are_required_for_transcript_targets() -> None:
    model = predictor(target="phoneme").train()
    hidden, mask = batch()
    with pytest.raises(ValueError, match="needs target_counts"):
        model(hidden, mask)
    out = model(hidden, mask, target_counts=torch.tensor([4.0, 3.0, 1.0]))
    assert out.target_counts.tolist() == [4.0, 3.0, 1.0]
    model.eval()  # evaluation without transcripts falls back to the prior
    torch.testing.assert_close(model(hidden, mask).target_counts, mask.sum(1).float() * 0.2)


def test_sample_layout_log_prob_and_gradients() -> None:
    model = predictor(prior=0.4)
    hidden, mask = batch()
    hidden.requires_grad_(True)
    k = 5
    torch.manual_seed(3)
    out = model.sample(hidden, mask, num_samples=k)
    assert out.boundaries.shape == (3 * k, hidden.shape[1])
    grouped = group_samples(out.boundaries, k)  # input-major: row i * K + j is draw j of input i
    for i, n in enumerate(mask.sum(1).tolist()):
        assert torch.all(grouped[i, :, n - 1] == 1) and torch.all(grouped[i, :, n:] == 0)
    assert len({tuple(row.tolist()) for row in grouped[0]}) > 1  # draws differ
    # log_prob is the Bernoulli log-likelihood of each draw on the free positions
    probs = torch.sigmoid(model.boundary_logits(hidden, mask.bool())).detach().repeat_interleave(k, 0)
    b = out.boundaries
    free = out.mask & (torch.arange(b.shape[1]) < (out.num_positions - 1).unsqueeze(1))
    expected = (torch.where(b > 0, probs.log(), (1 - probs).log()) * free).sum(1)
    torch.testing.assert_close(out.log_prob, expected, atol=1e-5, rtol=1e-5)
    # REINFORCE: the policy gradient flows through log_prob only; pooled keeps its hidden gradient.
    assert not out.boundaries.requires_grad
    out.log_prob.sum().backward(retain_graph=True)
    assert model.mlp[-1].bias.grad is not None and model.mlp[-1].bias.grad.abs() > 0
    out.pooled.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_sample_rate_matches_probabilities() -> None:
    model = predictor(prior=0.25)
    hidden = torch.randn(4, 300, DIM)
    torch.manual_seed(0)
    out = model.sample(hidden, None, num_samples=8)
    assert abs(float(out.boundaries[:, :-1].mean()) - float(out.probs[:, :-1].detach().mean())) < 0.01


def test_reembedded_positions_follow_segment_index() -> None:
    plain = predictor(seed=4).eval()
    embedded = predictor(seed=4, reembed_positions=True).eval()
    for model in (plain, embedded):
        with torch.no_grad():
            model.mlp[-1].bias.fill_(2.0)  # a boundary on every frame: many segments
    hidden, mask = batch()
    a, b = plain(hidden, mask), embedded(hidden, mask)
    assert a.pooled.shape[1] == 13
    table = sinusoidal_positions(a.pooled.shape[1], DIM)
    torch.testing.assert_close(b.pooled - a.pooled, table.unsqueeze(0) * a.pooled_mask.unsqueeze(-1))
    # Whisper's table: channel 0 is sin(t), channel C/2 is cos(t), the last one cos(t / 10000)
    assert table[1, 0].item() == pytest.approx(math.sin(1.0))
    assert table[1, DIM // 2].item() == pytest.approx(math.cos(1.0))
    assert table[7, DIM - 1].item() == pytest.approx(math.cos(7 / 10000))


def test_low_precision_hidden_keeps_its_dtype() -> None:
    model = predictor().to(torch.bfloat16).eval()
    hidden, mask = batch()
    out = model(hidden.to(torch.bfloat16), mask)
    assert out.pooled.dtype == torch.bfloat16 and out.probs.dtype == torch.float32


def test_wrong_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="hidden must be"):
        predictor()(torch.zeros(2, 5, DIM + 1), None)


def test_phones_loss_learns_where_true_boundaries_are() -> None:
    # frames carry a marker channel on true phone ends; only the `phones` loss says where they are
    torch.manual_seed(0)
    config = BoundaryPredictorConfig(
        hidden_size=8, loss=("phones",), train_sampling="threshold", target="fixed", prior=0.25
    )
    predictor = BoundaryPredictor(config)
    hidden = torch.randn(4, 20, 8)
    ends = [[3, 7, 12, 19], [4, 9, 19], [2, 5, 8, 13, 16, 19], [6, 19]]
    phones = torch.zeros(4, 20)
    for row, frames in enumerate(ends):
        phones[row, frames] = 1.0
    hidden[..., 0] = 3.0 * phones
    optimizer = torch.optim.Adam(predictor.parameters(), lr=0.01)
    # target counts at the phone counts: no splits, the targets are the phone ends themselves
    counts = phones.sum(1)
    first = None
    for _ in range(150):
        out = predictor(hidden, None, target_counts=counts, phone_boundaries=phones)
        first = out.losses["phones"].item() if first is None else first
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.losses["phones"].item() < 0.1 * first
    predictor.eval()
    assert torch.equal(predictor(hidden).boundaries, phones)
    # rows without phone times (negative) add nothing; without phone_boundaries the term is 0
    unknown = predictor.train()(
        hidden, None, target_counts=counts, phone_boundaries=torch.full_like(phones, -1.0)
    )
    assert unknown.losses["phones"].item() == 0.0
    assert predictor(hidden, None, target_counts=counts).losses["phones"].item() == 0.0
    with pytest.raises(ValueError, match="stem"):
        predictor(hidden, None, target_counts=counts, phone_boundaries=phones[:, :10])


def test_split_long_segments_caps_every_segment_length() -> None:
    from magnet_asr.compression.predictor import split_long_segments

    b = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]).float()
    real = torch.tensor([[1] * 10 + [0] * 2, [1] * 7 + [0] * 5]).bool()
    # 10 frames -> 3 parts (4, 3, 3); segments of 2 and 5 -> 2 stays, 5 -> (3, 2); padding untouched
    expected = [[0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]]
    assert split_long_segments(b, real, 4).tolist() == expected
    assert torch.equal(split_long_segments(b, real, 10), b)  # nothing longer than the cap
    assert split_long_segments(b, real, 1).sum(1).tolist() == [10, 7]  # 1x


def test_cap_segments_tightens_the_cap_only_for_rows_pooled_past_max_compression() -> None:
    from magnet_asr.compression.predictor import cap_segments, split_long_segments

    # row 0: one boundary at the end of 12 frames; the cap of 4 gives 3 segments (4x), the floor at
    # 3x needs ceil(12 / 3) = 4: cap 3 gives exactly 4. Row 1: 8 segments of 9 frames already (1.1x).
    b = torch.tensor([[0] * 11 + [1], [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0]]).float()
    real = torch.tensor([[1] * 12, [1] * 9 + [0] * 3]).bool()
    capped = cap_segments(b, real, 4, max_compression=3.0)
    assert capped[0].tolist() == split_long_segments(b[:1], real[:1], 3)[0].tolist()
    assert capped.sum(1).tolist() == [4, 8]
    assert torch.equal(capped[1], split_long_segments(b, real, 4)[1])  # already dense: untouched
    assert torch.equal(cap_segments(b, real, 4), split_long_segments(b, real, 4))  # no floor
    # an unreachable floor ends at one segment per frame
    assert cap_segments(b, real, 4, max_compression=1.01).sum(1).tolist() == [12, 9]
    with pytest.raises(ValueError, match="max_compression"):
        BoundaryPredictorConfig(hidden_size=8, max_compression=3.5)  # needs max_segment_frames
    with pytest.raises(ValueError, match="max_compression"):
        BoundaryPredictorConfig(hidden_size=8, max_segment_frames=5, max_compression=1.0)
    config = BoundaryPredictorConfig(hidden_size=8, max_segment_frames=5, max_compression=3.5)
    assert BoundaryPredictorConfig(**config.to_dict()) == config  # saved with the model


def test_max_segment_frames_pools_capped_segments_and_scores_own_decisions() -> None:
    torch.manual_seed(0)
    settings = {"hidden_size": 8, "target": "fixed", "prior": 0.1, "train_sampling": "threshold"}
    free = BoundaryPredictor(BoundaryPredictorConfig(**settings))
    capped = BoundaryPredictor(BoundaryPredictorConfig(**settings, max_segment_frames=3))
    capped.load_state_dict(free.state_dict())
    with torch.no_grad():  # confident "no boundary" everywhere: one segment per sample
        for p in (free, capped):
            p.mlp[-1].bias.fill_(-8.0)
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    a, b = free.train()(hidden, mask), capped.train()(hidden, mask)
    assert a.num_boundaries.tolist() == [1, 1] and b.num_boundaries.tolist() == [4, 3]
    assert b.pooled.shape[1] == 4
    floored = BoundaryPredictor(
        BoundaryPredictorConfig(**settings, max_segment_frames=3, max_compression=2.0)
    )
    floored.load_state_dict(capped.state_dict())
    assert floored.eval()(hidden, mask).num_boundaries.tolist() == [6, 4]  # ceil(12 / 2), ceil(7 / 2)
    # the count loss judges the predictor's own decisions, identical in both
    torch.testing.assert_close(a.losses["binomial"], b.losses["binomial"])
    torch.testing.assert_close(a.log_prob, b.log_prob)
    b.pooled.sum().backward()
    assert hidden.grad is not None and capped.mlp[-1].weight.grad is not None
    with pytest.raises(ValueError, match="max_segment_frames"):
        BoundaryPredictorConfig(hidden_size=8, max_segment_frames=0)


def test_known_phone_times_set_the_count_target() -> None:
    config = BoundaryPredictorConfig(
        hidden_size=8, loss=("binomial", "phones"), loss_weights=(1.0, 1.0), target="phoneme"
    )
    predictor = BoundaryPredictor(config).train()
    phones = torch.full((2, 10), -1.0)
    phones[0] = 0.0
    phones[0, [2, 5, 9]] = 1.0
    out = predictor(
        torch.randn(2, 10, 8), None, target_counts=torch.tensor([2.0, 4.0]), phone_boundaries=phones
    )
    # row 0: three true boundaries outvote the transcript's 2; above them the splits count too
    assert out.target_counts.tolist() == [3.0, 4.0]
    more = predictor(
        torch.randn(2, 10, 8), None, target_counts=torch.tensor([5.0, 4.0]), phone_boundaries=phones
    )
    assert more.target_counts.tolist() == [5.0, 4.0]
