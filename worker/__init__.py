"""The personalisation worker (`talkinghead worker`): training code in its own process and image.

It takes jobs from the queue the service fills (jobs/: a directory, or Redis Streams), fine-tunes
the avatar's generator (training.finetune.personalise), exports `generator_<avatar>` into the model
repository (export/), has every Triton serving the service load it, then ends the job and tells the
service replicas (jobs.events). It never imports the server (service/) or the client.
"""

SWEEP_INTERVAL_S = 300.0  # between two sweeps of generators whose avatar record is gone (--sweep-interval)
