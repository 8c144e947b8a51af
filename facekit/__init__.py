"""Torch-free toolkit shared by training, export and serving: the ground both sides stand on.

Everything that must be computed identically on both sides lives here: the 68-point layout,
the landmark-image rasterizer, face-centred cropping, the landmark detectors, landmark-sequence
files, motion transfer, video and image I/O, avatar ids, and the export/serving contract
(`contract.py`: model names, tensors, metadata). Importing any of it never imports torch (only
the optional face-alignment detector loads torch, when it is made), `training`, `export`,
`service` or `client`.
"""
