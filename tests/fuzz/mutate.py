"""The mutation engine: byte-level mutations plus structure-aware ones that keep containers valid
enough to reach the code behind them.

A raw bit flip in a zip archive mostly hits a CRC check; here a zip is opened, one member (usually
``data.pkl``) is mutated and the archive is written again (sometimes with another compression). A
safetensors file is split into its header, which is mutated as JSON (and, for visualad files, the
JSON document inside ``__metadata__``), and its data. Pickles get their integer arguments replaced by
boundary values. Every mutation is driven by one ``random.Random``, so a campaign is reproducible
from its seed.
"""
from __future__ import annotations

import functools
import io
import json
import pickletools
import random
import struct
import zipfile

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 255, 256, 1023, 1024, 1025, 4096, 8192, 16384, 16385, 65535,
                    65536, 2 ** 24, 2 ** 27, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 16, 2 ** 32 + 96,
                    2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 31, -2 ** 63, 10 ** 30]
INTERESTING_JSON = INTERESTING_INTS + [0.5, 1.7, 128.9, -0.0, 1e308, -1e308, float("nan"), float("inf"), "",
                                       "96", "x" * 300, None, True, False, [], {}, [1.5], {"a": 1}]


@functools.lru_cache(maxsize=512)
def _int_opcodes(data: bytes) -> tuple:
    """(opcode, position) of the integer-carrying opcodes of a pickle (empty if it does not parse)."""
    try:
        return tuple((op, pos) for op, _, pos in pickletools.genops(data)
                     if op.name in ("BININT", "BININT1", "BININT2", "LONG1", "BINPUT", "LONG_BINPUT", "BINGET",
                                    "LONG_BINGET"))
    except Exception:
        return ()


