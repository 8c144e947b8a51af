"""The gRPC inference server: avatars from photos, animation streams, Prometheus metrics.

Torch-free: imports facekit (the shared ground, with the export/serving contract) and the
generated api/ stubs; never training/, export/ or the client (client/). `talkinghead serve` runs it.
"""
