"""A running ComfyUI seen from the standard library: JSON over HTTP and the /ws event stream.

Nothing here imports more than Python itself ships, so the command that runs a workflow
installs nothing (no torch, no websocket package).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import urllib.error
import urllib.parse
import urllib.request


class ServerError(Exception):
    """ComfyUI answered with an HTTP error; `body` is its decoded JSON (or text)."""

    def __init__(self, status: int, url: str, body):
        super().__init__(f"ComfyUI answered {status} for {url}")
        self.status, self.url, self.body = status, url, body


def request(url: str, body: dict | None = None, timeout: float = 30):
    """GET (or POST `body` as JSON) and decode the JSON answer; ServerError on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 (the user's own server URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = text
        raise ServerError(error.code, url, answer) from None


class EventStream:
    """ComfyUI's /ws websocket, read-only: yields its JSON events (binary preview frames are skipped).

    A minimal RFC 6455 client: the handshake, unmasked server frames (text, binary, continuation,
    ping, close), masked pong replies. `timeout` bounds each wait for a frame (None: wait forever).
    """

    def __init__(self, base_url: str, client_id: str, timeout: float | None = None):
        parts = urllib.parse.urlsplit(base_url)
        secure = parts.scheme == "https"
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
        sock = socket.create_connection((host, port), timeout=30)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        path = f"{parts.path.rstrip('/')}/ws?clientId={urllib.parse.quote(client_id)}"
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self._buffer = b""
        self._sock = sock
        head = self._read_until(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"the server did not open a websocket: {status.decode(errors='replace')}")
        sock.settimeout(timeout)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the websocket")
            self._buffer += chunk
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._sock.recv(max(65536, size - len(self._buffer)))
            if not chunk:
                raise ConnectionError("the server closed the websocket")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack(">H", self._read(2))[0]
        elif size == 127:
            size = struct.unpack(">Q", self._read(8))[0]
        mask = self._read(4) if second & 0x80 else None
        payload = self._read(size)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        size = len(payload)
        if size < 126:
            header += bytes([0x80 | size])
        elif size < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", size)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", size)
        self._sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def events(self):
        """JSON events ({"type": ..., "data": ...}) until the server closes the connection."""
        message, kind = b"", None
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x8:  # close
                return
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if opcode in (0x1, 0x2):
                message, kind = payload, opcode
            elif opcode == 0x0:
                message += payload
            else:
                continue
            if fin:
                if kind == 0x1:
                    yield json.loads(message)
                message, kind = b"", None

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        self._sock.close()
