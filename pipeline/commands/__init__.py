"""The `llm-pipeline` command: cli.py dispatches; each verb parses its own arguments in a module here (cli.COMMANDS)."""
