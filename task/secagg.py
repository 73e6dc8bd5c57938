"""Secure aggregation (Bonawitz et al. 2017 = Bell et al. 2020 SecAgg+ on the complete graph):
the protocol core as pure code (ints, bytes, numpy arrays; Flower messaging is in server/, client/).

Protocol, one fresh ``SecAggClient`` per client per round (keys must never be reused):
  1. keys: client u makes two ECDH key pairs (SECP384R1): c_u encrypts Shamir shares, s_u
     derives pairwise masks. The server broadcasts the public keys of those who answered (U0).
  2. share keys: u draws a self-mask seed b_u (32 random bytes), Shamir-shares b_u and its s
     secret key with threshold t among U0, and sends each v one Fernet ciphertext (key from
     ECDH(c_u, c_v)) whose plaintext names src and dst. U1 = the clients that answered.
  3. masked input: u decrypts its shares, quantizes x_u to q_u and sends y_u = q_u + PRG(b_u)
     + sum_{v in U1, v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod M, s_uv = ECDH(s_u, s_v).
     S = clients whose y_u arrived (survivors); D = U1 - S (dropped).
  4. unmask: each remaining survivor sends its share of b_u for every u in S and of s_u for
     every u in D, never both for one u (else a late y_u could be unmasked). The server sums
     y_u over S, rebuilds each b_u (>= t shares) and removes PRG(b_u), rebuilds each dropped
     s_d and removes the masks PRG(s_du) left in the survivors' y_u, then dequantizes.

Threat model: honest-but-curious server, colluding with fewer than t clients. Hidden: every
individual vector (each y_u is uniform over [0, M) to the server). Revealed: the quantized sum
of the survivors' vectors, who survived (S) and who dropped (D), the vector length. Not
covered: a malicious server telling clients different S/D (SecAgg's signed consistency round).

Quantization and the modulus: task/secagg_ring.py.

Mask PRG: ChaCha20 keystream (pyca/cryptography) keyed by SHA-256(domain tag, full seed). Not
Flower's ``pseudo_rand_gen``: it XOR-folds the seed to 32 bits for numpy's Mersenne Twister (a
b_u falls to 2^32 guesses, defeating "never both" for a late client) and never draws M - 1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation import secaggplus_utils as su
from flwr.common.secure_aggregation.crypto import shamir
from flwr.common.secure_aggregation.crypto import symmetric_encryption as sym

# flwr 1.39 keeps the key-pair helpers here, no longer in symmetric_encryption.
from flwr.supercore.primitives import asymmetric as asym

from .secagg_ring import MAX_BITS, SecAggParams, dequantize_sum, quantize_vector

__all__ = ["MAX_BITS", "SecAggClient", "SecAggParams", "SecAggServer", "dequantize_sum",
           "mask_prg", "quantize_vector"]

STATE_FORMAT = "fedlora-secagg-client/1"
_SK_LEN = 48  # a SECP384R1 scalar; shared raw (4 Shamir chunks) instead of PEM (20 chunks)


def mask_prg(seed: bytes, domain: bytes, length: int, modulus: int) -> np.ndarray:
    """``length`` integers uniform in [0, modulus) (a power of two) expanded from ``seed``."""
    key = hashlib.sha256(b"fedlora-secagg/" + domain + b"/" + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8")
    return words & np.uint64(modulus - 1)


def _pair_mask(sk: ec.EllipticCurvePrivateKey, pk: bytes, length: int, mod: int) -> np.ndarray:
    # ECDH is symmetric: ECDH(s_u, S_v) == ECDH(s_v, S_u), so u and v (or the server holding a
    # dropped client's rebuilt key) expand the same mask.
    seed = base64.urlsafe_b64decode(sym.generate_shared_key(sk, asym.bytes_to_public_key(pk)))
    return mask_prg(seed, b"pair", length, mod)


def _ids(values: Iterable[int], what: str) -> set[int]:
    out = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
            raise ValueError(f"{what}: ids must be positive ints, got {v!r}")
        out.add(int(v))
    return out


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text.encode("ascii"), validate=True)


class SecAggClient:
    """One client's side of one round; stages must run in order: keys, share, mask, unmask."""

    def __init__(self, params: SecAggParams, my_id: int) -> None:
        (self.my_id,) = _ids([my_id], "my_id")
        self.params = params
        self.stage = "keys"
        c_sk, c_pk = asym.generate_key_pairs()
        s_sk, s_pk = asym.generate_key_pairs()
        self._c_sk: bytes | None = asym.private_key_to_bytes(c_sk)
        self._s_sk: bytes | None = asym.private_key_to_bytes(s_sk)
        self._pks = (asym.public_key_to_bytes(c_pk), asym.public_key_to_bytes(s_pk))
        self._b_seed: bytes | None = None
        self._public_keys: dict[int, tuple[bytes, bytes]] = {}
        self._b_shares: dict[int, bytes] = {}  # owner id -> my share of owner's b
        self._sk_shares: dict[int, bytes] = {}  # owner id -> my share of owner's s key
        self._revealed_b: set[int] = set()
        self._revealed_sk: set[int] = set()

    def _expect(self, stage: str, call: str) -> None:
        if self.stage != stage:
            raise RuntimeError(f"client {self.my_id}: {call} called in stage {self.stage!r}, "
                               f"expected {stage!r} (one SecAggClient per round)")

    def public_keys(self) -> tuple[bytes, bytes]:
        """(c public key, s public key), PEM bytes."""
        return self._pks

    def share_keys(self, public_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 2: dst id -> Fernet ciphertext carrying my shares of b_u and s_u for dst."""
        self._expect("keys", "share_keys")
        ids = sorted(_ids(public_keys, "share_keys"))
        p = self.params
        if not p.threshold <= len(ids) <= p.num_clients:
            raise ValueError(f"share_keys: {len(ids)} clients, need between t={p.threshold} "
                             f"and n={p.num_clients}")
        if tuple(public_keys.get(self.my_id, ())) != self._pks:
            raise ValueError(f"share_keys: my ({self.my_id}) public keys are missing or altered")
        flat = [k for pair in public_keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise ValueError("share_keys: some public keys are identical")
        assert self._c_sk is not None and self._s_sk is not None
        s_scalar = asym.bytes_to_private_key(self._s_sk).private_numbers().private_value
        self._b_seed = secrets.token_bytes(32)
        b_shares = shamir.create_shares(self._b_seed, p.threshold, len(ids))
        sk_shares = shamir.create_shares(s_scalar.to_bytes(_SK_LEN, "big"), p.threshold, len(ids))
        c_sk = asym.bytes_to_private_key(self._c_sk)
        out = {}
        # Share i goes to the i-th smallest id; the share carries its own x-coordinate.
        for dst, b_sh, sk_sh in zip(ids, b_shares, sk_shares, strict=True):
            if dst == self.my_id:
                self._b_shares[dst], self._sk_shares[dst] = b_sh, sk_sh
                continue
            key = sym.generate_shared_key(c_sk, asym.bytes_to_public_key(public_keys[dst][0]))
            plain = su.share_keys_plaintext_concat(self.my_id, dst, b_sh, sk_sh)
            out[dst] = sym.encrypt(key, plain)
        self._public_keys = {i: (bytes(public_keys[i][0]), bytes(public_keys[i][1])) for i in ids}
        self.stage = "shared"
        return out

    def masked_input(self, vector: np.ndarray, ciphertexts: dict[int, bytes]) -> np.ndarray:
        """Stage 3: decrypt the shares addressed to me; return y_u (uint64, values < M).

        A float vector is quantized here; an int64 vector is taken as already on the grid
        (distributed DP rounds and noises it itself) and only reduced mod M."""
        self._expect("shared", "masked_input")
        p = self.params
        x = np.asarray(vector)
        on_grid = x.dtype == np.int64
        if x.ndim != 1 or not x.size or not (on_grid or (x.dtype.kind == "f"
                                                         and np.isfinite(x).all())):
            raise ValueError(f"masked_input: need a non-empty 1-D finite float vector (or int64 "
                             f"grid values), got shape {x.shape} dtype {x.dtype}")
        srcs = _ids(ciphertexts, "masked_input")
        if unknown := srcs - (set(self._public_keys) - {self.my_id}):
            raise ValueError(f"masked_input: ciphertexts from outsiders {sorted(unknown)}")
        if len(srcs) + 1 < p.threshold:
            raise ValueError(f"masked_input: shares from {len(srcs)} others, need >= t - 1 = "
                             f"{p.threshold - 1}")
        assert self._c_sk is not None and self._s_sk is not None and self._b_seed is not None
        c_sk = asym.bytes_to_private_key(self._c_sk)
        got: dict[int, tuple[bytes, bytes]] = {}
        for src in sorted(srcs):  # decrypt and check all before changing any state
            pk = asym.bytes_to_public_key(self._public_keys[src][0])
            key = sym.generate_shared_key(c_sk, pk)
            try:
                plain = sym.decrypt(key, ciphertexts[src])
            except InvalidToken:
                raise ValueError(f"client {self.my_id}: ciphertext labelled from {src} could not "
                                 "be decrypted (misrouted or tampered)") from None
            real_src, dst, b_sh, sk_sh = su.share_keys_plaintext_separate(plain)
            if (real_src, dst) != (src, self.my_id):
                raise ValueError(f"client {self.my_id}: share labelled {src}->{self.my_id} "
                                 f"is really {real_src}->{dst} (misrouted)")
            got[src] = (b_sh, sk_sh)
        q = (x.view(np.uint64) & np.uint64(p.modulus - 1)) if on_grid else quantize_vector(p, x)
        y = q + mask_prg(self._b_seed, b"self", x.size, p.modulus)
        s_sk = asym.bytes_to_private_key(self._s_sk)
        for v in sorted(srcs):  # pairwise masks with every v that shared with me (= U1)
            mask = _pair_mask(s_sk, self._public_keys[v][1], x.size, p.modulus)
            y = y + mask if v > self.my_id else y - mask  # uint64 wraps mod 2^64
        for src, (b_sh, sk_sh) in got.items():
            self._b_shares[src], self._sk_shares[src] = b_sh, sk_sh
        # The secrets are not needed any more; drop them from the stored state.
        self._b_seed = self._c_sk = self._s_sk = None
        self.stage = "masked"
        return y & np.uint64(p.modulus - 1)

    def unmask_shares(
        self, survivors: Sequence[int], dropped: Sequence[int]
    ) -> dict[str, dict[int, bytes]]:
        """Stage 4: {"b": {u: share of b_u} for survivors, "sk": {u: share of s_u} for dropped}.

        Refuses (ValueError) to ever release both shares for one id, across calls too."""
        self._expect("masked", "unmask_shares")
        alive, gone = _ids(survivors, "survivors"), _ids(dropped, "dropped")
        both = (alive & gone) | (alive & self._revealed_sk) | (gone & self._revealed_b)
        if both:
            raise ValueError(f"client {self.my_id} refuses: asked for both the b-share and the "
                             f"sk-share of {sorted(both)}")
        if self.my_id not in alive:
            raise ValueError(f"client {self.my_id} refuses: I sent my masked input, so I must be "
                             "a survivor")
        if len(alive) < self.params.threshold:
            raise ValueError(f"client {self.my_id} refuses: {len(alive)} survivors < t = "
                             f"{self.params.threshold}")
        if unknown := (alive | gone) - set(self._b_shares):
            raise ValueError(f"client {self.my_id}: no shares held for {sorted(unknown)}")
        self._revealed_b |= alive
        self._revealed_sk |= gone
        return {"b": {u: self._b_shares[u] for u in sorted(alive)},
                "sk": {u: self._sk_shares[u] for u in sorted(gone)}}

    _SECRETS = ("c_sk", "s_sk", "b_seed")
    _SHARES = ("b_shares", "sk_shares")
    _REVEALED = ("revealed_b", "revealed_sk")

    def to_bytes(self) -> bytes:
        """The state as JSON (bytes as base64). Holds secrets: keep it on the client node."""
        state: dict[str, object] = {
            "format": STATE_FORMAT, "params": asdict(self.params), "my_id": self.my_id,
            "stage": self.stage, "pks": [_b64(k) for k in self._pks],
            "public_keys": [[i, _b64(c), _b64(s)] for i, (c, s) in self._public_keys.items()]}
        state |= {k: _b64(getattr(self, "_" + k)) for k in self._SECRETS}
        state |= {k: [[i, _b64(v)] for i, v in getattr(self, "_" + k).items()]
                  for k in self._SHARES}
        state |= {k: sorted(getattr(self, "_" + k)) for k in self._REVEALED}
        return json.dumps(state, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        """Rebuild from ``to_bytes`` output; ValueError on anything else (pickle included)."""
        try:
            st = json.loads(data.decode("utf-8"))
            if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} state")
            if st["stage"] not in ("keys", "shared", "masked"):
                raise ValueError(f"unknown stage {st['stage']!r}")
            self = cls.__new__(cls)
            self.params, self.my_id = SecAggParams(**st["params"]), int(st["my_id"])
            self.stage = st["stage"]
            c_pk, s_pk = (_unb64(k) for k in st["pks"])
            self._pks = (c_pk, s_pk)
            self._public_keys = {int(i): (_unb64(c), _unb64(s)) for i, c, s in st["public_keys"]}
            for k in cls._SECRETS:
                setattr(self, "_" + k, _unb64(st[k]))
            for k in cls._SHARES:
                setattr(self, "_" + k, {int(i): _unb64(v) for i, v in st[k]})
            for k in cls._REVEALED:
                setattr(self, "_" + k, {int(i) for i in st[k]})
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"SecAggClient.from_bytes: invalid state: {e}") from None
        return self


class SecAggServer:
    """The server's side of one round: routing, bookkeeping of U0/U1/S/D, and unmasking."""

    def __init__(self, params: SecAggParams, ids: Sequence[int], *, noised: bool = False) -> None:
        self.params = params
        self.noised = noised  # inputs carry noise on the grid: the sum may leave [-nL, nL]
        self.ids = _ids(ids, "SecAggServer")
        if len(self.ids) != len(ids) or not params.threshold <= len(self.ids) <= params.num_clients:
            raise ValueError(f"SecAggServer: need between t={params.threshold} and "
                             f"n={params.num_clients} distinct ids, got {list(ids)}")
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # U0
        self.shared: set[int] = set()  # U1

    def _enough(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise ValueError(f"secure aggregation aborted: {count} {what} < threshold "
                             f"t = {self.params.threshold}; nothing is released")

    def collect_public_keys(
        self, keys: dict[int, tuple[bytes, bytes]]
    ) -> dict[int, tuple[bytes, bytes]]:
        """Stage 1: validate the keys that arrived; returns what to broadcast (U0)."""
        if stray := _ids(keys, "collect_public_keys") - self.ids:
            raise ValueError(f"collect_public_keys: ids outside the cohort: {sorted(stray)}")
        self._enough(len(keys), "clients sent keys")
        self.keys = {int(i): (bytes(c), bytes(s)) for i, (c, s) in sorted(keys.items())}
        flat = [k for pair in self.keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise ValueError("collect_public_keys: some public keys are identical")
        for k in flat:  # parse now so that a bad key fails here, not in every client
            asym.bytes_to_public_key(k)
        return dict(self.keys)

    def route(
        self, ciphertexts_by_src: dict[int, dict[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2: src -> {dst: ct} into dst -> {src: ct}, for the senders U1 only."""
        srcs = _ids(ciphertexts_by_src, "route")
        if stray := srcs - set(self.keys):
            raise ValueError(f"route: ciphertexts from clients without keys: {sorted(stray)}")
        for src, cts in ciphertexts_by_src.items():
            # Every client must address every other one, else pairwise masks would not match.
            if set(cts) != set(self.keys) - {src}:
                raise ValueError(f"route: client {src} did not address exactly the other "
                                 "clients of the round")
        self._enough(len(srcs), "clients shared keys")
        self.shared = srcs
        return {dst: {src: ciphertexts_by_src[src][dst] for src in sorted(srcs) if src != dst}
                for dst in sorted(srcs)}

    def unmask_request(self, arrived: Iterable[int]) -> tuple[list[int], list[int]]:
        """Stage 4 request: (survivors S, dropped D) to send to every survivor."""
        alive = _ids(arrived, "unmask_request")
        if stray := alive - self.shared:
            raise ValueError(f"masked inputs from clients that shared no keys: {sorted(stray)}")
        self._enough(len(alive), "survivors")
        return sorted(alive), sorted(self.shared - alive)

    def unmask(
        self, masked: dict[int, np.ndarray], shares: dict[int, dict[str, dict[int, bytes]]]
    ) -> np.ndarray:
        """Sum of the survivors' float vectors, from their masked vectors and the shares."""
        p, mod_mask = self.params, np.uint64(self.params.modulus - 1)
        alive, gone = self.unmask_request(masked)
        vecs = [np.asarray(masked[u]) for u in alive]
        if len({v.shape for v in vecs}) != 1 or vecs[0].ndim != 1:
            raise ValueError(f"unmask: masked vectors differ in shape: "
                             f"{ {u: v.shape for u, v in zip(alive, vecs, strict=True)} }")
        for u, v in zip(alive, vecs, strict=True):
            if not np.issubdtype(v.dtype, np.integer) or v.min() < 0 or v.max() >= p.modulus:
                raise ValueError(f"unmask: masked vector of {u} is not integers in [0, M)")
        b_parts: dict[int, list[bytes]] = {u: [] for u in alive}
        sk_parts: dict[int, list[bytes]] = {d: [] for d in gone}
        for responder, part in shares.items():
            if responder not in alive:
                raise ValueError(f"unmask: shares from {responder}, not a survivor")
            if set(part.get("b", {})) - set(alive) or set(part.get("sk", {})) - set(gone):
                raise ValueError(f"unmask: client {responder} sent b-shares for non-survivors "
                                 "or sk-shares for non-dropped clients")
            for u, sh in part.get("b", {}).items():
                b_parts[u].append(sh)
            for d, sh in part.get("sk", {}).items():
                sk_parts[d].append(sh)
        # Check every secret before rebuilding any, so that a failure releases nothing.
        for kind, parts in (("b", b_parts), ("sk", sk_parts)):
            for owner, got in parts.items():
                self._enough(len(got), f"{kind}-shares for client {owner}")
        total = np.zeros(vecs[0].shape, dtype=np.uint64)
        for v in vecs:  # one at a time: n stacked vectors could be too large
            total += v.astype(np.uint64)
        for u in alive:
            b_seed = self._combine(b_parts[u], 32, f"b of client {u}")
            total -= mask_prg(b_seed, b"self", total.size, p.modulus)  # uint64 wraps mod 2^64
        for d in gone:
            scalar = int.from_bytes(self._combine(sk_parts[d], _SK_LEN, f"s key of {d}"), "big")
            try:
                sk = ec.derive_private_key(scalar, ec.SECP384R1())
            except ValueError:
                raise ValueError(f"unmask: rebuilt s key of {d} is invalid") from None
            if asym.public_key_to_bytes(sk.public_key()) != self.keys[d][1]:
                raise ValueError(f"unmask: rebuilt s key of {d} does not match its public key")
            for u in alive:  # u added +PRG(s_ud) if d > u, else -PRG(s_ud): undo it
                mask = _pair_mask(sk, self.keys[u][1], total.size, p.modulus)
                total = total - mask if d > u else total + mask
        return dequantize_sum(p, total & mod_mask, len(alive), check_range=not self.noised)

    def _combine(self, parts: list[bytes], size: int, what: str) -> bytes:
        try:  # exactly t shares: interpolation costs O(k^2), extra shares add nothing
            secret = shamir.combine_shares(parts[: self.params.threshold])
        except (ValueError, IndexError):
            secret = b""
        if len(secret) != size:
            raise ValueError(f"unmask: could not rebuild {what} from its shares")
        return secret
