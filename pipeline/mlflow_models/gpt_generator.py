"""Import shim for versions registered before the layout change (their instruct_generator imports these)."""
from pipeline.registry.pyfuncs.gpt_generator import ARTIFACT, SIGNATURE, GPTGenerator  # noqa: F401
