"""A small Objective-C bridge over libobjc with ctypes: classes, selectors, typed sends, Foundation objects.

Importing this module touches no library; :func:`runtime` loads libobjc and Foundation on first use and
raises :class:`~.machine.NeedsMacError` anywhere but macOS on Apple silicon.

Typed sends. On arm64 ``objc_msgSend`` must be called through a function pointer of the callee's exact
prototype (variadic calls pass arguments differently). :data:`SIGNATURES` gives, for every selector this
package sends, its return type and argument types; :meth:`ObjCRuntime.send` casts ``objc_msgSend`` to
``restype (*)(id, SEL, argtypes...)`` once per selector and calls that. A selector missing from the
table is a bug, reported as such, never a guess.

Memory. Convenience constructors (``stringWithUTF8String:``, ``dataWithBytes:length:``,
``arrayWithObjects:count:`` ...) return autoreleased objects: create them inside :meth:`ObjCRuntime.pool`
(``objc_autoreleasePoolPush``/``Pop``) and :meth:`ObjCRuntime.retain` whatever must outlive the pool,
releasing it later with :meth:`ObjCRuntime.release`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from ctypes import POINTER, c_bool, c_char_p, c_longlong, c_size_t, c_ssize_t, c_uint32, c_void_p
from typing import Any

from ...errors import AnetrainError

LIBOBJC = "/usr/lib/libobjc.A.dylib"
FOUNDATION = "/System/Library/Frameworks/Foundation.framework/Foundation"

ID = c_void_p  # id, Class: object pointers
SEL = c_void_p
BOOL = c_bool  # BOOL is C bool on arm64
NSUInteger = c_size_t
NSInteger = c_ssize_t
QOS = c_uint32  # the "unsigned int" QoS argument of the ANE methods
ERROR_OUT = POINTER(c_void_p)  # NSError **

#: selector -> (return type, argument types after the receiver and the selector)
SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    # memory management and introspection
    "retain": (ID, ()),
    "release": (None, ()),
    "description": (ID, ()),
    # NSString / NSData / NSNumber / NSArray / NSDictionary / NSError
    "stringWithUTF8String:": (ID, (c_char_p,)),
    "UTF8String": (c_char_p, ()),
    "dataWithBytes:length:": (ID, (c_void_p, NSUInteger)),
    "numberWithLongLong:": (ID, (c_longlong,)),
    "arrayWithObjects:count:": (ID, (POINTER(ID), NSUInteger)),
    "dictionaryWithObjects:forKeys:count:": (ID, (POINTER(ID), POINTER(ID), NSUInteger)),
    "code": (NSInteger, ()),
    # AppleNeuralEngine.framework (private; docs/ane.md appendix A.1)
    "modelWithMILText:weights:optionsPlist:": (ID, (ID, ID, ID)),
    "inMemoryModelWithDescriptor:": (ID, (ID,)),
    "hexStringIdentifier": (ID, ()),
    "compileWithQoS:options:error:": (BOOL, (QOS, ID, ERROR_OUT)),
    "loadWithQoS:options:error:": (BOOL, (QOS, ID, ERROR_OUT)),
    "evaluateWithQoS:options:request:error:": (BOOL, (QOS, ID, ID, ERROR_OUT)),
    "unloadWithQoS:error:": (BOOL, (QOS, ERROR_OUT)),
    "objectWithIOSurface:": (ID, (c_void_p,)),
    "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:": (
        ID,
        (ID, ID, ID, ID, ID, ID, ID),
    ),
}


def prototype(selector: str) -> Any:
    """The ctypes function type ``restype (*)(id, SEL, args...)`` for sending ``selector``."""
    try:
        restype, argtypes = SIGNATURES[selector]
    except KeyError:
        raise AnetrainError(
            f"internal error: no C signature is declared for the selector {selector!r}"
        ) from None
    return ctypes.CFUNCTYPE(restype, ID, SEL, *argtypes)


def load_library(path: str, what: str) -> ctypes.CDLL:
    """dlopen a framework or library by its full path (system frameworks live in the dyld shared cache)."""
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        raise AnetrainError(f"cannot load {what} ({path}): {e}") from None


class ObjCRuntime:
    """libobjc and Foundation, loaded: classes, selectors, typed message sends and Foundation values."""

    def __init__(self) -> None:
        self.lib = load_library(LIBOBJC, "the Objective-C runtime")
        self.foundation = load_library(FOUNDATION, "Foundation")
        lib = self.lib
        lib.objc_getClass.restype, lib.objc_getClass.argtypes = ID, [c_char_p]
        lib.sel_registerName.restype, lib.sel_registerName.argtypes = SEL, [c_char_p]
        lib.class_getClassMethod.restype, lib.class_getClassMethod.argtypes = c_void_p, [ID, SEL]
        lib.class_getInstanceMethod.restype, lib.class_getInstanceMethod.argtypes = c_void_p, [ID, SEL]
        lib.objc_autoreleasePoolPush.restype, lib.objc_autoreleasePoolPush.argtypes = c_void_p, []
        lib.objc_autoreleasePoolPop.restype, lib.objc_autoreleasePoolPop.argtypes = None, [c_void_p]
        self.foundation.NSTemporaryDirectory.restype = ID
        self.foundation.NSTemporaryDirectory.argtypes = []
        self._msg_send = ctypes.cast(lib.objc_msgSend, c_void_p).value
        self._sels: dict[str, int] = {}
        self._fns: dict[str, Any] = {}

    # ---- classes and selectors -------------------------------------------------------------------
    def load_framework(self, path: str, what: str) -> ctypes.CDLL:
        """dlopen a framework so its classes register with the runtime."""
        return load_library(path, what)

    def cls(self, name: str) -> int:
        """The class object named ``name``, or 0 when no loaded image defines it."""
        return self.lib.objc_getClass(name.encode()) or 0

    def require_class(self, name: str, where: str) -> int:
        c = self.cls(name)
        if not c:
            raise AnetrainError(f"the Objective-C class {name} is missing from {where} on this macOS version")
        return c

    def sel(self, name: str) -> int:
        if name not in self._sels:
            self._sels[name] = self.lib.sel_registerName(name.encode())
        return self._sels[name]

    def responds(self, cls: int, selector: str, class_method: bool) -> bool:
        """Whether ``cls`` implements ``selector`` (a class method, or an instance method of its objects)."""
        get = self.lib.class_getClassMethod if class_method else self.lib.class_getInstanceMethod
        return bool(get(cls, self.sel(selector)))

    def send(self, receiver: int | None, selector: str, *args: Any) -> Any:
        """``[receiver selector:args...]`` through ``objc_msgSend`` cast to the selector's prototype."""
        fn = self._fns.get(selector)
        if fn is None:
            fn = self._fns[selector] = prototype(selector)(self._msg_send)
        return fn(receiver, self.sel(selector), *args)

    # ---- memory ----------------------------------------------------------------------------------
    @contextmanager
    def pool(self) -> Iterator[None]:
        """An autorelease pool around a block (a Python process has none of its own)."""
        token = self.lib.objc_autoreleasePoolPush()
        try:
            yield
        finally:
            self.lib.objc_autoreleasePoolPop(token)

    def retain(self, obj: int | None) -> int:
        if obj:
            self.send(obj, "retain")
        return obj or 0

    def release(self, obj: int | None) -> None:
        if obj:
            self.send(obj, "release")

    # ---- Foundation values (autoreleased: call inside pool()) ------------------------------------
    def nsstring(self, text: str) -> int:
        return self.send(self.require_class("NSString", "Foundation"), "stringWithUTF8String:", text.encode())

    def string(self, obj: int | None) -> str | None:
        """A Python str from an NSString (None for nil)."""
        if not obj:
            return None
        raw = self.send(obj, "UTF8String")
        return raw.decode("utf-8", "replace") if raw is not None else None

    def nsdata(self, data: bytes) -> int:
        """An NSData holding a copy of ``data``."""
        return self.send(self.require_class("NSData", "Foundation"), "dataWithBytes:length:", data, len(data))

    def nsnumber(self, value: int) -> int:
        return self.send(self.require_class("NSNumber", "Foundation"), "numberWithLongLong:", int(value))

    def nsarray(self, items: Sequence[int]) -> int:
        arr = (ID * len(items))(*items)
        return self.send(
            self.require_class("NSArray", "Foundation"), "arrayWithObjects:count:", arr, len(items)
        )

    def nsdict(self, mapping: Mapping[str | int, int]) -> int:
        """An NSDictionary; str keys become NSStrings, int keys are taken as objects (e.g. CFStringRefs)."""
        keys = [self.nsstring(k) if isinstance(k, str) else k for k in mapping]
        values = list(mapping.values())
        n = len(keys)
        return self.send(
            self.require_class("NSDictionary", "Foundation"),
            "dictionaryWithObjects:forKeys:count:",
            (ID * n)(*values),
            (ID * n)(*keys),
            n,
        )

    def error_text(self, err: int | None) -> tuple[int | None, str]:
        """(code, description) of an NSError (``(None, "no error object")`` for nil)."""
        if not err:
            return None, "no error object was returned"
        return int(self.send(err, "code")), self.string(self.send(err, "description")) or "?"

    def temporary_directory(self) -> str:
        """``NSTemporaryDirectory()``: where the ANE compiler expects each model's files."""
        with self.pool():
            return self.string(self.foundation.NSTemporaryDirectory()) or "/tmp"


@functools.cache
def runtime() -> ObjCRuntime:
    """The process's Objective-C runtime bridge (loaded once); macOS on Apple silicon only."""
    from ..machine import require_apple_silicon

    require_apple_silicon("the Objective-C bridge to the Neural Engine")
    return ObjCRuntime()
