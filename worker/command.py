"""Run the personalisation worker: take jobs, fine-tune, export generator_<avatar>, load it in Triton.

The queue is Redis (--redis-url, several workers share it: a job whose worker dies is taken over
after --claim-timeout s) or a job directory on this machine (--jobs; `talkinghead serve` starts one
such worker itself by default). The worker fine-tunes --checkpoint (the served model's meta
checkpoint), writes into --repository (read-write) and loads each new model in every --triton-url
(a host resolving to several addresses means each of them). A queue it cannot reach is tried
again (after 1 s, doubling to 30 s), not the end of it. SIGTERM/SIGINT stop it within a
fine-tuning step (and any export under way): the job it was fine-tuning goes back to the queue,
QUEUED, its attempt not counted, and the next worker takes it at once (before, it ran on until the
service's 10 s grace killed the worker, and each such stop counted as one of its 3 attempts).
An end the queue could not write (its storage full) is tried once more on the way out; a job
whose generator was published is then ended by the next worker with that generator, without
fine-tuning again (worker/jobs_run.py `_adopt`).

With --metrics-port it serves Prometheus metrics on http://--metrics-host:port/metrics (worker/metrics.py:
talkinghead_worker_*: jobs ended by outcome, their stage times, fine-tuning steps, whether a job
runs, whether the queue answers, and process_*); off by default (the embedded worker's case). On the
same port /healthz answers 503 once the worker's main thread has made no progress for longer than
what it was doing allows (a job's step, export or load: --stuck-after; worker/liveness.py).

It reads the avatar store - the Redis one with --redis-url, the service's directory with --avatars
(the embedded worker is given it) - to withdraw a deleted avatar's generator only once its record
is gone, and to sweep (at start, then every --sweep-interval s) the generators of avatar records
the store no longer holds (worker/jobs_run.py). Without a store to read (--jobs without --avatars)
a REMOVE job withdraws at once and nothing is swept.

examples:
  talkinghead worker --jobs var/jobs --avatars var/avatars --repository model_repository
  talkinghead worker --redis-url redis://127.0.0.1:6379/0 --repository /models \\
      --triton-url triton-0:8001 --triton-url triton-1:8001
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from pathlib import Path

from facekit import contract, cpus, logs, scheduling
from facekit.arguments import positive, seconds, whole_number
from facekit.liveness import STUCK_AFTER_S
from jobs.avatars import AvatarIndex, LocalAvatarIndex, RedisAvatarIndex
from jobs.keys import shown_url
from jobs.queue import JobQueue
from worker import SWEEP_INTERVAL_S
from worker.liveness import Liveness
from worker.metrics import WorkerMetrics

# PyTorch, the training code and the exporter (~2 s of imports) load in run(), once the metrics
# port is bound: a port already taken ends the worker before them.

log = logging.getLogger("talkinghead.worker")


def cpu_threads(requested: int | None) -> int:
    """PyTorch's CPU threads: --threads, else PyTorch's default (a thread per core of the node, the
    pod's limit and request unseen) capped by the CPUs this process may use (facekit/cpus.py: the
    affinity, the cgroup quota or, without one, the pod's CPU request)."""
    import torch

    return requested or min(torch.get_num_threads(), cpus.usable_cpus())


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535 (0: any free one), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    queue = parser.add_mutually_exclusive_group()
    queue.add_argument(
        "--redis-url", default=env("TALKINGHEAD_REDIS_URL"), help="Redis queue ($TALKINGHEAD_REDIS_URL)"
    )
    queue.add_argument("--jobs", type=Path, help="local job directory (default var/jobs without --redis-url)")
    parser.add_argument(
        "--avatars",
        type=Path,
        help="the service's avatar directory, with --jobs (with --redis-url the avatars in Redis are read)",
    )
    parser.add_argument(
        "--sweep-interval",
        type=float,
        default=SWEEP_INTERVAL_S,
        help="s between sweeps of generators whose avatar record is gone (0: never; default %(default).0f)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(env("TALKINGHEAD_MODEL_REPOSITORY", "model_repository")),
        help="the model repository it exports into (default $TALKINGHEAD_MODEL_REPOSITORY, else %(default)s)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path(env("TALKINGHEAD_WORKER_CHECKPOINT", "models/talkinghead-small.pt")),
        help="the served model's meta checkpoint (default models/talkinghead-small.pt)",
    )
    parser.add_argument("--triton-url", action="append", default=[], help="Triton gRPC host:port (repeat)")
    parser.add_argument(
        "--triton-timeout",
        type=seconds,
        default=contract.TRITON_LOAD_TIMEOUT_S,
        help="s any call to a Triton may take, a model load included: one that does not answer "
        "within it fails the job (UNAVAILABLE) instead of holding it RUNNING (default %(default).0f)",
    )
    parser.add_argument(
        "--max-personalised-loaded",
        type=whole_number(1),
        default=env("TALKINGHEAD_MAX_PERSONALISED_LOADED", str(contract.MAX_PERSONALISED)),
        help="personalised generators a Triton keeps loaded: past it, loading one unloads the "
        "least recently called of those idle for 60 s (the service's setting, "
        "$TALKINGHEAD_MAX_PERSONALISED_LOADED)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda")
    parser.add_argument(
        "--profile", default="python", help="repository profile of new models (default python)"
    )
    parser.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}", help="worker name")
    parser.add_argument(
        "--claim-timeout", type=float, default=30.0, help="s before a silent worker's job is taken"
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=env("TALKINGHEAD_WORKER_METRICS_PORT") or None,
        help="serve Prometheus /metrics on this port (0: any free one; default: none, no metrics; "
        "$TALKINGHEAD_WORKER_METRICS_PORT)",
    )
    parser.add_argument(
        "--liveness-file",
        type=Path,
        help="write what the worker is doing here at each step (the embedded worker's supervisor "
        "restarts it from it, as /healthz and a liveness probe do in a pod)",
    )
    parser.add_argument(
        "--stuck-after",
        type=positive("seconds", zero=True),
        default=env("TALKINGHEAD_WORKER_STUCK_AFTER", str(STUCK_AFTER_S)),
        help="s a job's fine-tuning step, export or load into Triton may go without progress before "
        "/healthz on the metrics port answers 503 (the liveness probe's restart; 0: never; default "
        "%(default)s; $TALKINGHEAD_WORKER_STUCK_AFTER)",
    )
    parser.add_argument(
        "--metrics-host",
        default=env("TALKINGHEAD_WORKER_METRICS_HOST", "127.0.0.1"),
        help="address /metrics binds (default 127.0.0.1, as the server's; 0.0.0.0 in a pod; "
        "$TALKINGHEAD_WORKER_METRICS_HOST)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default %(default)s)"
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=logs.FORMATS,
        default=env("TALKINGHEAD_LOG_FORMAT", "text").lower(),
        help="text (default) or json: one object a line ($TALKINGHEAD_LOG_FORMAT)",
    )
    parser.add_argument("--parent-pid", type=int, help="stop once this process is gone (the embedded worker)")
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="create this file once started, before the first claim (the embedded worker's "
        "supervisor: a worker that dies after it is restarted, one that dies before is given up)",
    )
    parser.add_argument("--threads", type=whole_number(1), help="PyTorch CPU threads (default: PyTorch's)")
    parser.add_argument(
        "--cpu-scheduling",
        choices=scheduling.POLICIES,
        help="Linux scheduling policy of every thread (default: as inherited); idle: only CPU "
        "nothing else wants (the embedded worker, beside the server's live streams)",
    )
    parser.add_argument(
        "--nice", type=int, default=0, choices=range(20), metavar="0-19", help="lower every thread's priority"
    )


