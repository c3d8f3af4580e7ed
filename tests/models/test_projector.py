"""AudioProjector: exact output lengths from the mask, padding invariance, output scale."""

from __future__ import annotations

import pytest
import torch

from magnet_asr.models.projector import (
    AudioProjector,
    EmbeddingCTCHead,
    embedding_rms,
    merge_ctc_spikes,
    stack_frames,
    stacked_lengths,
)


def _train_layers(projector: AudioProjector) -> AudioProjector:
    """Move the layers' zero-initialized output projections, as training does."""
    with torch.no_grad():
        for layer in projector.layers:
            for linear in (layer.self_attn.out_proj, layer.linear2):
                linear.weight.normal_(std=0.2)
    return projector


def test_stacked_lengths_round_up():
    lengths = torch.tensor([0, 1, 3, 4, 5, 8, 9])
    assert stacked_lengths(lengths, 4).tolist() == [0, 1, 1, 1, 2, 2, 3]
    assert stacked_lengths(lengths, 1).tolist() == lengths.tolist()


def test_stack_frames_concatenates_consecutive_frames_and_zero_fills_the_last_group():
    hidden = torch.arange(1, 15, dtype=torch.float32).reshape(1, 7, 2)
    stacked, mask = stack_frames(hidden, None, 3)
    assert stacked.shape == (1, 3, 6) and mask.tolist() == [[1, 1, 1]]
    assert stacked[0, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert stacked[0, 2].tolist() == [13, 14, 0, 0, 0, 0]


@pytest.mark.parametrize("num_layers", [0, 2])
@pytest.mark.parametrize("stack", [1, 2, 4])
def test_output_length_comes_from_the_mask_and_padding_does_not_leak(stack, num_layers):
    torch.manual_seed(0)
    projector = _train_layers(
        AudioProjector(6, 10, stack=stack, hidden_size=12, num_layers=num_layers, num_heads=2)
    ).eval()
    lengths = [9, 5, 1]
    hidden = torch.randn(3, 9, 6)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    noisy = hidden + 100.0 * (1 - mask[..., None])  # garbage in padding must not matter
    out, out_mask = projector(noisy, mask)
    with torch.no_grad():  # inference takes torch's fused Transformer path: the same outputs
        torch.testing.assert_close(projector(noisy, mask)[0], out, atol=1e-5, rtol=1e-5)
    assert out_mask.sum(1).tolist() == [-(-n // stack) for n in lengths]
    for i, n in enumerate(lengths):
        alone, alone_mask = projector(hidden[i : i + 1, :n])
        m = alone.shape[1]
        assert m == int(out_mask[i].sum()) and alone_mask.all()
        torch.testing.assert_close(out[i, :m], alone[0], atol=1e-5, rtol=1e-5)
        assert out[i, m:].abs().max() == 0 if m < out.shape[1] else True


def test_output_rms_starts_at_the_token_embedding_scale():
    torch.manual_seed(0)
    embeddings = torch.nn.Embedding(100, 16)
    torch.nn.init.normal_(embeddings.weight, std=0.05)
    scale = embedding_rms(embeddings)
    assert 0.04 < scale < 0.06
    projector = AudioProjector(8, 16, stack=2, hidden_size=32, output_scale=scale)
    out, _ = projector(100.0 * torch.randn(2, 10, 8))  # a large encoder output...
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, scale), atol=1e-3, rtol=1e-2)  # ...lands on scale


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="stack"):
        AudioProjector(4, 4, stack=0)
    with pytest.raises(ValueError, match="output_scale"):
        AudioProjector(4, 4, output_scale=0.0)
    with pytest.raises(ValueError, match="num_layers"):
        AudioProjector(4, 4, num_layers=-1)
    with pytest.raises(ValueError, match="num_heads=3 must divide the LLM width 4"):
        AudioProjector(4, 4, num_layers=1, num_heads=3)


