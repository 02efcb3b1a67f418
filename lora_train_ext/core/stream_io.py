"""Reading and writing big safetensors files one tensor at a time, for the file tools (merge,
extract, resize): peak memory stays near the largest tensor, not the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor:
dtype, shape, [begin, end) offsets into the data section; plus `__metadata__`, str -> str), then
the data section, each tensor's bytes little-endian and C-contiguous, back to back.

- `SafetensorsReader` parses the header and reads each tensor with ordinary file reads into a
  fresh buffer (no mmap: pages of a mapped file count in the process's resident set while the
  mapping lives; plain reads leave them in the page cache only). Read in file order (`keys()`),
  it also hashes every byte it reads, so the whole-file sha256 comes for free.
- `SafetensorsWriter` writes the header once every output name, dtype and shape is known, then
  each tensor's bytes in that order; `patch_metadata` rewrites a same-length header at the end
  (for a value, such as a hash, known only once the data is through).
- `CheckpointSource` opens a checkpoint: a .safetensors file through the reader, a pickled
  .ckpt / .pt (only when the caller allows it: unpickling runs code from the file) into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import torch

from .errors import UserError

# safetensors dtype names <-> torch dtypes (the ones torch 2.1 has)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

MAX_HEADER = 100_000_000
COPY_CHUNK = 16 << 20
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)


def read_header(f: BinaryIO, path: str, field: str) -> tuple[dict, int]:
    """(header dict, offset of the data section)."""
    head = f.read(8)
    if len(head) < 8:
        raise UserError(field, f"{path} is not a safetensors file (too short)")
    n = struct.unpack("<Q", head)[0]
    if n < 2 or n > MAX_HEADER:
        raise UserError(field, f"{path} is not a safetensors file (bad header size)")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(field, f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(field, f"{path} is not a safetensors file (header is not an object)")
    return header, 8 + n


class SafetensorsReader:
    """One safetensors file, read tensor by tensor. Use as a context manager."""

    def __init__(self, path: str, field: str = "file"):
        self.path = path
        self.field = field
        self._f = open(path, "rb")
        try:
            header, self.data_start = read_header(self._f, path, field)
            self._f.seek(0)
            self._hash = hashlib.sha256(self._f.read(self.data_start))
        except BaseException:
            self._f.close()
            raise
        self._pos = self.data_start  # where the running hash has reached
        self._hash_ok = True
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in
                                         (header.pop("__metadata__", None) or {}).items()}
        self.specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        size = os.path.getsize(path)
        for key, entry in header.items():
            try:
                dtype = ST_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise UserError(field, f"{path}: tensor {key!r} has a header entry this reader "
                                       f"does not understand ({entry!r:.80})") from None
            spec = TensorSpec(dtype, shape)
            if end - begin != spec.nbytes or self.data_start + end > size or begin < 0:
                raise UserError(field, f"{path} is truncated or corrupt (tensor {key!r})")
            self.specs[key] = spec
            self._offsets[key] = (begin, end)
        self._order = sorted(self.specs, key=lambda k: self._offsets[k][0])
        self.data_bytes = size - self.data_start

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def keys(self) -> list[str]:
        """Tensor names in file order (reading them in this order is sequential)."""
        return list(self._order)

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def _seek(self, begin: int) -> None:
        if self.data_start + begin != self._pos:
            self._hash_ok = False
        self._f.seek(self.data_start + begin)

    def _hashed(self, begin: int, data) -> None:
        if self._hash_ok and self.data_start + begin == self._pos:
            self._hash.update(data)
            self._pos += len(data)

    def read(self, key: str) -> torch.Tensor:
        """The tensor, in a buffer of its own (no view of the file)."""
        spec = self.specs[key]
        begin, end = self._offsets[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._seek(begin)
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = self._f.readinto(view[got:])
            if not n:
                raise UserError(self.field, f"{self.path} is truncated (tensor {key!r})")
            got += n
        self._hashed(begin, view)
        return buf.view(spec.dtype).reshape(spec.shape) if spec.shape else \
            buf.view(spec.dtype).reshape(())

    def iter_raw(self, key: str) -> Iterator[bytes]:
        """The tensor's bytes in chunks (copying a tensor unchanged)."""
        begin, end = self._offsets[key]
        self._seek(begin)
        pos = begin
        while pos < end:
            chunk = self._f.read(min(COPY_CHUNK, end - pos))
            if not chunk:
                raise UserError(self.field, f"{self.path} is truncated (tensor {key!r})")
            self._hashed(pos, chunk)
            pos += len(chunk)
            yield chunk

    def file_sha256(self) -> str:
        """sha256 of the whole file: free when every tensor was read in `keys()` order, else
        one more pass over the file."""
        if self._hash_ok:
            self._f.seek(self._pos)
            for chunk in iter(lambda: self._f.read(COPY_CHUNK), b""):
                self._hash.update(chunk)
                self._pos += len(chunk)
            return self._hash.hexdigest()
        return file_sha256(self.path)


