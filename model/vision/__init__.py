"""Qwen3-VL vision encoder (ViT + patch mergers + DeepStack mergers) on Megatron-Core modules."""
