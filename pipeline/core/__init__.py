"""The base every part stands on: the stage catalog, params and presets, data/ paths, errors, processes."""