def make_queue(args: argparse.Namespace) -> JobQueue:
    if args.redis_url:
        from jobs.redis_queue import RedisQueue, connect

        return RedisQueue(client=connect(args.redis_url), claim_timeout_s=args.claim_timeout)
    from jobs.local import LocalQueue

    return LocalQueue(root=args.jobs or Path("var/jobs"))


def make_avatars(args: argparse.Namespace) -> AvatarIndex | None:
    """The avatar store this worker reads (None: none given)."""
    if args.redis_url:
        from jobs.redis_queue import connect

        return RedisAvatarIndex(client=connect(args.redis_url))
    if args.avatars is None:
        return None
    if not args.avatars.is_dir():  # (a wrong path would read as a store without avatars)
        raise SystemExit(
            f"talkinghead worker: --avatars {args.avatars}: no such directory (the service's avatar store)"
        )
    return LocalAvatarIndex(root=args.avatars)


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)  # text, or JSON lines (facekit/logs.py)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim", "talkinghead.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="contextlib")  # the ONNX exporter's
    warnings.filterwarnings("ignore", category=FutureWarning)  # chatter about AdaIN and its internals
    metrics, liveness = WorkerMetrics(), Liveness(args.stuck_after, report=args.liveness_file)
    metrics_http = None
    if args.metrics_port is not None:  # before the checkpoint loads: a port taken fails at once
        try:
            metrics_http, port = metrics.serve(args.metrics_host, args.metrics_port, liveness)
        except OSError as error:
            print(
                f"talkinghead worker: cannot bind metrics to {args.metrics_host}:{args.metrics_port}: "
                f"{error.strerror or error}",
                file=sys.stderr,
            )
            return 2
        log.info("metrics on http://%s:%d/metrics, liveness on /healthz", args.metrics_host, port)
    if args.cpu_scheduling or args.nice:  # before any pool starts: its threads inherit it
        policy = args.cpu_scheduling or scheduling.policy_name(os.sched_getscheduler(0))
        how = f"{policy}, nice {args.nice}"
        # Not the metrics server's thread: under SCHED_IDLE on busy cores it answered no scrape
        # within Prometheus' timeout (the stack's worker target down 9 scrapes of 21, the
        # TargetDown alert pending), and an idle thread cannot be raised back unprivileged.
        skip = {metrics.server_thread} if metrics_http is not None else set()
        if scheduling.set_process_policy(policy, args.nice, skip=skip) is None:
            log.warning("cannot set the CPU scheduling policy to %s (refused here)", how)
        else:
            group = scheduling.lower_session(policy, args.nice)
            log.info(
                "CPU scheduling: %s%s", how, "" if group is None else f"; its session's group nice {group}"
            )
    avatars = make_avatars(args)  # a wrong --avatars: before PyTorch, the checkpoint or the queue
    if not args.checkpoint.is_file():  # (it was a traceback, three times, from the embedded worker)
        raise SystemExit(
            f"talkinghead worker: --checkpoint {args.checkpoint}: no such file (the model it fine-tunes)"
        )
    import torch

    from export import repository
    from training import checkpoint
    from training.runtime import pick_device
    from worker import models
    from worker.jobs_run import Context, model_id_of, serve_jobs, with_progress_every_step

    try:
        device = pick_device(args.device)
    except ValueError as error:  # (before the checkpoint loads; it was a traceback at the first job)
        raise SystemExit(f"talkinghead worker: {error}") from None
    models.timeout_s = args.triton_timeout
    threads = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    log.info("PyTorch CPU threads: %d (%s)", threads, "--threads" if args.threads else cpus.cpus().describe())
    models.sweep_exports()  # what workers killed while exporting left in the temp folder
    if refreshed := repository.refresh_runners(args.repository):
        log.info("this release's Triton runner written into %d model version(s)", len(refreshed))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        meta = checkpoint.load_meta(args.checkpoint, "personalisation")
    except ValueError as error:  # (a file of another kind: a traceback, then every job failing)
        raise SystemExit(f"talkinghead worker: --checkpoint: {error}") from None
    queue = make_queue(args)
    tritons = [u for url in args.triton_url for u in url.split(",") if u]
    ctx = Context(
        queue=queue,
        meta=with_progress_every_step(meta),
        model_id=model_id_of(meta),
        repository=args.repository,
        profile=args.profile,
        tritons=tritons,
        max_loaded=args.max_personalised_loaded,
        heartbeat_s=max(0.5, args.claim_timeout / 5),
        device=device,
        avatars=avatars,
        sweep_interval_s=max(0.0, args.sweep_interval),
        stopping=stop,
        metrics=metrics,
        liveness=liveness,
    )
    where = shown_url(args.redis_url) if args.redis_url else args.jobs or "var/jobs"
    log.info(
        "worker %s: model %s, queue %s, repository %s, Triton %s, avatars %s",
        args.name,
        ctx.model_id,
        where,
        args.repository,
        ", ".join(tritons) or "none",
        ctx.avatars.describe() if ctx.avatars else "not read",
    )
    if ctx.avatars is None:
        log.warning(
            "no avatar store to read (--avatars): a deleted avatar's generator is withdrawn without "
            "checking its record, and generators left by lost deletions are not swept"
        )
    if args.ready_file is not None:
        args.ready_file.touch()
    try:
        serve_jobs(
            ctx,
            args.name,
            lambda: not stop.is_set() and (args.parent_pid is None or os.getppid() == args.parent_pid),
        )
    finally:
        queue.close()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
    log.info("worker %s stopped", args.name)
    return 0
