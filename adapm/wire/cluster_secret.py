"""The cluster secret: how node servers and the coordinator prove to each other that they
belong to one cluster before it has formed (docs/protocol.md, "Joining").

Until the coordinator hands out the cluster's message token (PEERS), a node is known only
by what it says. Without a secret, anyone who reached the coordinator's port while the
cluster was forming could JOIN as a missing node, be handed the token, and then update
any key. So:

- a JOIN carries a fresh nonce and an HMAC-SHA256 over (node, spec fingerprint, address,
  nonce) keyed by the secret: the coordinator admits a node only with a valid one;
- PEERS carries the token masked with an HMAC of the joining node's nonce, and an HMAC
  over everything it says: only the node that chose the nonce and knows the secret can
  read the token, and a node accepts PEERS only from a coordinator that knows it too.

The secret itself never travels. `adapm.run` and single-machine launches make one per
cluster; per-machine launches read it from ADAPM_CLUSTER_SECRET or --secret-file (every
machine the same); a secure cluster (CURVE, --keys-file) derives it from its keys. A
per-machine launch with none falls back to one derived from public options (a warning
says that anyone reaching the port before formation could then join).

What it does not do: encrypt. Without --secure, whoever can read the traffic reads the
token from any later message; CURVE (adapm.wire.security) protects against that."""

import hashlib
import hmac
import logging
import secrets
import sys

from adapm.common.private_file import read_private_file, readable_by_others

log = logging.getLogger("adapm.cluster_secret")

NONCE_BYTES = 16
MAC_BYTES = 32
PROOF_BYTES = NONCE_BYTES + MAC_BYTES  # a JOIN's proof frame: nonce | MAC
MIN_SECRET_CHARACTERS = 16
MAX_SECRET_FILE_BYTES = 4096
TOKEN_BITS = 63
# Read by adapm-launch on every machine of a per-machine launch (docs/configuration.md).
ENV_CLUSTER_SECRET = "ADAPM_CLUSTER_SECRET"


class ClusterSecret:
    """A 32-byte key that every node server of a cluster holds. `public`: derived from
    options anyone can know (a per-machine launch without a secret): proves nothing."""

    def __init__(self, key, public=False):
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a cluster secret key is 32 bytes")
        self._key = key
        self.public = public

    def __repr__(self):  # the key stays out of logs and tracebacks
        return f"ClusterSecret({'public' if self.public else 'private'})"

    def __eq__(self, other):
        return isinstance(other, ClusterSecret) and hmac.compare_digest(self._key, other._key)

    __hash__ = None

    @classmethod
    def generate(cls):
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_text(cls, text, where):
        """The secret a user wrote (ADAPM_CLUSTER_SECRET, a secret file): any text of at
        least MIN_SECRET_CHARACTERS characters, surrounding whitespace ignored."""
        return cls(_derive(b"adapm-cluster-secret", check_secret_text(text, where).encode()))

    @classmethod
    def from_curve(cls, curve):
        """A secure cluster's secret, derived from the client secret key every member
        holds (workers hold it too, but workers never join)."""
        return cls(_derive(b"adapm-curve-secret", curve.client_secret))

    @classmethod
    def public_for(cls, cluster_id):
        """The stand-in of a per-machine launch that was given no secret."""
        return cls(_derive(b"adapm-public-secret", cluster_id.encode()), public=True)

    # -- JOIN ----------------------------------------------------------------------

    def join_proof(self, node, fingerprint, address):
        """A JOIN's proof frame (nonce | MAC) for node `node` at `address`."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._mac(b"join", node, fingerprint, address.encode(), nonce)

    def check_join(self, proof, node, fingerprint, address):
        """The proof's nonce when `proof` is this secret's for the JOIN's fields, else
        None."""
        if len(proof) != PROOF_BYTES:
            return None
        nonce, mac = proof[:NONCE_BYTES], proof[NONCE_BYTES:]
        expected = self._mac(b"join", node, fingerprint, address.encode(), nonce)
        return nonce if hmac.compare_digest(mac, expected) else None

    # -- PEERS ---------------------------------------------------------------------

    def mask_token(self, token, node, nonce):
        """The token as PEERS carries it to the node whose JOIN had `nonce` (masking
        twice unmasks)."""
        mask = int.from_bytes(self._mac(b"token", node, 0, b"", nonce)[:8], "little")
        return token ^ (mask >> (64 - TOKEN_BITS))

    def peers_proof(self, node, nonce, masked_token, addresses):
        """The MAC of a PEERS message: the coordinator knows the secret and answers the
        JOIN that had `nonce`."""
        return self._mac(b"peers", node, masked_token, "\n".join(addresses).encode(), nonce)

    def check_peers(self, proof, node, nonce, masked_token, addresses):
        return len(proof) == MAC_BYTES and hmac.compare_digest(
            proof, self.peers_proof(node, nonce, masked_token, addresses))

    def _mac(self, purpose, node, number, text, nonce):
        message = b"|".join((purpose, str(int(node)).encode(), str(int(number)).encode(),
                             text, nonce))
        return hmac.new(self._key, message, hashlib.sha256).digest()


def _derive(purpose, material):
    return hashlib.sha256(purpose + b"\0" + material).digest()


def check_secret_text(text, where):
    """`text` without surrounding whitespace, if it is long enough to be a secret."""
    text = text.strip()
    if "\n" in text or "\r" in text:  # --hosts hands a secret on as one line
        raise ValueError(f"{where}: a cluster secret is one line")
    if len(text) < MIN_SECRET_CHARACTERS:
        raise ValueError(f"{where}: a cluster secret needs at least {MIN_SECRET_CHARACTERS} "
                         f"characters (make one with python -m adapm.wire.cluster_secret)")
    return text


def read_secret_text(path):
    """The secret text in file `path`: a regular file (a FIFO or device would block or
    never end), at most MAX_SECRET_FILE_BYTES. '-' reads one line from standard input
    (how --hosts hands it to the launchers it starts over ssh)."""
    if path == "-":
        return check_secret_text(sys.stdin.readline(), "the secret on standard input")
    try:
        data = read_private_file(path, MAX_SECRET_FILE_BYTES)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; a secret file holds one line") from None
    mode = readable_by_others(path)
    if mode is not None:
        log.warning("%s: readable by others than its owner (mode %04o; chmod 600 it)", path,
                    mode)
    return check_secret_text(data.decode("utf-8", "replace"), path)


def new_secret_text():
    """A fresh secret to put in ADAPM_CLUSTER_SECRET or a secret file."""
    return secrets.token_hex(32)


if __name__ == "__main__":
    print(new_secret_text())
