"""What the tunnel core takes as chunk payload: bytes, or bytes moved without being read."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Payload", "Piped"]


@dataclass(frozen=True, slots=True)
class Piped:
    """``size`` chunk payload bytes that the adapter moved into its pipe (``splice(2)``)
    instead of reading them: :meth:`.wsframes.FrameReader.skip` reports them, and whoever consumes
    them takes them from the pipe (see :mod:`.pipe`)."""

    size: int

    def __len__(self) -> int:
        return self.size


#: Chunk payload bytes as the tunnel core takes them: read, or moved through the pipe.
Payload = bytes | bytearray | memoryview | Piped
