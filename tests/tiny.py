"""Shared tiny configs for tests (tests/ is on pytest's pythonpath: `from tiny import TINY_WHISPER`)."""

TINY_WHISPER = dict(
    vocab_size=64,
    num_mel_bins=8,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=40,
    max_target_positions=24,
    decoder_start_token_id=1,
    pad_token_id=0,
    eos_token_id=2,
    bos_token_id=1,
)