def test_projector_layers_start_as_the_identity_and_then_read_neighbouring_tokens():
    hidden = torch.randn(1, 8, 4)
    changed = hidden.clone()
    changed[0, 6:] += 1.0  # only the last audio token's frames (stack 2)
    torch.manual_seed(0)
    mlp = AudioProjector(4, 8, stack=2, hidden_size=16).eval()
    torch.manual_seed(0)
    layered = AudioProjector(4, 8, stack=2, hidden_size=16, num_layers=1, num_heads=2).eval()
    torch.testing.assert_close(layered(hidden)[0], mlp(hidden)[0], atol=1e-6, rtol=0)
    for projector, reads_neighbours in [(mlp, False), (_train_layers(layered), True)]:
        first = projector(hidden)[0][0, 0]
        assert torch.equal(first, projector(changed)[0][0, 0]) != reads_neighbours


@pytest.mark.parametrize("num_layers", [0, 1])
def test_gradients_reach_every_projector_parameter(num_layers):
    torch.manual_seed(0)
    projector = _train_layers(
        AudioProjector(4, 6, stack=2, hidden_size=8, dropout=0.1, num_layers=num_layers, num_heads=2)
    ).train()
    out, mask = projector(torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


def test_ctc_head_loss_is_torch_ctc_on_cosine_logits_and_learns_to_decode():
    torch.manual_seed(0)
    table = torch.randn(12, 16)  # 12 "token embeddings"; the blank is class 12
    head = EmbeddingCTCHead(16)
    embeds = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    targets = [[3, 3, 5], [7, 1]]
    loss = head(embeds, mask, table, targets)
    logits = head.logits(embeds, table)
    assert logits.shape == (2, 7, 13) and logits.abs().max() <= head.log_scale.exp() + 1e-4
    expected = torch.nn.functional.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        torch.tensor([3, 3, 5, 7, 1]),
        torch.tensor([7, 5]),
        torch.tensor([3, 2]),
        blank=12,
    )
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.Adam([embeds, *head.parameters()], lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        head(embeds, mask, table, targets).backward()
        optimizer.step()
    assert head.greedy(embeds, mask, table) == targets  # repeats kept apart by a blank
    assert table.grad is None  # the LLM's table is only read


def test_ctc_head_ignores_impossible_samples_instead_of_returning_inf():
    head = EmbeddingCTCHead(8)
    loss = head(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.long), torch.randn(5, 8), [[1, 2, 3, 4]])
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_ctc_head_samples_negatives_but_keeps_every_target_class():
    torch.manual_seed(0)
    table = torch.randn(5000, 8)
    head = EmbeddingCTCHead(8, negatives=16)
    flat = torch.tensor([4000, 7, 4000, 123])
    classes, renumbered = head._classes(table, flat)
    assert len(classes) <= 4 + 16 and torch.equal(classes[renumbered], table[flat])
    loss = head(torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.long), table, [flat.tolist()])
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match="negatives"):
        EmbeddingCTCHead(8, negatives=-1)


def test_blank_threshold_adds_the_tokens_where_the_blank_is_unsure():
    torch.manual_seed(0)
    table = torch.randn(6, 8)
    head = EmbeddingCTCHead(8)
    embeds = torch.randn(3, 10, 8)
    probabilities = head.logits(embeds, table).softmax(-1)
    argmax = head.best_path(embeds, table)
    assert torch.equal(head.best_path(embeds, table, None), argmax)
    blank = table.shape[0]
    best_token = probabilities[..., :blank].argmax(-1)
    for threshold in (0.3, 0.6, 0.9):
        path = head.best_path(embeds, table, threshold)
        emits = probabilities[..., blank] < threshold
        assert torch.equal(path != blank, emits)
        assert torch.equal(path[emits], best_token[emits])
    # above 0.5 every argmax emission stays, with the same token
    kept = argmax != blank
    assert torch.equal(head.best_path(embeds, table, 0.6)[kept], argmax[kept])
    assert (head.best_path(embeds, table, 1.0) != blank).all()


def test_merge_ctc_spikes_drops_blanks_and_averages_repeats_per_sample():
    blank = 9
    embeds = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[blank, 4, 4, blank, 4, 7], [blank, blank, blank, 3, 3, 3]])
    merged, merged_mask = merge_ctc_spikes(embeds, mask, labels, blank)
    # sample 0: "4 4" merge, the blank splits off a second 4, then 7; sample 1 emits nothing in its
    # real frames (the 3s are padding) and keeps the mean of its audio
    assert merged_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(merged[0, 0], embeds[0, 1:3].mean(0))
    torch.testing.assert_close(merged[0, 1:], embeds[0, 4:6])
    torch.testing.assert_close(merged[1, 0], embeds[1, :3].mean(0))
    alone, _ = merge_ctc_spikes(embeds[1:, :3], mask[1:, :3], labels[1:, :3], blank)
    torch.testing.assert_close(alone[0], merged[1, :1])


