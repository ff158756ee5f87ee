"""Llama-family models: the Flax NNX decoder, loaders (GGUF, safetensors, Orbax), tokenizer, registry."""
