"""Import shim for versions registered before the layout change: now pipeline.registry.pyfuncs.inputs."""
from pipeline.registry.pyfuncs.inputs import check_texts  # noqa: F401
