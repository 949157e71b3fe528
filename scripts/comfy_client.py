"""A running ComfyUI seen from the standard library: JSON over HTTP and the /ws event stream.

Nothing here imports more than Python itself ships, so the command that runs a workflow
installs nothing (no torch, no websocket package).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import time
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

    def poll(self, timeout: float) -> bool:
        """Whether data for the next event arrived within `timeout` seconds (then `events` reads it)."""
        if self._buffer or (hasattr(self._sock, "pending") and self._sock.pending()):
            return True
        readable, _, _ = select.select([self._sock], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        self._sock.close()


def request_bytes(url: str, timeout: float = 60) -> bytes:
    """GET raw bytes (e.g. an image from /view); ServerError on HTTP errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the user's own server URL)
            return response.read()
    except urllib.error.HTTPError as error:
        raise ServerError(error.code, url, error.read().decode(errors="replace")) from None


def upload_image(base_url: str, filename: str, data: bytes, subfolder: str = "", timeout: float = 60) -> dict:
    """POST an image to /upload/image (into the server's input folder, replacing a file of that name).

    Returns ComfyUI's answer {"name", "subfolder", "type"}; LoadImage then takes "subfolder/name".
    """
    boundary = "plora" + os.urandom(12).hex()
    fields = {"type": "input", "subfolder": subfolder, "overwrite": "true"}
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
                    for name, value in fields.items())
    body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base_url}/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 (the user's own server URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise ServerError(error.code, req.full_url, error.read().decode(errors="replace")) from None


def connection_lost(error: BaseException) -> bool:
    """True when `error` means the server is gone (refused, reset, closed, unreachable), not that it answered
    with an error or was slow (HTTP errors and timeouts are False)."""
    if isinstance(error, urllib.error.HTTPError):
        return False
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    if isinstance(error, TimeoutError):
        return False
    return isinstance(error, (ConnectionError, socket.gaierror)) or (
        isinstance(error, OSError) and error.errno is not None)


# ---------------------------------------------------------------------------- one prompt on one server


class ServerGone(ConnectionError):
    """The server stopped answering (connection refused, reset or closed)."""


class PromptRefused(Exception):
    """/prompt refused the graph (HTTP 400 with node_errors, or node_errors on an accepted prompt)."""

    def __init__(self, status: int, body):
        super().__init__(f"ComfyUI refused the prompt ({status})")
        self.status, self.body = status, body


class PromptFailed(Exception):
    """The prompt ran and failed: `data` is the execution_error (or execution_interrupted) message."""

    def __init__(self, data: dict):
        super().__init__(data.get("exception_message", "the prompt failed"))
        self.data = data


class PromptTimeout(Exception):
    """No result in the time given; the prompt was taken off the server's queue or interrupted."""


def post_quietly(url: str, body: dict) -> None:
    """POST to routes that answer with an empty body (/queue, /interrupt); a failure is ignored."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10):  # noqa: S310 (the user's own server URL)
            pass
    except OSError:
        pass


class Comfy:
    """One running ComfyUI: queue an API-format prompt and follow it to its history entry, upload and download
    images. A lost connection raises ServerGone wherever it happens.

    While a prompt runs, its events come from /ws (`on_event` sees each of them); /history is asked when the
    prompt ends and every `heartbeat` seconds, so a server that dies or forgets the prompt is noticed even
    when the websocket is silent or lost.
    """

    def __init__(self, url: str, heartbeat: float = 5.0):
        self.url = url.rstrip("/")
        self.heartbeat = heartbeat
        self.uploaded: dict[str, str] = {}  # sha256 of an image -> the name LoadImage takes

    def call(self, function, *args, **kwargs):
        """function(*args, **kwargs), with a lost connection turned into ServerGone."""
        try:
            return function(*args, **kwargs)
        except ServerError:
            raise
        except OSError as error:
            if connection_lost(error):
                raise ServerGone(f"{self.url} stopped answering ({error})") from None
            raise

    def get(self, path: str, timeout: float = 30):
        return self.call(request, f"{self.url}{path}", timeout=timeout)

    def upload(self, data: bytes, subfolder: str) -> str:
        """An image into the server's input folder (once per content); returns the name LoadImage takes."""
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self.uploaded:
            answer = self.call(upload_image, self.url, f"{sha[:24]}.png", data, subfolder, timeout=120)
            self.uploaded[sha] = "/".join(p for p in (answer.get("subfolder"), answer["name"]) if p)
        return self.uploaded[sha]

    def download(self, image: dict) -> bytes:
        """The bytes of an image a node returned ({"filename", "subfolder", "type"}), from /view."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.call(request_bytes, f"{self.url}/view?{query}")

    def run(self, prompt: dict, timeout: float | None = None, on_event=None) -> dict:
        """Queue `prompt`, wait for it and return its history entry.

        PromptRefused, PromptFailed, PromptTimeout or ServerGone otherwise.
        """
        client_id = os.urandom(16).hex()
        try:
            stream = EventStream(self.url, client_id, timeout=120)
        except OSError:
            stream = None  # no websocket (a proxy?): /history alone tells when the prompt ends
        try:
            try:
                answer = self.call(request, f"{self.url}/prompt", {"prompt": prompt, "client_id": client_id})
            except ServerError as error:
                raise PromptRefused(error.status, error.body) from None
            prompt_id = answer["prompt_id"]
            if answer.get("node_errors"):  # outputs that do not depend on the refused nodes were queued
                post_quietly(f"{self.url}/queue", {"delete": [prompt_id]})
                raise PromptRefused(400, answer)
            entry = self._wait(prompt_id, stream, timeout, on_event)
        finally:
            if stream is not None:
                stream.close()
        status = entry.get("status", {})
        for kind, data in status.get("messages", []):
            if kind in ("execution_error", "execution_interrupted"):
                raise PromptFailed({"exception_type": "Interrupted", "exception_message": "interrupted on the server",
                                    **data})
        if status.get("status_str") not in (None, "success"):
            raise PromptFailed({"exception_message": f"status {status.get('status_str')}"})
        return entry

    def _wait(self, prompt_id: str, stream, timeout: float | None, on_event) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        events = stream.events() if stream is not None else None
        ended, next_check, pause = False, time.monotonic() + self.heartbeat, 0.0
        while True:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                post_quietly(f"{self.url}/queue", {"delete": [prompt_id]})
                post_quietly(f"{self.url}/interrupt", {"prompt_id": prompt_id})
                raise PromptTimeout(f"no result after {timeout:g} s; prompt {prompt_id} was cancelled there")
            if events is not None and not ended:
                try:
                    if stream.poll(max(0.0, min(next_check, deadline or next_check) - now)):
                        ended = self._event(next(events), prompt_id, on_event)
                        if not ended and time.monotonic() < next_check:
                            continue
                except (StopIteration, OSError, ValueError):
                    events = None  # the websocket is gone: ask /history (which tells whether the server is)
            else:
                time.sleep(min(pause, max(0.0, (deadline or now + pause) - now)))
            pause = 0.2 if ended else 1.0  # between /history polls: soon after the end, else once a second
            next_check = time.monotonic() + self.heartbeat
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if entry is None and events is None:
                queue = self.get("/queue")
                queued = [item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])]
                if prompt_id not in queued and not self.get(f"/history/{prompt_id}"):
                    raise PromptFailed({"exception_type": "Lost",
                                        "exception_message": f"the server forgot prompt {prompt_id} (restarted?)"})

    @staticmethod
    def _event(event: dict, prompt_id: str, on_event) -> bool:
        """Pass our prompt's events on; True when one says the prompt has ended."""
        data = event.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            return False
        if on_event is not None:
            on_event(event)
        kind = event.get("type")
        return kind in ("execution_success", "execution_error", "execution_interrupted") or (
            kind == "executing" and data.get("node") is None)
