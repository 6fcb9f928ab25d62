"""Optional authentication and encryption of every connection with ZeroMQ CURVE.

A secure cluster has two key pairs: one its node servers and coordinator present, and
one its clients (workers, and servers talking to peers) present. Every listening socket
runs a ZAP handler that admits only the cluster's client key, so a process without the
keys can neither join nor inject a message: its connection never completes.

`adapm-launch --secure` and `adapm.run(..., secure=True)` make fresh keys per cluster; for
clusters that span machines, `python -m adapm.security FILE` writes a key file (mode
0600) to copy to every machine and pass with `--keys-file FILE`."""

import os
import sys
from dataclasses import dataclass

import zmq
import zmq.auth.thread

ENV_CURVE_KEYS = "ADAPM_CURVE_KEYS"  # the four Z85 keys, comma-separated (see to_text)


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

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
        parts = text.strip().split(",")
        if len(parts) != 4 or any(len(p) != 40 for p in parts):
            raise ValueError("malformed CURVE keys: expected four 40-character Z85 keys")
        return cls(*(p.encode() for p in parts))

    @classmethod
    def from_environ(cls, environ=None):
        text = (os.environ if environ is None else environ).get(ENV_CURVE_KEYS)
        return cls.from_text(text) if text else None

    def save(self, path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_text() + "\n")

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_text(f.read())

    # -- sockets -------------------------------------------------------------------

    def listen(self, sock):
        """Make `sock` (before bind) a CURVE server with the cluster's server key."""
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
        sys.exit("usage: python -m adapm.security KEYFILE")
    CurveKeys.generate().save(sys.argv[1])
    print(f"wrote CURVE keys for one cluster to {sys.argv[1]} (keep it secret)")
