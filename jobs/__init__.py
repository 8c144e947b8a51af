"""Personalisation jobs: what the service (torch-free) and the worker (PyTorch) share.

`record` is the job itself (states, presets, progress, the wire-free JSON form), `queue` the
interface both sides use, `local` a directory queue for one machine (the embedded default),
`redis_queue` the queue on Redis Streams for several replicas and workers, `keys` the Redis key
layout (avatars, jobs, the event channel) and `events` the avatar events every replica listens to.
Torch-free and server-free: imports numpy, the stdlib, facekit and (for Redis) redis-py only.
"""
