"""Data stages of the llm-pipeline DVC pipeline: download, validate, tokenize."""
