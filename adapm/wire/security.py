"""Optional authentication and encryption of every connection with ZeroMQ CURVE.

A secure cluster has two key pairs: one its node servers and coordinator present, and
one its clients (workers, and servers talking to peers) present. Every listening socket
runs a ZAP handler that admits only the cluster's client key, so a process without the
keys can neither join nor inject a message: its connection never completes.

`adapm-launch --secure` and `adapm.run(..., secure=True)` make fresh keys per cluster; for
clusters that span machines, `python -m adapm.wire.security FILE` writes a key file (mode
0600) to copy to every machine and pass with `--keys-file FILE`.

Only node servers and the coordinator hold the server's secret key. A worker gets the
three keys a client needs (ADAPM_CURVE_CLIENT) and takes them out of its environment as
it starts (claim_client_keys), so nothing its script starts inherits them."""

import os
import sys
import tempfile
from dataclasses import dataclass, field

import zmq
import zmq.auth.thread
from zmq.utils.z85 import Z85CHARS

from adapm.common.config import ENV_CLUSTER_ID
from adapm.common.private_file import (  # noqa: F401 - readable_by_others: for adapm.ops.launch
    TooLarge,
    read_private_file,
    readable_by_others,
)
from adapm.wire.cluster_secret import ENV_CLUSTER_SECRET

ENV_CURVE_KEYS = "ADAPM_CURVE_KEYS"      # a launcher's keys, all four (see to_text)
ENV_CURVE_CLIENT = "ADAPM_CURVE_CLIENT"  # a worker's keys, the three of a client
                                         # (see client_text)

KEY_FILE_LIMIT = 4096  # bytes read of a key file at most: one holds about 170

_claimed = {}  # cluster id -> the client keys this process took out of its environment


@dataclass(frozen=True)
class CurveKeys:
    """The keys of one cluster. A worker's have no server_secret (None): they can only
    connect. Secret keys stay out of repr(), and so out of logs and tracebacks."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)

    @classmethod
    def generate(cls):
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def to_text(self):
        return ",".join(k.decode() for k in (self.server_public, self.server_secret,
                                             self.client_public, self.client_secret))

    @classmethod
    def from_text(cls, text):
        return cls(*_z85_keys(text, 4))

    def client_text(self):
        """What a client needs: the server's public key and the client key pair."""
        return ",".join(k.decode() for k in (self.server_public, self.client_public,
                                             self.client_secret))

    @classmethod
    def from_client_text(cls, text):
        server_public, client_public, client_secret = _z85_keys(text, 3)
        return cls(server_public, None, client_public, client_secret)

    @classmethod
    def from_environ(cls, environ=None):
        text = (os.environ if environ is None else environ).get(ENV_CURVE_KEYS)
        return cls.from_text(text) if text else None

    def save(self, path):
        """Write a key file readable by its owner only. It replaces whatever is at `path`
        (a file of any mode, a symlink) by a new file: written first under a fresh name
        that nobody else can have opened or linked (mkstemp: O_EXCL, mode 0600), then
        renamed over `path`. A rename never follows a symlink, so the keys cannot be
        written through one to another place, and nobody sees a half-written file."""
        folder = os.path.dirname(os.path.abspath(path))
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".adapm-keys-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_text() + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path):
        """The keys in file `path`. Anything but a regular file is refused before a byte is
        read (adapm.common.private_file)."""
        try:
            text = read_private_file(path, KEY_FILE_LIMIT)
        except TooLarge as exc:
            raise ValueError(f"malformed CURVE keys: {exc}") from None
        return cls.from_text(text.decode("ascii", errors="replace"))

    # -- sockets -------------------------------------------------------------------

    def listen(self, sock):
        """Make `sock` (before bind) a CURVE server with the cluster's server key."""
        if self.server_secret is None:
            raise ValueError("a worker's CURVE keys cannot listen: no server secret key")
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def connect(self, sock):
        """Make `sock` (before connect) a CURVE client with the cluster's client key."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def authenticator(self, ctx):
        """A running ZAP handler for `ctx` that admits only the cluster's client key."""
        auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_OnlyKey(
            self.client_public))
        return auth


def _z85_keys(text, count):
    parts = text.strip().split(",")
    if len(parts) != count or any(len(p) != 40 or not _Z85.issuperset(p) for p in parts):
        raise ValueError(f"malformed CURVE keys: expected {count} 40-character Z85 keys, "
                         "separated by commas (python -m adapm.wire.security FILE makes them)")
    return [p.encode() for p in parts]


_Z85 = frozenset(Z85CHARS.decode())


def claim_client_keys():
    """Take a worker's keys out of this process's environment, so that no process it
    starts inherits them, and keep them for its Worker. The four keys of a launcher
    (ADAPM_CURVE_KEYS) go too: a worker never needs the server's secret key. Workers
    call this as they start, before any user code runs; Worker calls it again for
    processes that were started some other way."""
    text = os.environ.pop(ENV_CURVE_CLIENT, None)
    os.environ.pop(ENV_CURVE_KEYS, None)
    if text:
        _claimed[os.environ.get(ENV_CLUSTER_ID)] = CurveKeys.from_client_text(text)


def client_keys(cluster_id):
    """The keys this process's Worker connects to cluster `cluster_id` with, or None
    (not secure). Keyed by cluster so that keys of one cluster never reach another."""
    claim_client_keys()
    return _claimed.get(cluster_id)


def without_secrets(environ):
    """A copy of `environ` without any CURVE keys or cluster secret (for a process that
    needs none, or gets its own: workers never join)."""
    return {name: value for name, value in environ.items()
            if name not in (ENV_CURVE_KEYS, ENV_CURVE_CLIENT, ENV_CLUSTER_SECRET)}


class _OnlyKey:
    def __init__(self, key):
        self.key = key

    def callback(self, domain, key):
        return key == self.key


def listener(ctx, keys, kind=zmq.ROUTER):
    """A listening socket, secured when `keys` is given."""
    sock = ctx.socket(kind)
    if keys is not None:
        keys.listen(sock)
    return sock


def connector(ctx, keys, kind=zmq.DEALER):
    """A connecting socket, secured when `keys` is given."""
    sock = ctx.socket(kind)
    if keys is not None:
        keys.connect(sock)
    return sock


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m adapm.wire.security KEYFILE")
    CurveKeys.generate().save(sys.argv[1])
    print(f"wrote CURVE keys for one cluster to {sys.argv[1]} (keep it secret)")
