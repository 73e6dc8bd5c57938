"""The data a method works on: the adapter spec, client updates, the global state.

Notation (DESIGN.md section 4), for one adapted linear module with frozen weight W0
(d_out x d_in): B is d_out x r, A is r x d_in, R is r x r, s = alpha / r is the LoRA
scaling. Pure torch: no I/O, nothing else of fedlora.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

Factors = dict[str, dict[str, torch.Tensor]]
"""module name -> role -> tensor. Roles: "A" (r x d_in), "B" (d_out x r), "R" (r x r) and
"G" (d_out x d_in full-weight gradient estimate, only in Fed-SB's init round), "Y"
(d_out x k) and "W" (l x d_in): a linear sketch G Omega and Psi G of that estimate (Fed-SB's
sketched init round), and "U" (d_out x m), "V" (m x d_in): a low-rank term U V folded into
the frozen weight. A server state may hold a :class:`Stacked` where a tensor is expected."""

ROLES: tuple[str, ...] = ("A", "B", "R", "G", "U", "V", "Y", "W")
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")
HEAD_PREFIX = "head"
SEP = "::"


@dataclass(frozen=True)
class AdapterSpec:
    """The adapted modules of a base model and the global LoRA hyper-parameters."""

    shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in)
    rank: int
    alpha: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise ValueError(f"AdapterSpec.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"AdapterSpec.alpha must be a number > 0, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"AdapterSpec.alpha must be finite and > 0, got {self.alpha!r}")
        if not is_int(self.seed):
            raise ValueError(f"AdapterSpec.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.shapes, Mapping) or not self.shapes:
            raise ValueError("AdapterSpec.shapes must name at least one module: {name: (d_out, d_in)}")
        shapes: dict[str, tuple[int, int]] = {}
        for name, shape in self.shapes.items():
            check_module_name(name)
            dims = tuple(shape)
            if len(dims) != 2 or any(not is_int(d) or d < 1 for d in dims):
                raise ValueError(
                    f"AdapterSpec.shapes[{name!r}] must be (d_out, d_in) with integers >= 1, "
                    f"got {shape!r}"
                )
            shapes[name] = (int(dims[0]), int(dims[1]))
        # Normalize to plain tuples (lists from JSON/Hydra would otherwise leak through).
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def is_int(x: object) -> bool:
    """An integer (Python, numpy or torch), but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_module_name(name: object) -> None:
    """Module names become flat checkpoint keys "module::role": keep them unambiguous."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"module names must be non-empty strings, got {name!r}")
    if SEP in name:
        raise ValueError(f"module name {name!r} must not contain {SEP!r}")
    if name == HEAD_PREFIX:
        raise ValueError(f"module name {HEAD_PREFIX!r} is reserved for head parameters")


@dataclass
class ClientUpdate:
    """What one client sends up after its local round."""

    factors: Factors  # exactly the method's uplink roles for every module
    num_examples: int
    scaling: float  # alpha_k / r_k the client used
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    node: str = ""


@dataclass
class GlobalState:
    """The server's global adapter after ``round`` completed aggregation rounds."""

    round: int
    factors: Factors
    head: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON-able: method, rank, alpha, seed, shapes, weighting, options

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat names for safetensors: "module::role" and "head::name"."""
        out: dict[str, torch.Tensor] = {}
        for module, roles in self.factors.items():
            check_module_name(module)
            for role, tensor in roles.items():
                out[f"{module}{SEP}{role}"] = dense(tensor).contiguous()  # a Stacked written out
        for name, tensor in self.head.items():
            out[f"{HEAD_PREFIX}{SEP}{name}"] = tensor.contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, round: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> GlobalState:
        """Inverse of :meth:`tensors` (exact round trip)."""
        factors: Factors = {}
        head: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            prefix, sep, rest = key.partition(SEP)
            if not sep or not rest:
                raise ValueError(f"tensor name {key!r} is not 'module::role' or 'head::name'")
            if prefix == HEAD_PREFIX:
                head[rest] = tensor
            else:
                if rest not in ROLES:
                    raise ValueError(f"tensor name {key!r}: unknown role {rest!r}")
                factors.setdefault(prefix, {})[rest] = tensor
        return cls(round=int(round), factors=factors, head=head, meta=copy.deepcopy(dict(meta)))


@dataclass
class ClientStart:
    """What a client loads at the start of its local round."""

    init: Factors  # initial factor values per module (fedsb without first contact: only R)
    trainable: tuple[str, ...]  # roles the client trains this round
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]]  # flora: W = W0 + U @ V
    rank: int
    scaling: float


class Stacked:
    """A matrix kept as blocks by reference: ``torch.cat([c_1 X_1, ..., c_n X_n], axis)``.

    FLoRA's accumulated factors grow by every client's A_k and B_k each round. Copying them
    into one fresh tensor writes all of the round's client factors again (1.6 GB per round at
    Llama-7B shapes: 224 modules, r 16, 10 clients); keeping references to the decoded
    update tensors and a scalar c_i per block writes nothing, and the product c_i X_i is
    formed where the factor is used: the codec writes the blocks straight into the wire
    buffer (:meth:`write_into`), everything else reads a fresh dense copy.

    It reads like a float tensor: ``shape``, ``dtype``, ``numel()`` and ``dim()`` are cheap;
    any torch function, operator or Tensor method (``torch.equal``, ``@``, ``.double()``,
    ``.contiguous()``, ...) runs on :meth:`dense`, which is bit-identical to
    ``torch.cat([X_i.float() * c_i], axis)`` (a block with c_i = 1 is copied as is).
    In-place methods are refused: the blocks belong to the updates and to earlier states,
    which must not change after they are stacked (aggregate never mutates its inputs).
    """

    __slots__ = ("_blocks", "_scales", "_axis", "_shape", "_dtype")

    def __init__(self, blocks: Sequence[torch.Tensor], scales: Sequence[float], axis: int):
        if axis not in (0, 1):
            raise ValueError(f"Stacked: axis must be 0 (rows) or 1 (columns), got {axis!r}")
        blocks = tuple(b.detach() for b in blocks)
        scales = tuple(float(c) for c in scales)
        if not blocks or len(blocks) != len(scales):
            raise ValueError("Stacked needs at least one block and one scale per block")
        other = 1 - axis
        if any(b.dim() != 2 for b in blocks) or len({b.shape[other] for b in blocks}) != 1:
            raise ValueError(f"Stacked: blocks {[tuple(b.shape) for b in blocks]} do not stack "
                             f"along axis {axis}")
        if not all(math.isfinite(c) for c in scales):
            raise ValueError(f"Stacked: scales must be finite, got {scales}")
        size = sum(b.shape[axis] for b in blocks)
        self._blocks, self._scales, self._axis = blocks, scales, axis
        self._shape = torch.Size((size, blocks[0].shape[1]) if axis == 0
                                 else (blocks[0].shape[0], size))
        dtype = torch.float32
        for b in blocks:
            dtype = torch.promote_types(dtype, b.dtype)
        self._dtype = dtype

    @classmethod
    def of(cls, parts: Sequence[torch.Tensor | Stacked], scales: Sequence[float],
           axis: int) -> Stacked:
        """Stack ``parts`` (tensors or Stacked along the same axis, whose blocks are taken
        over by reference with their scales times the part's) with one scale per part.
        Empty blocks are dropped (one is kept when all are empty, for the shape)."""
        blocks: list[torch.Tensor] = []
        cs: list[float] = []
        for part, c in zip(parts, scales, strict=True):
            c = float(c)
            if isinstance(part, Stacked) and part._axis == axis:
                blocks += part._blocks
                # c == 1: keep each scale's bits (no product), so a carried stack is exact.
                cs += part._scales if c == 1.0 else [ci * c for ci in part._scales]
            else:
                blocks.append(part.dense() if isinstance(part, Stacked) else part)
                cs.append(c)
        keep = [i for i, b in enumerate(blocks) if b.shape[axis]] or [0]
        return cls([blocks[i] for i in keep], [cs[i] for i in keep], axis)

    # -- what a tensor reader asks cheaply ---------------------------------------------
    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        return self._blocks

    @property
    def scales(self) -> tuple[float, ...]:
        return self._scales

    @property
    def axis(self) -> int:
        return self._axis

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._blocks[0].device

    @property
    def ndim(self) -> int:
        return 2

    @property
    def requires_grad(self) -> bool:
        return False

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self._shape[0] * self._shape[1]

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self._shape if dim is None else self._shape[dim]

    def __len__(self) -> int:
        return self._shape[0]

    def __repr__(self) -> str:
        return (f"Stacked(shape={tuple(self._shape)}, dtype={self._dtype}, "
                f"blocks={len(self._blocks)}, axis={self._axis})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Stacked, (self._blocks, self._scales, self._axis))

    # -- writing it out ----------------------------------------------------------------
    def write_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the stacked matrix into ``out`` (any float dtype, e.g. the wire dtype):
        every element once, c_i X_i formed in at least float32 and cast on the write."""
        if tuple(out.shape) != tuple(self._shape):
            raise ValueError(f"Stacked.write_into: out has shape {tuple(out.shape)}, "
                             f"expected {tuple(self._shape)}")
        start = 0
        with one_intra_op_thread():
            if all(c == 1.0 for c in self._scales):
                # One cat: a single pass, far faster than strided per-block column writes.
                return torch.cat(self._blocks, dim=self._axis, out=out)
            for block, c in zip(self._blocks, self._scales, strict=True):
                n = block.shape[self._axis]
                dst = out.narrow(self._axis, start, n)
                if c == 1.0:
                    dst.copy_(block)
                else:
                    src = block.to(torch.promote_types(block.dtype, torch.float32))
                    torch.mul(src, c, out=dst)
                start += n
        return out

    def dense(self) -> torch.Tensor:
        """A fresh contiguous tensor holding the stacked matrix."""
        return self.write_into(torch.empty(self._shape, dtype=self._dtype,
                                           device=self.device))

    # -- everything else reads a dense copy ----------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        return func(*_densified(args), **_densified(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name.endswith("_"):
            raise AttributeError(f"Stacked is read-only: {name}() would write into a copy")
        return getattr(self.dense(), name)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        out = self.dense().numpy()
        return out if dtype is None else out.astype(dtype)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the torch ops inside on the calling thread only (intra-op threads restored after).

    Server-side aggregation is thousands of small, memory-bound ops per round at LLM
    shapes (weighted sums, thin QRs of d x r factors, block copies). On a server whose few
    cores are shared, every multi-threaded op is an OpenMP fork/join that waits for a
    descheduled worker: bench/aggregation.py measured FedAvg's round over 28 Llama-7B
    modules at 3.5-7 s on two threads under load and 0.05 s on one. A second thread adds no
    memory bandwidth to such ops. Copies and elementwise ops give the same bits on any
    thread count (factorizations agree to float tolerance). The setting is process-wide:
    torch ops on another Python thread meanwhile also run on one thread.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _densified(x: Any) -> Any:
    """``x`` with every Stacked (also inside lists, tuples and dicts) made dense."""
    if isinstance(x, Stacked):
        return x.dense()
    if isinstance(x, (list, tuple)):
        return type(x)(_densified(v) for v in x)
    if isinstance(x, dict):
        return {k: _densified(v) for k, v in x.items()}
    return x


def _forward(name: str) -> Any:
    def op(self: Stacked, *args: Any) -> Any:
        return getattr(self.dense(), name)(*_densified(args))

    op.__name__ = name
    return op


# Operators are looked up on the type, not through __getattr__.
for _name in ("__matmul__", "__rmatmul__", "__mul__", "__rmul__", "__add__", "__radd__",
              "__sub__", "__rsub__", "__truediv__", "__rtruediv__", "__neg__", "__pos__",
              "__abs__", "__getitem__", "__iter__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(Stacked, _name, _forward(_name))
del _name


def dense(t: torch.Tensor | Stacked) -> torch.Tensor:
    """``t`` as a tensor (a Stacked written out; a tensor as it is)."""
    return t.dense() if isinstance(t, Stacked) else t
