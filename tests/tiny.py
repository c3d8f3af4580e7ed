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

# LlamaConfig dimensions of the tiny random LLM (vocab_size comes from each test's tokenizer)
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