def test_merge_ctc_spikes_budget_keeps_the_most_certain_tokens_in_order():
    blank = 9
    embeds = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    mask = torch.ones(1, 6, dtype=torch.long)
    labels = torch.tensor([[blank, 4, 4, blank, 5, 7]])  # groups: "4 4" (frames 1-2), 5, 7
    log_blank = torch.tensor([[0.0, -0.1, -3.0, 0.0, -0.2, -2.0]])  # a group counts its surest frame
    unlimited, _ = merge_ctc_spikes(embeds, mask, labels, blank)
    for budget, groups in [(3, [0, 1, 2]), (2, [0, 2]), (1, [0]), (0, [0])]:
        kept, kept_mask = merge_ctc_spikes(embeds, mask, labels, blank, log_blank, torch.tensor([budget]))
        assert kept_mask.tolist() == [[1] * len(groups)]
        torch.testing.assert_close(kept[0], unlimited[0, groups])
    with pytest.raises(ValueError, match="needs log_blank"):
        merge_ctc_spikes(embeds, mask, labels, blank, max_tokens=torch.tensor([1]))


def test_merge_ctc_spikes_segments_pool_every_audio_token_into_its_nearest_emission():
    blank = 9
    embeds = torch.arange(2 * 8 * 2, dtype=torch.float32).reshape(2, 8, 2)
    mask = torch.tensor([[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]])
    # sample 0: emissions "4 4" (frames 1-2), 5 (frame 5), 7 (frame 7); the gap 3-4 splits at its
    # midpoint (frame 3 ties and goes to the earlier), frame 6 ties between 5 and 7 and goes to 5
    labels = torch.tensor([[blank, 4, 4, blank, blank, 5, blank, 7], [blank] * 3 + [3] * 5])
    p_blank = torch.tensor([[0.9, 0.2, 0.4, 0.5, 0.99, 0.3, 0.7, 0.05], [0.9] * 8])
    log_blank = p_blank.log()
    merged, merged_mask = merge_ctc_spikes(embeds, mask, labels, blank, log_blank, pooling="segments")
    spikes, _ = merge_ctc_spikes(embeds, mask, labels, blank)
    assert merged_mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # the same count as spikes

    def weighted(frames: list[int]) -> torch.Tensor:  # the mean weighted by 1 - P(blank)
        weight = 1 - p_blank[0, frames, None]
        return (embeds[0, frames] * weight).sum(0) / weight.sum()

    for row, frames in enumerate([[0, 1, 2, 3], [4, 5, 6], [7]]):
        torch.testing.assert_close(merged[0, row], weighted(frames))
    torch.testing.assert_close(merged[1, 0], spikes[1, 0])  # no emission: the mean of its audio
    # with a budget of 2 the least certain emission (5) is dropped and its frames go to its neighbours
    kept, kept_mask = merge_ctc_spikes(
        embeds, mask, labels, blank, log_blank, torch.tensor([2, 2]), pooling="segments"
    )
    assert kept_mask.tolist() == [[1, 1], [1, 0]]
    torch.testing.assert_close(kept[0, 0], weighted([0, 1, 2, 3, 4]))  # the cut at (2 + 7) // 2
    torch.testing.assert_close(kept[0, 1], weighted([5, 6, 7]))
    with pytest.raises(ValueError, match="pass log_blank"):
        merge_ctc_spikes(embeds, mask, labels, blank, pooling="segments")
    with pytest.raises(ValueError, match="pooling"):
        merge_ctc_spikes(embeds, mask, labels, blank, pooling="mean")


def test_ctc_head_parameters_shard_and_old_scalar_scale_loads():
    head = EmbeddingCTCHead(16)
    assert all(p.dim() >= 1 for p in head.parameters())  # FSDP2's fully_shard refuses 0-d parameters
    old = {"blank": torch.zeros(16), "log_scale": torch.tensor(2.5)}  # saved when log_scale was a scalar
    head.load_state_dict(old)
    assert head.log_scale.shape == (1,) and float(head.log_scale.detach()) == 2.5
