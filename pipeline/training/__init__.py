"""What the training stages share: finetuning from the base model, the optional LLM judge, curves and plots."""
