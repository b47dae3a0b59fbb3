"""The `llm-pipeline` command and its verbs: one module per verb, each with `main(argv)` (see cli.COMMANDS)."""
