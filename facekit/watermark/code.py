"""The watermark's payload coding: 32-bit payload + CRC-8, convolutional code, soft Viterbi decoding.

    bits = encode(payload)                 # (92,) uint8: 32 payload bits + CRC-8 + 6 tail, rate 1/2
    payload = decode(soft)                 # soft (92,) floats, > 0 means 1 -> int, or None (CRC fails)

The code is the K = 7, rate-1/2 convolutional code (generators 171, 133 octal; the CCSDS / 802.11
one), terminated with 6 zero bits, decoded by maximum-likelihood soft Viterbi on correlation
metrics: ~5 dB of coding gain over 40 uncoded bits at the same energy. The CRC-8 (polynomial 0x07)
tells a correct decoding from a wrong one (a wrong one passes with probability 1/256).
"""

from __future__ import annotations

import functools

import numpy as np

PAYLOAD_BITS = 32
CRC_BITS = 8
CONSTRAINT = 7  # K: the shift register holds the input bit and the 6 before it
GENERATORS = (0o171, 0o133)
TAIL = CONSTRAINT - 1
INFO_BITS = PAYLOAD_BITS + CRC_BITS
CODED_BITS = (INFO_BITS + TAIL) * len(GENERATORS)  # 92
STATES = 1 << TAIL


def crc8(data: bytes) -> int:
    """CRC-8, polynomial x^8 + x^2 + x + 1 (0x07), initial value 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def check_payload(payload: int) -> int:
    if isinstance(payload, bool) or not isinstance(payload, int | np.integer):
        raise TypeError(f"payload must be an int, got {type(payload).__name__}")
    if not 0 <= int(payload) < 1 << PAYLOAD_BITS:
        raise ValueError(f"payload must be in [0, 2**{PAYLOAD_BITS}), got {payload}")
    return int(payload)


def _to_bits(value: int, count: int) -> np.ndarray:
    return np.array([(value >> (count - 1 - i)) & 1 for i in range(count)], np.uint8)


def _parity(value: int) -> int:
    return bin(value).count("1") & 1


@functools.cache
def _trellis() -> tuple[np.ndarray, np.ndarray]:
    """For each next state and dropped top bit t: (previous state, output symbols in {-1, +1})."""
    prev = np.zeros((STATES, 2), np.int64)
    symbols = np.zeros((STATES, 2, len(GENERATORS)), np.float32)
    for nxt in range(STATES):
        for t in range(2):
            prev[nxt, t] = (nxt >> 1) | (t << (TAIL - 1))
            register = (t << TAIL) | nxt
            symbols[nxt, t] = [2 * _parity(register & g) - 1 for g in GENERATORS]
    return prev, symbols


def encode(payload: int) -> np.ndarray:
    """payload -> (CODED_BITS,) uint8 coded bits."""
    payload = check_payload(payload)
    data = payload.to_bytes(PAYLOAD_BITS // 8, "big")
    bits = np.concatenate(
        [_to_bits(payload, PAYLOAD_BITS), _to_bits(crc8(data), CRC_BITS), np.zeros(TAIL, np.uint8)]
    )
    register = 0
    out: list[int] = []
    for bit in bits:
        register = ((register << 1) | int(bit)) & ((1 << CONSTRAINT) - 1)
        out.extend(_parity(register & g) for g in GENERATORS)
    return np.array(out, np.uint8)


def viterbi(soft: np.ndarray) -> np.ndarray:
    """Soft values (CODED_BITS,) (> 0 means a 1 was sent) -> the most likely INFO_BITS bits."""
    soft = np.asarray(soft, np.float32).reshape(-1, len(GENERATORS))  # (steps, 2)
    if soft.shape[0] != INFO_BITS + TAIL or not np.all(np.isfinite(soft)):
        raise ValueError(f"expected {CODED_BITS} finite soft values, got {soft.size}")
    prev, symbols = _trellis()
    metric = np.full(STATES, -np.inf, np.float32)
    metric[0] = 0.0
    choices = np.zeros((len(soft), STATES), np.uint8)
    for step, values in enumerate(soft):
        candidates = metric[prev] + symbols @ values  # (STATES, 2)
        choices[step] = np.argmax(candidates, axis=1)
        metric = candidates[np.arange(STATES), choices[step]]
    state, bits = 0, np.zeros(len(soft), np.uint8)  # the tail drives the encoder back to state 0
    for step in range(len(soft) - 1, -1, -1):
        bits[step] = state & 1
        state = int(prev[state, choices[step, state]])
    return bits[:INFO_BITS]


def decode(soft: np.ndarray) -> int | None:
    """Soft coded bits -> the payload, or None when the decoded CRC does not match."""
    bits = viterbi(soft)
    payload = int("".join(map(str, bits[:PAYLOAD_BITS])), 2)
    crc = int("".join(map(str, bits[PAYLOAD_BITS:])), 2)
    return payload if crc == crc8(payload.to_bytes(PAYLOAD_BITS // 8, "big")) else None
