"""mlaify: convert MHA/GQA/MQA decoders to Multi-head Latent Attention with a compressed KV cache."""
