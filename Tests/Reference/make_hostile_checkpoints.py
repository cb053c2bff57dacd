"""Writes Tests/Fixtures/official/hostile/: small torch.save-shaped zips built byte by byte (no PyTorch) that attack
a checkpoint reader rather than a model: integer overflow in bounds checks, zero-stride views claiming huge tensors,
nesting deep enough to overflow a recursive release, memo-driven amplification, and a ZIP64 record offset at the
top of the integer range. `phatgoose import-official` must refuse each with exit 1, quickly and in little memory.

    python3 Tests/Reference/make_hostile_checkpoints.py
"""
import pathlib
import struct
import zipfile

OUT = pathlib.Path(__file__).resolve().parents[1] / "Fixtures" / "official" / "hostile"
PROTO = b"\x80\x02"


def text(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def name(module, attribute):
    return b"c" + module.encode() + b"\n" + attribute.encode() + b"\n"


def integer(v):
    return b"K" + bytes([v]) if 0 <= v < 256 else b"\x8a\x08" + struct.pack("<q", v)


def tuple_of(items):
    return b"(" + b"".join(items) + b"t"


def tensor(key, storage_type, count, offset, shape, stride):
    storage = tuple_of([text("storage"), name("torch", storage_type), text(key), text("cpu"), integer(count)]) + b"Q"
    arguments = tuple_of([storage, integer(offset), tuple_of([integer(s) for s in shape]),
                          tuple_of([integer(s) for s in stride]), b"\x89", name("collections", "OrderedDict") + b")R"])
    return name("torch._utils", "_rebuild_tensor_v2") + arguments + b"R"


def state_dict(pairs):
    return PROTO + name("collections", "OrderedDict") + b")R(" + b"".join(text(k) + v for k, v in pairs) + b"u."


def archive(path, pickle, storages=None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr("archive/data/" + key, data)


def expert(shape1, shape2, shape_embedding):
    """One expert whose three tensors are stride-0 views of a one-element storage."""
    zeros = lambda shape: [0] * len(shape)
    return [("m._addons.expert_lora.layer1__0", tensor("0", "FloatStorage", 1, 0, shape1, zeros(shape1))),
            ("m._addons.expert_lora.layer2__0", tensor("0", "FloatStorage", 1, 0, shape2, zeros(shape2))),
            ("m._addons.router.expert_embeddings__0", tensor("0", "FloatStorage", 1, 0, shape_embedding, zeros(shape_embedding)))]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    archive(OUT / "deep_nesting.pt", PROTO + b"N" + b"\x85" * 50000 + b".")
    # The same depth as the value of a key of a valid state dict: read without error, then let go of.
    archive(OUT / "deep_value.pt", PROTO + name("collections", "OrderedDict") + b")R(" + text("a") + b"N" + b"\x85" * 50000 + b"u.")
    archive(OUT / "offset_overflow.pt", state_dict([("a", tensor("0", "FloatStorage", 4, 2**63 - 1, [2], [1]))]), {"0": b"\0" * 16})
    archive(OUT / "count_overflow.pt", state_dict([("a", tensor("0", "DoubleStorage", 2**62, 0, [0], [1]))]), {"0": b"\0" * 16})
    archive(OUT / "zero_stride_huge.pt", state_dict(expert([2**20, 2**14], [2**14, 2**20], [2**20])), {"0": b"\0" * 4})
    archive(OUT / "zero_stride_overflow.pt", state_dict(expert([2**31, 2**30], [2**30, 4], [2**31])), {"0": b"\0" * 4})
    # A list of 20,000 pairs in the memo, then OrderedDict(that list) 2,000 times: 80 million items from 60 KB.
    pairs, calls = 20000, 2000
    pickle = (PROTO + text("k") + text("v") + b"\x86q\x000" + b"](" + b"h\x00" * pairs + b"eq\x010"
              + name("collections", "OrderedDict") + b"q\x020" + b"h\x02h\x01\x85R0" * calls + b"}.")
    archive(OUT / "amplify.pt", pickle)
    # A ZIP64 locator whose record offset is 2^63 - 1.
    archive(OUT / "base.pt", state_dict([]))
    data = (OUT / "base.pt").read_bytes()
    (OUT / "base.pt").unlink()
    end = data.rfind(b"PK\x05\x06")
    (OUT / "zip64_offset_max.pt").write_bytes(
        data[:end] + b"PK\x06\x07" + struct.pack("<IQI", 0, 2**63 - 1, 1)
        + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


if __name__ == "__main__":
    main()
