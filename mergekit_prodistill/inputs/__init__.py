"""Inputs: prompt sources and templates, calibration batches, the experts' continuations
and where each expert runs while it continues. Imports ``models`` and the shared helpers."""
