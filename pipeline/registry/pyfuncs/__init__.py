"""MLflow pyfunc models logged as code: each file defines SIGNATURE and INPUT_EXAMPLE, ends with set_model()."""
