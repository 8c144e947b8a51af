"""The gRPC inference service: avatars from photos, animation streams, Prometheus metrics.

Torch-free: imports facekit, never training/ or export/. `talkinghead serve` runs it.
"""
