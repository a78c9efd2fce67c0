"""Continuation tokens: where a generation stopped, as an opaque string a client can hold.

A token is urlsafe base64 of: a JSON header (format, model sha256 and variant, seed, noise
position, the state tensors' names and sizes), the state's float32 bytes, the next-character
logits' bytes, and an HMAC-SHA256 of all that under the server's secret. Any replica with the same
secret and model continues it exactly; a tampered, truncated or foreign token, or one for another
model, is refused naming `state`, and even a correctly signed one must hold finite values of the
model's shapes before it reaches a batch.
"""

import base64
import binascii
import hashlib
import hmac
import json
import secrets

import numpy as np

from charrnn_runtime.errors import CharrnnError
from charrnn_runtime.state import Continuation, State

FORMAT = "charrnn-state-1"
MAC_BYTES = hashlib.sha256().digest_size
LIMIT = 1e6  # |value| above this is no state a trained model reaches


def random_secret() -> bytes:
    return secrets.token_bytes(32)


def encode(continuation: Continuation, secret: bytes) -> str:
    state = continuation.state
    header = {"format": FORMAT, "sha256": continuation.sha256, "variant": continuation.variant,
              "seed": continuation.seed, "position": continuation.position,
              "tensors": [[name, array.shape[1]] for name, array in state.arrays.items()]}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in (*state.arrays.values(), state.logits))
    payload = len(head).to_bytes(4, "big") + head + body
    return base64.urlsafe_b64encode(payload + hmac.digest(secret, payload, "sha256")).decode().rstrip("=")


def decode(token: str, secret: bytes, model) -> Continuation:
    """The Continuation in `token`, for `model`; a CharrnnError naming `state` when it cannot be trusted."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise CharrnnError("state: not a continuation token", "state") from None
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if len(raw) <= MAC_BYTES + 4 or not hmac.compare_digest(mac, hmac.digest(secret, payload, "sha256")):
        raise CharrnnError("state: the continuation token was modified, truncated, or signed by another "
                           "server's secret", "state")
    size = int.from_bytes(payload[:4], "big")
    header = json.loads(payload[4:4 + size])
    if header.get("format") != FORMAT:
        raise CharrnnError(f"state: unknown token format {header.get('format')!r}", "state")
    if (header["sha256"], header["variant"]) != (model.sha256, model.variant):
        raise CharrnnError(f"state: the token belongs to another model ({header['variant']} "
                           f"{header['sha256'][:12]}…), this server runs {model.variant} {model.sha256[:12]}…", "state")
    expected = [[t.input, t.size] for t in model.state_spec]
    values = np.frombuffer(payload[4 + size:], np.float32)
    if header["tensors"] != expected or len(values) != sum(s for _, s in expected) + len(model.vocab):
        raise CharrnnError("state: the token does not fit this model's state", "state")
    if not (np.isfinite(values).all() and np.abs(values).max() <= LIMIT):
        raise CharrnnError("state: the token holds non-finite or out-of-range values", "state")
    arrays, offset = {}, 0
    for name, width in expected:
        arrays[name] = values[offset:offset + width].reshape(1, width).copy()
        offset += width
    return Continuation(State(arrays, values[offset:].reshape(1, -1).copy()), int(header["seed"]),
                        int(header["position"]), header["sha256"], header["variant"])
