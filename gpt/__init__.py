"""A GPT-2-style language model from scratch: model, training and inference (torch, tiktoken, numpy, safetensors only)."""