def file_sha256(path: str) -> str:
    """sha256 of a whole file (the WebUI's checkpoint hash; its short hash is the first 10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class SafetensorsWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time."""

    def __init__(self, f: BinaryIO, specs: list[tuple[str, TensorSpec]],
                 metadata: dict[str, str] | None = None):
        self._f = f
        self._specs = list(specs)
        self._index = 0
        self._written = 0
        self._header = self._make_header(metadata or {})
        f.write(struct.pack("<Q", len(self._header)))
        f.write(self._header)
        self.data_bytes = sum(s.nbytes for _, s in self._specs)

    def _make_header(self, metadata: dict[str, str]) -> bytes:
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, spec in self._specs:
            if name in header or name == "__metadata__":
                raise ValueError(f"duplicate tensor name {name!r}")
            header[name] = {"dtype": TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        return raw + b" " * (-(8 + len(raw)) % 8)  # data section 8-byte aligned

    def _next(self, name: str) -> TensorSpec:
        if self._index >= len(self._specs):
            raise ValueError(f"{name!r}: every tensor is already written")
        expected, spec = self._specs[self._index]
        if name != expected:
            raise ValueError(f"tensor {name!r} written where {expected!r} belongs")
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._next(name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} given, the header "
                             f"says {spec.dtype} {spec.shape}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._f.write(memoryview(data.numpy()))
        self._written += spec.nbytes
        self._index += 1

    def write_raw(self, name: str, chunks) -> None:
        spec = self._next(name)
        n = 0
        for chunk in chunks:
            self._f.write(chunk)
            n += len(chunk)
        if n != spec.nbytes:
            raise ValueError(f"{name}: {n} bytes written, the header says {spec.nbytes}")
        self._written += n
        self._index += 1

    def finish(self) -> None:
        if self._index != len(self._specs):
            raise ValueError(f"{len(self._specs) - self._index} tensors were not written")
        self._f.flush()

    def patch_metadata(self, old: str, new: str) -> None:
        """Replace one same-length string in the written header (e.g. a hash placeholder)."""
        a, b = json.dumps(old)[1:-1].encode(), json.dumps(new)[1:-1].encode()
        if len(a) != len(b) or self._header.count(a) != 1:
            raise ValueError("the placeholder must occur once and keep its length")
        self._header = self._header.replace(a, b)
        pos = self._f.tell()
        self._f.seek(8)
        self._f.write(self._header)
        self._f.seek(pos)


class CheckpointSource:
    """A checkpoint's tensors by name: streamed from .safetensors, or a pickled .ckpt in memory.

    Interface: `keys()` (file order), `specs`, `read(key)`, `iter_raw(key)` (safetensors only:
    `raw` tells), `metadata`, `file_sha256()`, `close()`."""

    def __init__(self, path: str, field: str, allow_ckpt: bool = False):
        if not os.path.isfile(path):
            raise UserError(field, f"not found: {path}")
        self.path = path
        self.field = field
        self._reader: SafetensorsReader | None = None
        self._state: dict[str, torch.Tensor] | None = None
        if is_pickle_path(path):
            if not allow_ckpt:
                raise UserError(field, f"{os.path.basename(path)} is a pickled checkpoint; "
                                       "loading one runs code from the file. Convert it to "
                                       ".safetensors, or pass --allow-ckpt if you trust it")
            self._state = load_pickled_state(path, field)
            self.specs = {k: TensorSpec(t.dtype, tuple(t.shape)) for k, t in self._state.items()}
            self.metadata: dict[str, str] = {}
            self.raw = False
        else:
            self._reader = SafetensorsReader(path, field)
            self.specs = self._reader.specs
            self.metadata = self._reader.metadata
            self.raw = True

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._state = None

    def keys(self) -> list[str]:
        return self._reader.keys() if self._reader is not None else list(self._state)

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def read(self, key: str) -> torch.Tensor:
        if self._reader is not None:
            return self._reader.read(key)
        return self._state[key]

    def iter_raw(self, key: str) -> Iterator[bytes]:
        assert self._reader is not None
        return self._reader.iter_raw(key)

    def file_sha256(self) -> str:
        return self._reader.file_sha256() if self._reader is not None else file_sha256(self.path)


def is_pickle_path(path: str) -> bool:
    """A pickled checkpoint by its name (.ckpt, .pt, .pth, .bin) or by its first bytes (a zip
    or a pickle where a safetensors header should be)."""
    if path.lower().endswith(CKPT_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if head[:4] == b"PK\x03\x04":  # torch's zip format
        return True
    # a pickle's protocol opcode, and no plausible safetensors header length
    return len(head) == 8 and head[0] == 0x80 and 2 <= head[1] <= 5 and \
        struct.unpack("<Q", head)[0] > MAX_HEADER


def load_pickled_state(path: str, field: str) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint (the `state_dict` entry when there is one)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # old (non-zip) format: no mmap
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling raises many kinds
        raise UserError(field, f"{path} cannot be read as a checkpoint: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(field, f"{path} holds no state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(field, f"{path} holds no tensors")
    return state


def check_output_path(path: str, field: str = "--out", inputs: tuple[str, ...] = (),
                      suffix: str = ".safetensors") -> str:
    """Fail early (before any work) when `path` cannot be written: wrong suffix, an input file,
    a folder, or a parent that is a file or not writable. Returns the absolute path."""
    if not path:
        raise UserError(field, "give a file to write")
    if suffix and not path.lower().endswith(suffix):
        raise UserError(field, f"{path}: the output is a {suffix} file; name it *{suffix}")
    full = os.path.abspath(path)
    for other in inputs:
        if other and os.path.exists(other) and os.path.exists(full) and os.path.samefile(full, other):
            raise UserError(field, f"{path} is also an input; write to another file")
        if other and os.path.abspath(other) == full:
            raise UserError(field, f"{path} is also an input; write to another file")
    if os.path.isdir(full):
        raise UserError(field, f"{path} is a folder; give a file name")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise UserError(field, f"{path} cannot be written: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(field, f"{path} cannot be written: no write permission in {parent}")
    return full
