"""Import shims: versions registered before the layout change run model code that imports these paths."""
