"""Data in: dataset sources, downloads, the contracts tables and instructions must meet, corpus tokenization."""
