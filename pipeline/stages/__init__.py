"""The DVC stages, one module each, declared in pipeline.core.catalog (STAGES); DVC and Prefect both run them.

A stage module defines
  PARAMS: {section or dotted key of params.yaml: pipeline.core.params.Spec}, everything it reads;
  main(params_path): the stage, run in the project folder;
and ends with `if __name__ == "__main__": command_line("<stage name>", main)`. Nothing imports a stage module:
`dvc repro` and the flows run it as `python -m pipeline.stages.<module>`; what two stages share lives in a
lower part of pipeline/.
"""
