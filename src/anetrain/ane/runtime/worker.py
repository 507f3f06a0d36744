"""The ANE worker process: ``python -m anetrain.ane.runtime.worker READ_FD WRITE_FD`` (:mod:`.supervisor`).

It owns one device and answers framed messages (:mod:`.ipc`) on the two pipe descriptors it inherits:

``hello``   ``{"backend": "private" | "sim", "options": {...}}``: make the device; answers its pid
``load``    a program (name, chip, tensors, shared-area path and layout; payload: MIL text then the weight
            blobs): compile and load it, map its shared area; answers the process's compile count
``run``     ``{"id": n}``: inputs from the shared area to the surfaces, evaluate, outputs back; answers
            the copy and evaluation times
``release`` ``{"id": n}``: unload a program
``quit``    answer, release everything, exit 0

Every answer has ``"ok"``; a failure answers ``{"ok": false, "error": "<one line>", "status": ...}`` and
the worker goes on. Its stdout and stderr go to the log file the supervisor gave it, so nothing but
frames ever reaches the pipe.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

from ...errors import AnetrainError
from ..surfaces import TensorSpec
from .device import ProgramSpec
from .ipc import Channel, IoArea, IoLayout, ProtocolError

SIM_OPTIONS = ("leak_limit", "crash_on", "hang_on", "strict_matmul")


def make_device(backend: str, options: dict[str, Any]) -> Any:
    """The device a worker drives: the Neural Engine (``private``) or the simulator (``sim``, for tests)."""
    if backend == "private":
        from .private import PrivateAneDevice

        return PrivateAneDevice()
    if backend == "sim":
        from .device import SimDevice

        unknown = set(options) - set(SIM_OPTIONS)
        if unknown:
            raise ProtocolError(f"unknown simulator device options {sorted(unknown)}")
        return SimDevice(**options)
    raise ProtocolError(f"unknown worker backend {backend!r} (known: private, sim)")


def _spec(msg: dict[str, Any], payload: bytes) -> ProgramSpec:
    """The program a ``load`` message describes (MIL text and blobs come from the payload)."""
    try:
        mil_len = int(msg["mil_bytes"])
        weights, off = {}, mil_len
        for path, n in msg["weights"]:
            weights[str(path)] = payload[off : off + int(n)]
            off += int(n)
        if off != len(payload):
            raise ProtocolError(f"load message payload is {len(payload)} bytes, its header says {off}")
        return ProgramSpec(
            name=str(msg["name"]),
            chip=str(msg["chip"]),
            mil_text=payload[:mil_len].decode("utf-8"),
            weights=weights,
            inputs=[TensorSpec(str(n), tuple(int(x) for x in s)) for n, s in msg["inputs"]],
            outputs=[TensorSpec(str(n), tuple(int(x) for x in s)) for n, s in msg["outputs"]],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"bad load message ({type(e).__name__}: {e})") from None


class Worker:
    """The message loop: programs by id, each with its loaded form and its shared tensor area."""

    def __init__(self, channel: Channel, device: Any) -> None:
        self.channel = channel
        self.device = device
        self.programs: dict[int, tuple[Any, IoArea]] = {}

    def handle(self, msg: dict[str, Any], payload: bytes) -> dict[str, Any]:
        op = msg.get("op")
        if op == "load":
            pid = int(msg["id"])
            if pid in self.programs:
                raise ProtocolError(f"program id {pid} is loaded already")
            spec = _spec(msg, payload)
            t0 = time.perf_counter()
            loaded = self.device.load(spec)
            try:
                area = IoArea(str(msg["io"]), IoLayout.from_json(msg["layout"]), create=False)
            except BaseException:
                loaded.release()
                raise
            self.programs[pid] = (loaded, area)
            return {"compiles": self.device.compiles, "ms": (time.perf_counter() - t0) * 1e3}
        if op == "run":
            loaded, area = self._get(msg)
            t0 = time.perf_counter()
            loaded.write(area.inputs)
            t1 = time.perf_counter()
            loaded.evaluate()
            t2 = time.perf_counter()
            for name, values in loaded.read().items():
                area.outputs[name][...] = values.reshape(area.outputs[name].shape)
            t3 = time.perf_counter()
            return {"io_ms": (t1 - t0 + t3 - t2) * 1e3, "eval_ms": (t2 - t1) * 1e3}
        if op == "release":
            loaded, area = self._get(msg)
            del self.programs[int(msg["id"])]
            loaded.release()
            area.close()
            return {}
        raise ProtocolError(f"unknown message {op!r}")

    def _get(self, msg: dict[str, Any]) -> tuple[Any, IoArea]:
        pid = int(msg.get("id", -1))
        if pid not in self.programs:
            raise ProtocolError(f"no program with id {pid} is loaded in this worker")
        return self.programs[pid]

    def serve(self) -> None:
        while True:
            try:
                msg, payload = self.channel.recv()
            except EOFError:
                return
            if msg.get("op") == "quit":
                self.channel.send({"ok": True})
                return
            try:
                reply = {"ok": True, **self.handle(msg, payload)}
            except AnetrainError as e:
                reply = {"ok": False, "error": str(e), "status": getattr(e, "status", None)}
            except Exception as e:  # a bug: answer it, log the traceback, keep serving
                traceback.print_exc()
                reply = {"ok": False, "error": f"internal error in the ANE worker: {type(e).__name__}: {e}"}
            self.channel.send(reply)

    def close(self) -> None:
        for loaded, area in self.programs.values():
            loaded.release()
            area.close()
        self.programs.clear()
        self.device.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m anetrain.ane.runtime.worker READ_FD WRITE_FD (started by anetrain)",
            file=sys.stderr,
        )
        return 2
    channel = Channel(int(args[0]), int(args[1]))
    try:
        hello, _ = channel.recv()
    except EOFError:
        return 0
    try:
        if hello.get("op") != "hello":
            raise ProtocolError(f"expected hello, got {hello.get('op')!r}")
        device = make_device(str(hello.get("backend")), dict(hello.get("options") or {}))
    except AnetrainError as e:
        channel.send({"ok": False, "error": str(e), "status": getattr(e, "status", None)})
        return 1
    channel.send({"ok": True, "pid": os.getpid(), "device": device.name})
    worker = Worker(channel, device)
    try:
        worker.serve()
    finally:
        worker.close()
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
