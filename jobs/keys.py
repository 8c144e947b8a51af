"""The Redis key layout, in one place (the service's avatar store, the queue and the worker use it).

talkinghead:avatar:<id>        hash   the avatar: meta (JSON), adain, embedding, points, crops,
                                      crop_points, preview_png, portrait_jpeg (raw bytes)
talkinghead:avatars            zset   every avatar id, score 0 (lexicographic order for paging)
talkinghead:store-id           string the store's id, stamped on its personalised generators
talkinghead:events             pub/sub channel of avatar events (jobs.events)
talkinghead:events:epoch       string a random marker the event subscribers set when absent and
                                      read with every ping: gone or changed, Redis lost its data
talkinghead:jobs:stream        stream one entry {job: <id>} per job not yet ended (deleted when it
                                      ends: jobs/redis_queue.py); consumer group `workers`
talkinghead:job:<id>           hash   record (JSON of jobs.record.Job), input (npz bytes), entry
                                      (its stream entry's id), state, owner, attempts, cancel
talkinghead:jobs               zset   PERSONALISE job ids by creation time (listing)
talkinghead:jobs:active        set    PERSONALISE jobs queued or running (the queue's size)
talkinghead:avatar-job:<id>    string the avatar's queued or running job id (one at a time)
talkinghead:worker:<name>      string a worker's last claim poll (Unix time), expiring after
                                      WORKER_TTL_S: the worker announcing itself (`make up` reads
                                      it to call the stack's worker ready)
"""

from __future__ import annotations

import re

from facekit.ids import validate_stored_id

PREFIX = "talkinghead:"
AVATARS = PREFIX + "avatars"
STORE_ID = PREFIX + "store-id"  # string: this store's id (jobs.avatars), set once
EVENTS = PREFIX + "events"
EVENTS_EPOCH = PREFIX + "events:epoch"
JOB_STREAM = PREFIX + "jobs:stream"
WORKERS_GROUP = "workers"
JOBS = PREFIX + "jobs"
ACTIVE = PREFIX + "jobs:active"


def avatar(avatar_id: str) -> str:
    return PREFIX + "avatar:" + validate_stored_id(avatar_id)


def job(job_id: str) -> str:
    return PREFIX + "job:" + job_id


WORKER_TTL_S = 15


def worker(name: str) -> str:
    return PREFIX + "worker:" + name


def avatar_job(avatar_id: str) -> str:
    return PREFIX + "avatar-job:" + validate_stored_id(avatar_id)


def shown_url(url: str) -> str:
    """A Redis URL as logs show it: the credentials of redis://[user]:password@host:port/db (the
    chart's in-chart Redis) and a ?password= query masked."""
    scheme, sep, rest = url.partition("://")
    where, q, query = rest.partition("?")
    if sep and "@" in where:
        where = "***@" + where.rpartition("@")[2]
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}{sep}{where}{q}{query}"
