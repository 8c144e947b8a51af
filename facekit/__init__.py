"""Torch-free toolkit shared by training and serving: landmarks, rasterizer, crops, detectors, video.

Everything that must be computed identically on both sides lives here: the 68-point layout,
the landmark-image rasterizer, face-centred cropping and the landmark detectors. Nothing in this
package imports torch, `training` or `service`.
"""