@functools.lru_cache(maxsize=512)
def _zip_members(data: bytes) -> tuple:
    """((ZipInfo, content), ...) of a zip archive (empty if it does not open)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return tuple((info, zf.read(info)) for info in zf.infolist())
    except Exception:
        return ()


class Mutator:
    """Mutations of bytes, JSON, zip archives, safetensors files and pickles."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self._depth = 50

    # ------------------------------------------------------------------ bytes
    def _int_bytes(self) -> bytes:
        value = self.rng.choice(INTERESTING_INTS)
        width = self.rng.choice((1, 2, 4, 8))
        order = self.rng.choice("<>")
        return (value % (1 << (8 * width))).to_bytes(width, "little" if order == "<" else "big")

    def bytes(self, data: bytes, pool: list[bytes] | None = None, ops: int | None = None) -> bytes:
        """1-8 random byte-level edits (flip, set, boundary ints, insert, delete, duplicate, splice)."""
        buf = bytearray(data)
        for _ in range(ops or self.rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
            n = len(buf)
            kind = self.rng.randrange(10)
            pos = self.rng.randrange(n) if n else 0
            if kind == 0 and n:
                buf[pos] ^= 1 << self.rng.randrange(8)
            elif kind == 1 and n:
                buf[pos] = self.rng.choice((0, 1, 0x7F, 0x80, 0xFF, self.rng.randrange(256)))
            elif kind in (2, 3):
                chunk = self._int_bytes()
                buf[pos:pos + len(chunk)] = chunk
            elif kind == 4:
                buf[pos:pos] = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 16)))
            elif kind == 5 and n:
                del buf[pos:pos + self.rng.randint(1, max(1, min(64, n - pos)))]
            elif kind == 6 and n:
                end = min(n, pos + self.rng.randint(1, 256))
                buf[pos:pos] = buf[pos:end] * self.rng.choice((1, 2, 16))
            elif kind == 7 and n:
                del buf[self.rng.randrange(n):]
            elif kind == 8 and pool:
                other = self.rng.choice(pool)
                if other:
                    start = self.rng.randrange(len(other))
                    buf[pos:pos + self.rng.randint(1, 64)] = other[start:start + self.rng.randint(1, 256)]
            elif n:
                src = self.rng.randrange(n)
                length = self.rng.randint(1, 32)
                buf[pos:pos + length] = buf[src:src + length]
        return bytes(buf)

    # ------------------------------------------------------------------ JSON
    def _deep(self) -> object:
        """A marker that json_text replaces by arrays nested 50, 1000 or 100,000 deep."""
        self._depth = self.rng.choice((50, 1000, 100_000))
        return "DEEP"

    def json_value(self, value):
        """``value`` (a parsed JSON document) with one node replaced, removed or duplicated."""
        nodes = []
        stack = [(None, None, value)]
        while stack and len(nodes) < 5000:
            parent, key, node = stack.pop()
            nodes.append((parent, key, node))
            if isinstance(node, dict):
                stack.extend((node, k, v) for k, v in node.items())
            elif isinstance(node, list):
                stack.extend((node, i, v) for i, v in enumerate(node))
        parent, key, node = self.rng.choice(nodes)
        kind = self.rng.randrange(6)
        if parent is None:
            return self.rng.choice(INTERESTING_JSON) if kind == 0 else value
        if kind == 0 and isinstance(parent, dict):
            del parent[key]
        elif kind == 1 and isinstance(node, (int, float)) and not isinstance(node, bool):
            parent[key] = self.rng.choice((node * 2, node + 1, node - 1, -node, node * 4096, float(node) + 0.5))
        elif kind == 2:
            parent[key] = self._deep()
        elif kind == 3 and isinstance(parent, dict):
            parent[key + "_" if isinstance(key, str) else key] = node
        else:
            parent[key] = self.rng.choice(INTERESTING_JSON)
        return value

    def json_text(self, text: bytes) -> bytes:
        """Mutated JSON text: a structural mutation of the parsed document, sometimes bytes on top."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return self.bytes(text)
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            doc = self.json_value(doc)
        try:
            out = json.dumps(doc, separators=(",", ":"))
        except (ValueError, RecursionError):  # a node duplicated into its own subtree
            return self.bytes(text)
        if '"DEEP"' in out:
            out = out.replace('"DEEP"', "[" * self._depth + "]" * self._depth, 1)
        out = out.encode()
        return self.bytes(out) if self.rng.random() < 0.15 else out

    # ------------------------------------------------------------------ safetensors
    def safetensors(self, data: bytes, nested_key: str | None = None) -> bytes:
        """Header JSON mutated (the length prefix usually fixed up); ``nested_key`` names a
        ``__metadata__`` entry that is itself JSON (visualad files) and is mutated as such."""
        if len(data) < 8 or self.rng.random() < 0.1:
            return self.bytes(data)
        n = struct.unpack("<Q", data[:8])[0]
        header, rest = data[8:8 + n], data[8 + n:]
        try:
            doc = json.loads(header)
        except (ValueError, RecursionError):
            return self.bytes(data)
        meta = doc.get("__metadata__") if isinstance(doc, dict) else None
        if (nested_key and isinstance(meta, dict) and isinstance(meta.get(nested_key), str)
                and self.rng.random() < 0.7):
            meta[nested_key] = self.json_text(meta[nested_key].encode()).decode("utf-8", "replace")
            new_header = json.dumps(doc, separators=(",", ":")).encode()
        else:
            new_header = self.json_text(header)
        if self.rng.random() < 0.2:
            rest = self.bytes(rest)
        prefix = struct.pack("<Q", len(new_header)) if self.rng.random() < 0.9 else self._int_bytes().ljust(8, b"\0")[:8]
        return prefix + new_header + rest

    # ------------------------------------------------------------------ pickles
    def pickle(self, data: bytes) -> bytes:
        """Integer arguments of the pickle's opcodes replaced by boundary values (then, sometimes,
        byte mutations); falls back to byte mutations for what pickletools cannot parse."""
        ints = _int_opcodes(data)
        if not ints or self.rng.random() < 0.3:
            return self.bytes(data)
        buf = bytearray(data)
        for _ in range(self.rng.choice((1, 1, 2))):
            op, pos = self.rng.choice(ints)
            value = self.rng.choice(INTERESTING_INTS)
            if op.name in ("BININT1", "BINPUT", "BINGET"):
                buf[pos + 1:pos + 2] = bytes([value % 256])
            elif op.name == "BININT2":
                buf[pos + 1:pos + 3] = (value % 65536).to_bytes(2, "little")
            elif op.name in ("BININT", "LONG_BINPUT", "LONG_BINGET"):
                buf[pos + 1:pos + 5] = (value % (1 << 32)).to_bytes(4, "little")
            else:  # LONG1: replace the whole argument
                size = buf[pos + 1]
                enc = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "little", signed=True)
                buf[pos + 1:pos + 2 + size] = bytes([len(enc)]) + enc
        out = bytes(buf)
        return self.bytes(out) if self.rng.random() < 0.2 else out

    # ------------------------------------------------------------------ ONNX
    def onnx(self, data: bytes) -> bytes:
        """One field of the parsed ModelProto changed (an initializer's dims or bytes, a node's op,
        input, output or integer attribute, a node removed), re-serialised; bytes if it does not parse."""
        import onnx
        try:
            model = onnx.ModelProto.FromString(data)
        except Exception:
            return self.bytes(data)
        graph = model.graph
        kind = self.rng.randrange(6)
        if kind == 0 and graph.initializer:
            t = self.rng.choice(graph.initializer)
            if t.dims:
                t.dims[self.rng.randrange(len(t.dims))] = self.rng.choice(INTERESTING_INTS) % (1 << 62)
            else:
                t.dims.append(self.rng.choice((0, 1, 2 ** 31)))
        elif kind == 1 and graph.initializer:
            t = self.rng.choice(graph.initializer)
            t.raw_data = self.bytes(t.raw_data)
        elif kind == 2 and graph.node:
            node = self.rng.choice(graph.node)
            node.op_type = self.rng.choice(("Add", "MatMul", "Gemm", "Resize", "Concat", "Reshape", "Softmax",
                                            "LayerNormalization", "Conv", "Identity", "Bogus"))
        elif kind == 3 and graph.node:
            node = self.rng.choice(graph.node)
            names = [n for other in graph.node for n in other.output] + [i.name for i in graph.initializer]
            slots = node.input if node.input and self.rng.random() < 0.7 else node.output
            if slots and names:
                slots[self.rng.randrange(len(slots))] = self.rng.choice(names)
        elif kind == 4 and graph.node:
            del graph.node[self.rng.randrange(len(graph.node))]
        elif graph.node:
            attrs = [a for n in graph.node for a in n.attribute if a.type in (a.INT, a.INTS)]
            if attrs:
                a = self.rng.choice(attrs)
                if a.type == a.INT:
                    a.i = self.rng.choice(INTERESTING_INTS) % (1 << 63)
                elif a.ints:
                    a.ints[self.rng.randrange(len(a.ints))] = self.rng.choice(INTERESTING_INTS) % (1 << 63)
        try:
            return model.SerializeToString()
        except Exception:
            return self.bytes(data)

    # ------------------------------------------------------------------ zip
    def zip(self, data: bytes) -> bytes:
        """One member mutated (data.pkl most often) and the archive rewritten, sometimes compressed."""
        members = _zip_members(data)
        if not members or self.rng.random() < 0.1:
            return self.bytes(data)
        members = list(members)
        pkl = [i for i, (info, _) in enumerate(members) if info.filename.endswith("data.pkl")]
        index = self.rng.choice(pkl) if pkl and self.rng.random() < 0.7 else self.rng.randrange(len(members))
        info, content = members[index]
        if info.filename.endswith(".pkl"):
            content = self.pickle(content)
        elif self.rng.random() < 0.2:
            content = b""
        else:
            content = self.bytes(content)
        members[index] = (info, content)
        if self.rng.random() < 0.05:
            members.append((zipfile.ZipInfo(info.filename.rsplit("/", 1)[0] + "/byteorder"),
                            self.rng.choice((b"big", b"little", b"middle", b"\0" * 100_000))))
        out = io.BytesIO()
        compressions = (zipfile.ZIP_STORED,) * 6 + (zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
        with zipfile.ZipFile(out, "w") as zw:
            for i, (member, body) in enumerate(members):
                kind = self.rng.choice(compressions) if i == index else zipfile.ZIP_STORED
                try:
                    zw.writestr(zipfile.ZipInfo(member.filename, member.date_time), body, compress_type=kind)
                except Exception:  # duplicate names after mutation, ...
                    continue
        data = out.getvalue()
        return self.bytes(data, ops=1) if self.rng.random() < 0.1 else data
