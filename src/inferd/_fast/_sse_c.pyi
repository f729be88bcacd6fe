"""Type stub for the compiled SSE core (same API as ``_sse_py``)."""

from inferd._fast._stream_common import DEFAULT_MAX_EVENT_BYTES as DEFAULT_MAX_EVENT_BYTES
from inferd._fast._stream_common import SSEError as SSEError
from inferd._fast._stream_common import SSEEvent as SSEEvent

IMPLEMENTATION: str

class SSEParser:
    def __init__(self, max_event_bytes: int = ...) -> None: ...
    @property
    def last_event_id(self) -> str: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[SSEEvent]: ...
    def close(self) -> list[SSEEvent]: ...
