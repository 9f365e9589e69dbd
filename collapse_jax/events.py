"""TensorBoard event files without TensorFlow: the few `Event` protobuf messages the tracker writes (tracking.py),
encoded by hand, in TFRecord framing.

Why by hand: tensorboardX's package imports torch where it is installed (seconds at every start) and its writer
runs its own queue and thread; what a run logs is three message shapes. Field numbers are tensorboard's
(tensorboard/compat/proto: event.proto, summary.proto, tensor.proto, tensor_shape.proto); tests decode these
bytes with tensorboardX's generated protobuf classes and check the framing's CRCs with another CRC32C.

TFRecord: each record is len (uint64 LE), masked CRC32C of those 8 bytes (uint32 LE), the data, masked CRC32C of
the data; mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32).
"""
import struct

FILE_VERSION = "brain.Event:2"  # TensorBoard reads SessionLog.START as a restart only in files of version >= 2
_START = 1  # SessionLog.SessionStatus.START
_DT_STRING = 7


def _crc_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord holding `data`."""
  n = struct.pack("<Q", len(data))
  return n + struct.pack("<I", _masked(n)) + data + struct.pack("<I", _masked(data))


# --- protobuf wire format --------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64s as protobuf writes them: ten bytes of two's complement
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _int(field: int, n: int) -> bytes:
  return _varint(field << 3) + _varint(n)


def _bytes(field: int, data: bytes | str) -> bytes:
  raw = data.encode("utf-8") if isinstance(data, str) else data
  return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _double(field: int, x: float) -> bytes:
  return _varint(field << 3 | 1) + struct.pack("<d", x)


def _float(field: int, x: float) -> bytes:
  return _varint(field << 3 | 5) + struct.pack("<f", x)


def scalar_value(tag: str, x: float) -> bytes:
  """Summary.Value{tag, simple_value}: TensorBoard's scalar (a float32)."""
  return _bytes(1, tag) + _float(2, x)


def text_value(tag: str, text: str) -> bytes:
  """Summary.Value for the text plugin: a 1-element DT_STRING tensor; tag as tensorboardX names it
  (TAG/text_summary)."""
  metadata = _bytes(1, _bytes(1, "text"))  # SummaryMetadata{plugin_data{plugin_name}}
  shape = _bytes(2, _int(1, 1))  # TensorShapeProto{dim{size: 1}}
  tensor = _int(1, _DT_STRING) + _bytes(2, shape) + _bytes(8, text)
  return _bytes(1, f"{tag}/text_summary") + _bytes(8, tensor) + _bytes(9, metadata)


def event(wall_time: float, step: int, values: list[bytes] = (), file_version: str = "",
          session_start: bool = False) -> bytes:
  """One serialized Event: a Summary of `values`, or a file version, or a SessionLog.START."""
  out = _double(1, wall_time) + _int(2, step)
  if file_version:
    out += _bytes(3, file_version)
  if values:
    out += _bytes(5, b"".join(_bytes(1, v) for v in values))
  if session_start:
    out += _bytes(7, _int(1, _START))
  return out
