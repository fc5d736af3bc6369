"""The .dqz file's fixed prefix and format identity: the one part both the reader/writer
(`fileformat`) and the size accounting (`sizes`) need, kept below both."""
from __future__ import annotations

import struct

MAGIC = b"\x89DQZ\r\n\x1a\n"
# Version 2 = version 1 plus zlib-compressed tensors (`compression: "zlib"` records); a file
# with no compressed tensor is still written as version 1, byte for byte as before.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
COMPRESSION = "zlib"
FORMAT_NAME = "dq_jax.export"
_PREFIX = struct.Struct("<8sIQ32s")  # magic, version, header length, header sha256
PREFIX_SIZE = _PREFIX.size  # 52
