"""Soak test: many live streams against a real `talkinghead serve` for a long time (`make soak`).

    python tools/soak.py                                  # 64 streams, 10 minutes -> out/soak.json
    python tools/soak.py --streams 64 --duration 120 --warmup 30 --out out/soak-2min.json

Starts the service (ONNX Runtime backend, the model repository) in a subprocess on free ports with
a private avatar store, creates one avatar from the demo portrait and runs --streams streams over
grpc.aio from this process, each sending the demo driver's landmarks at --fps with DROP_OLDEST
(the live policy) for --duration seconds; then every stream half-closes and reads its last
replies. Every --sample seconds it records the server's resident memory (/proc/PID/status VmRSS)
and its /metrics. Pass (exit 0) when:
- rss: the server's RSS at the end is less than --max-rss-growth (5 %) above its RSS at the end
  of the warm-up;
- statuses: every stream ended OK and the server counted no stream with another code;
- drops: frames were lost only by the drop policy: every stream got each frame it sent back or
  counted as dropped (`dropped_before`), in order, and the server's frames received = sent +
  dropped;
- slots: the server's active streams gauge is back to 0 and it counted --streams streams.
The figures (time series, per-check results, throughput) go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python tools/soak.py` puts tools/ first, not the checkout
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from api.talkinghead.v1 import animation_pb2 as pb  # noqa: E402
from api.talkinghead.v1 import animation_pb2_grpc  # noqa: E402
from client.library import Client, demo_portrait_consent, to_landmarks  # noqa: E402
from facekit.sequence import LandmarkSequence  # noqa: E402

PORTRAIT = ROOT / "facekit/assets/demo_portrait.png"
DRIVER = ROOT / "facekit/assets/demo_driver.npz"
AVATAR = "soak"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64, help="concurrent live streams (default 64)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of streaming (default 600)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before the RSS baseline (default 20 %%, <= 60)"
    )
    parser.add_argument("--fps", type=float, default=5.0, help="frames per second each stream sends")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="allowed RSS growth (0.05)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--inference-threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "out/soak.json")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, 0.2 * args.duration)
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be shorter than --duration")
    return args


# -- the server -----------------------------------------------------------------------------------
@dataclass
class Server:
    process: subprocess.Popen[bytes]
    grpc_address: str
    metrics_url: str
    log: Path

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found, "no VmRSS"
        return int(found.group(1)) * 1024

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: 'name{labels}' -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(args: argparse.Namespace, work: Path) -> Server:
    log = work / "server.log"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        TALKINGHEAD_MODEL_REPOSITORY=str(args.model_repository),
        TALKINGHEAD_AVATAR_STORE=str(work / "avatars"),
        TALKINGHEAD_JOBS=str(work / "jobs"),
        TALKINGHEAD_AUDIT_LOG=str(work / "audit.jsonl"),
        TALKINGHEAD_GRPC_PORT="0",
        TALKINGHEAD_METRICS_PORT="0",
        TALKINGHEAD_MAX_STREAMS=str(max(64, args.streams)),
        TALKINGHEAD_WORKER="external",  # no personalisation worker competing for the cores
        # Overloaded on purpose (every stream admitted, far beyond capacity) to find leaks under
        # load; admission control itself is measured by `talkinghead bench`'s overload runs.
        TALKINGHEAD_ADMISSION="0",
    )
    command = [
        sys.executable,
        "-m",
        "talkinghead.cli",
        "serve",
        "--inference-threads",
        str(args.inference_threads),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(r"serving gRPC on \S+?:(\d+) .*metrics on (http://\S+/metrics)", text)
        if found and "is ready" in text:
            return Server(process, f"127.0.0.1:{found.group(1)}", found.group(2), log)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')[-2000:]}")


# -- the streams ----------------------------------------------------------------------------------
@dataclass
class StreamLog:
    sent: int = 0
    received: int = 0
    dropped: int = 0  # sum of dropped_before
    out_of_order: int = 0
    last_sequence: int = -1
    latencies: list[float] = field(default_factory=list)  # send -> reply, seconds (every 10th frame)
    code: str = ""
    details: str = ""


async def one_stream(
    channel: grpc.aio.Channel, driver: LandmarkSequence, fps: float, until: float, log: StreamLog
) -> None:
    stub = animation_pb2_grpc.AnimationServiceStub(channel)
    messages = [to_landmarks(p) for p in driver.points]
    width, height = driver.frame_size
    sent_at: dict[int, float] = {}

    async def requests() -> Any:
        config = pb.StreamConfig(avatar_id=AVATAR, overflow=pb.OVERFLOW_POLICY_DROP_OLDEST)
        yield pb.AnimateRequest(config=config)
        t0 = time.monotonic()
        index = 0
        while time.monotonic() < until:
            await asyncio.sleep(max(0.0, t0 + index / fps - time.monotonic()))
            if index % 10 == 0:  # a sample of the latencies
                sent_at[index] = time.perf_counter()
            frame = pb.LandmarkFrame(
                sequence=index,
                landmarks=messages[index % len(messages)],
                frame_width=width,
                frame_height=height,
            )
            log.sent += 1
            yield pb.AnimateRequest(landmarks=frame)
            index += 1

    try:
        async for response in stub.Animate(requests()):
            if not response.HasField("frame"):
                continue
            frame = response.frame
            if frame.sequence <= log.last_sequence:
                log.out_of_order += 1
            log.last_sequence = frame.sequence
            log.received += 1
            log.dropped += frame.dropped_before
            sent = sent_at.pop(frame.sequence, None)
            if sent is not None and time.monotonic() < until:  # the drain at the end is reported apart
                log.latencies.append(time.perf_counter() - sent)
        log.code = "OK"
    except grpc.RpcError as error:
        log.code, log.details = error.code().name, error.details() or ""


def dropped_total(samples: dict[str, float]) -> float:
    """talkinghead_frames_dropped_total summed over its reasons (overflow, late, quota)."""
    return sum(v for k, v in samples.items() if k.startswith("talkinghead_frames_dropped_total{"))


def open_streams(samples: dict[str, float]) -> float:
    """talkinghead_active_streams summed over its streams (live, offline); -1 when not exported."""
    found = [v for k, v in samples.items() if k.startswith("talkinghead_active_streams{")]
    return sum(found) if found else -1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def soak(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    driver = LandmarkSequence.load(DRIVER)
    with Client(target=server.grpc_address, timeout=120) as client:
        client.wait_ready(120)
        client.create_avatar(AVATAR, [PORTRAIT], consent=demo_portrait_consent(), replace=True)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    until = t0 + args.duration

    def sample() -> None:
        m = server.metrics()
        samples.append(
            {
                "t": round(time.monotonic() - t0, 1),
                "rss_bytes": server.rss_bytes(),
                "active_streams": open_streams(m),
                "frames_sent": m.get("talkinghead_frames_sent_total", 0),
                "frames_dropped": dropped_total(m),
            }
        )

    logs = [StreamLog() for _ in range(args.streams)]
    # A few channels, as several clients would open (one HTTP/2 connection per 16 streams).
    channels = [grpc.aio.insecure_channel(server.grpc_address) for _ in range((args.streams + 15) // 16)]
    tasks = [
        asyncio.create_task(one_stream(channels[i % len(channels)], driver, args.fps, until, log))
        for i, log in enumerate(logs)
    ]
    sample()
    while not all(task.done() for task in tasks):
        await asyncio.wait(tasks, timeout=args.sample)
        sample()
        print(
            f"[soak] t={samples[-1]['t']:6.1f} s rss={samples[-1]['rss_bytes'] / 2**20:7.1f} MiB "
            f"active={samples[-1]['active_streams']:.0f} sent={samples[-1]['frames_sent']:.0f}",
            flush=True,
        )
    ended = time.monotonic() - t0  # the streams' end: --duration, then the frames still queued
    for channel in channels:
        await channel.close()
    deadline = time.monotonic() + 10  # the last stream's slot is given back as its call ends
    while open_streams(server.metrics()) != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    sample()
    return check(args, server, logs, samples, ended)


def check(
    args: argparse.Namespace,
    server: Server,
    logs: list[StreamLog],
    samples: list[dict[str, Any]],
    ended: float,
) -> dict[str, Any]:
    final = server.metrics()
    warm = [s for s in samples if s["t"] >= args.warmup]
    baseline = warm[0]["rss_bytes"] if warm else samples[0]["rss_bytes"]
    end_rss = samples[-1]["rss_bytes"]
    peak_after = max(s["rss_bytes"] for s in warm) if warm else end_rss
    growth = (end_rss - baseline) / baseline
    codes = {
        key[len('talkinghead_streams_total{code="') : -2]: value
        for key, value in final.items()
        if key.startswith("talkinghead_streams_total{")
    }
    client_codes: dict[str, int] = {}
    for log in logs:
        client_codes[log.code] = client_codes.get(log.code, 0) + 1
    unaccounted = [log.sent - log.received - log.dropped for log in logs]
    received_server = final.get('talkinghead_frames_received_total{kind="landmarks"}', 0)
    sent_server = final.get("talkinghead_frames_sent_total", 0)
    dropped_server = dropped_total(final)
    latencies = [t for log in logs for t in log.latencies]
    checks = {
        "rss": {
            "passed": growth < args.max_rss_growth,
            "baseline_bytes": baseline,
            "end_bytes": end_rss,
            "peak_after_warmup_bytes": peak_after,
            "growth": round(growth, 4),
            "limit": args.max_rss_growth,
        },
        "statuses": {
            "passed": client_codes == {"OK": args.streams} and set(codes) <= {"OK"},
            "client": client_codes,
            "server": codes,
            "errors": sorted({f"{log.code}: {log.details}" for log in logs if log.code != "OK"})[:10],
        },
        "drops": {
            "passed": not any(unaccounted)
            and not any(log.out_of_order for log in logs)
            and received_server == sent_server + dropped_server,
            "frames_sent_by_clients": sum(log.sent for log in logs),
            "frames_received_by_clients": sum(log.received for log in logs),
            "dropped_reported": sum(log.dropped for log in logs),
            "unaccounted_frames": sum(abs(n) for n in unaccounted),
            "out_of_order": sum(log.out_of_order for log in logs),
            "server_received": received_server,
            "server_sent": sent_server,
            "server_dropped": dropped_server,
        },
        "slots": {
            "passed": open_streams(final) == 0 and sum(codes.values()) == args.streams,
            "active_streams_at_end": open_streams(final),
            "streams_ended": sum(codes.values()),
        },
    }
    delivered = sum(log.received for log in logs)
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "checks": checks,
        "throughput": {
            "seconds": round(ended, 1),
            "frames_per_second_delivered": round(delivered / ended, 2),
            "offered_per_second": round(sum(log.sent for log in logs) / ended, 2),
            "drop_fraction": round(
                sum(log.dropped for log in logs) / max(1, sum(log.sent for log in logs)), 4
            ),
            # send -> reply while the streams sent (every 10th frame); the queued frames' drain after
            # --duration is `drain_seconds`
            "latency_s_p50": round(percentile(latencies, 0.5), 3),
            "latency_s_p95": round(percentile(latencies, 0.95), 3),
            "drain_seconds": round(ended - args.duration, 1),
        },
        "samples": samples,
        "server_log": str(server.log),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        server = start_server(args, work)
        try:
            result = asyncio.run(soak(args, server))
        finally:
            server.stop()
            log_copy = args.out.with_suffix(".server.log")
            log_copy.write_bytes(server.log.read_bytes())
        result["server_log"] = str(log_copy)
    args.out.write_text(json.dumps(result, indent=1))
    checks = result["checks"]
    print(
        f"[soak] {'PASSED' if result['passed'] else 'FAILED'}: RSS growth {checks['rss']['growth']:+.2%} "
        f"({checks['rss']['baseline_bytes'] / 2**20:.1f} -> {checks['rss']['end_bytes'] / 2**20:.1f} MiB), "
        f"statuses {checks['statuses']['client']}, "
        f"unaccounted frames {checks['drops']['unaccounted_frames']}, "
        f"active streams at the end {checks['slots']['active_streams_at_end']:.0f}; "
        f"{result['throughput']['frames_per_second_delivered']} frames/s delivered -> {args.out}"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
