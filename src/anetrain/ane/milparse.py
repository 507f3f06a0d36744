"""A parser for the MIL text subset anetrain emits, with line-numbered errors for anything else.

Accepted (both dialects)::

    program(1.3)                                              or program(1.0)
    [buildInfo = dict<...>({{"k", "v"}, ...})]
    {
        func main<ios18>(tensor<fp16, [1, 64, 1, 32]> x, ...) {
            <type> <name> = const()[name = <string>, val = <literal>];
            <type> <name> = <op>(<param> = <name>, <param> = (<name>, <name>), ...)[name = <string>];
        } -> (<name>, ...);
    }

where a type is ``tensor<dtype, [d0, d1, ...]>`` or a scalar type (``fp16`` short, ``tensor<fp16, []>``
verbose), and a literal is a scalar (``fp16(0.5)``, ``tensor<fp16, []>(0.5)``, ``string("x")``,
``bool(true)``), a tensor (``tensor<int32, [4]>([0, 1, 3, 2])``) or a blob reference
(``tensor<fp16, [...]>(BLOBFILE(path = string("@model_path/weights/m.bin"), offset = uint64(64)))``).
Numbers may be decimal, exponent or C99 hex-float (``0x1.8p-3``); ``//`` comments are skipped.

The parser checks syntax and names (every name defined once, before use); the simulator checks the
semantics (op support, shapes against the declared types).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AnetrainError

DTYPES = ("fp16", "fp32", "int32", "int64", "bool", "string", "uint64")

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+(?:\.[0-9a-fA-F]*)?[pP][-+]?\d+
                    |(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?
                    |inf\b|nan\b))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<arrow>->)
  | (?P<punct>[()\[\]{}<>,=;])
    """,
    re.VERBOSE,
)


class MilError(AnetrainError):
    """MIL text that this parser or the simulator cannot accept: the message names the line."""


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    line: int
    col: int


@dataclass(frozen=True)
class MilType:
    dtype: str
    shape: tuple[int, ...] | None  # None for a short-syntax scalar; () for tensor<dtype, []>

    @property
    def dims(self) -> tuple[int, ...]:
        return self.shape or ()


@dataclass(frozen=True)
class BlobRef:
    path: str
    offset: int


@dataclass(frozen=True)
class Literal:
    """A constant: ``value`` is a numpy array (0-d for scalars), a str, or a :class:`BlobRef`."""

    type: MilType
    value: Any
    verbose: bool  # written in the verbose scalar syntax (tensor<dtype, []>(v))


@dataclass(frozen=True)
class Statement:
    line: int
    name: str
    type: MilType
    op: str
    args: dict[str, str | tuple[str, ...]]
    attrs: dict[str, Literal]


@dataclass
class ParsedProgram:
    version: str
    opset: str
    inputs: list[tuple[str, MilType]]
    statements: list[Statement]
    outputs: list[str]
    scalar_syntax: set[str] = field(default_factory=set)  # {"short"}, {"verbose"} or both


def tokenize(text: str, source: str) -> list[Token]:
    tokens: list[Token] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise MilError(
                f"{source}: line {line} col {pos - line_start + 1}: unexpected character {text[pos]!r}"
            )
        kind = m.lastgroup or ""
        tok = m.group()
        if kind != "ws":
            tokens.append(Token(kind, tok, line, pos - line_start + 1))
        nl = tok.count("\n")
        if nl:
            line += nl
            line_start = pos + tok.rfind("\n") + 1
        pos = m.end()
    tokens.append(Token("eof", "", line, pos - line_start + 1))
    return tokens


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.toks = tokenize(text, source)
        self.i = 0
        self.syntax: set[str] = set()

    # ---- token helpers ---------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def error(self, msg: str, tok: Token | None = None) -> MilError:
        t = tok or self.tok
        found = repr(t.text) if t.kind != "eof" else "end of text"
        return MilError(f"{self.source}: line {t.line} col {t.col}: {msg} (found {found})")

    def peek(self, text: str, ahead: int = 0) -> bool:
        t = self.toks[min(self.i + ahead, len(self.toks) - 1)]
        return t.text == text and t.kind in ("punct", "arrow", "ident")

    def expect(self, text: str) -> Token:
        if not self.peek(text):
            raise self.error(f"expected {text!r}")
        t = self.tok
        self.i += 1
        return t

    def ident(self, what: str = "a name") -> str:
        if self.tok.kind != "ident":
            raise self.error(f"expected {what}")
        t = self.tok.text
        self.i += 1
        return t

    def number(self) -> str:
        if self.tok.kind != "number":
            raise self.error("expected a number")
        t = self.tok.text
        self.i += 1
        return t

    # ---- grammar ---------------------------------------------------------------------------------
    def program(self) -> ParsedProgram:
        if self.tok.text != "program":
            raise self.error("expected 'program(...)' header")
        self.i += 1
        self.expect("(")
        version = self.number()
        self.expect(")")
        if self.peek("["):
            self.skip_attributes()
        self.expect("{")
        if self.tok.text != "func":
            raise self.error("expected 'func'")
        self.i += 1
        fname = self.ident("the function name")
        if fname != "main":
            raise self.error("only a function named 'main' is supported")
        self.expect("<")
        opset = self.ident("an opset such as ios18")
        self.expect(">")
        self.expect("(")
        inputs: list[tuple[str, MilType]] = []
        defined: set[str] = set()
        while not self.peek(")"):
            if inputs:
                self.expect(",")
            t = self.type_()
            name_tok = self.tok
            name = self.ident("an input name")
            if name in defined:
                raise self.error(f"input {name!r} declared twice", name_tok)
            defined.add(name)
            inputs.append((name, t))
        self.expect(")")
        self.expect("{")
        stmts: list[Statement] = []
        while not self.peek("}"):
            stmts.append(self.statement(defined))
        self.expect("}")
        self.expect("->")
        self.expect("(")
        outputs: list[str] = []
        while not self.peek(")"):
            if outputs:
                self.expect(",")
            t = self.tok
            name = self.ident("an output name")
            if name not in defined:
                raise self.error(f"output {name!r} is never defined", t)
            outputs.append(name)
        self.expect(")")
        self.expect(";")
        self.expect("}")
        if self.tok.kind != "eof":
            raise self.error("text after the end of the program")
        if not outputs:
            raise self.error("the function has no outputs")
        return ParsedProgram(version, opset, inputs, stmts, outputs, self.syntax)

    def skip_attributes(self) -> None:
        """The [buildInfo = ...] block: balanced brackets, contents not interpreted."""
        start = self.tok
        depth = 0
        while True:
            t = self.tok
            if t.kind == "eof":
                raise self.error("unterminated [...] attribute block", start)
            if t.text in ("[", "(", "{") and t.kind == "punct":
                depth += 1
            elif t.text in ("]", ")", "}") and t.kind == "punct":
                depth -= 1
            self.i += 1
            if depth == 0:
                return

    def type_(self) -> MilType:
        if self.tok.text == "tensor":
            self.i += 1
            self.expect("<")
            dtype = self.dtype()
            self.expect(",")
            self.expect("[")
            dims: list[int] = []
            while not self.peek("]"):
                if dims:
                    self.expect(",")
                t = self.tok
                n = self.number()
                if not n.isdigit():
                    raise self.error("a dimension must be a non-negative integer", t)
                dims.append(int(n))
            self.expect("]")
            self.expect(">")
            return MilType(dtype, tuple(dims))
        return MilType(self.dtype(), None)

    def dtype(self) -> str:
        t = self.tok
        name = self.ident("a dtype")
        if name not in DTYPES:
            raise self.error(f"unknown dtype {name!r}", t)
        return name

    def statement(self, defined: set[str]) -> Statement:
        line = self.tok.line
        rtype = self.type_()
        name_tok = self.tok
        name = self.ident("a result name")
        if name in defined:
            raise self.error(f"{name!r} is defined twice", name_tok)
        self.expect("=")
        op = self.ident("an op name")
        self.expect("(")
        args: dict[str, str | tuple[str, ...]] = {}
        while not self.peek(")"):
            if args:
                self.expect(",")
            key = self.ident("a parameter name")
            self.expect("=")
            if self.peek("("):
                self.i += 1
                vals: list[str] = []
                while not self.peek(")"):
                    if vals:
                        self.expect(",")
                    vals.append(self.reference(defined))
                self.expect(")")
                args[key] = tuple(vals)
            else:
                args[key] = self.reference(defined)
        self.expect(")")
        attrs: dict[str, Literal] = {}
        if self.peek("["):
            self.i += 1
            while not self.peek("]"):
                if attrs:
                    self.expect(",")
                key = self.ident("an attribute name")
                self.expect("=")
                attrs[key] = self.literal()
            self.expect("]")
        self.expect(";")
        defined.add(name)
        return Statement(line, name, rtype, op, args, attrs)

    def reference(self, defined: set[str]) -> str:
        t = self.tok
        name = self.ident("a value name")
        if name not in defined:
            raise self.error(f"{name!r} is used before it is defined", t)
        return name

    def literal(self) -> Literal:
        t = self.tok
        ltype = self.type_()
        verbose = ltype.shape == ()
        if ltype.shape is None or ltype.shape == ():
            self.syntax.add("verbose" if verbose else "short")
        self.expect("(")
        if self.tok.text == "BLOBFILE":
            value: Any = self.blobfile()
        elif ltype.shape:  # tensor literal [v, v, ...]
            self.expect("[")
            items: list[Any] = []
            while not self.peek("]"):
                if items:
                    self.expect(",")
                items.append(self.scalar_value(ltype.dtype))
            self.expect("]")
            n = int(np.prod(ltype.shape))
            if len(items) != n:
                raise self.error(f"tensor literal has {len(items)} values, its type needs {n}", t)
            value = np.asarray(items, dtype=_np_dtype(ltype.dtype)).reshape(ltype.shape)
        else:
            v = self.scalar_value(ltype.dtype)
            value = v if ltype.dtype == "string" else np.asarray(v, dtype=_np_dtype(ltype.dtype))
        self.expect(")")
        return Literal(ltype, value, verbose)

    def blobfile(self) -> BlobRef:
        self.i += 1
        self.expect("(")
        fields: dict[str, Literal] = {}
        while not self.peek(")"):
            if fields:
                self.expect(",")
            key = self.ident("'path' or 'offset'")
            self.expect("=")
            fields[key] = self.literal()
        self.expect(")")
        if set(fields) != {"path", "offset"}:
            raise self.error("BLOBFILE needs exactly path and offset")
        return BlobRef(str(fields["path"].value), int(fields["offset"].value))

    def scalar_value(self, dtype: str) -> Any:
        t = self.tok
        if dtype == "string":
            if t.kind != "string":
                raise self.error("expected a string")
            self.i += 1
            return re.sub(r"\\(.)", r"\1", t.text[1:-1])
        if dtype == "bool":
            if t.text not in ("true", "false"):
                raise self.error("expected true or false")
            self.i += 1
            return t.text == "true"
        text = self.number()
        if dtype in ("int32", "int64", "uint64"):
            try:
                return int(text)
            except ValueError:
                raise self.error(f"expected an integer for {dtype}", t) from None
        body = text.lstrip("+-")
        sign = -1.0 if text.startswith("-") else 1.0
        return sign * (float.fromhex(body) if body.lower().startswith("0x") else float(body))


def _np_dtype(dtype: str) -> Any:
    return {
        "fp16": np.float16,
        "fp32": np.float32,
        "int32": np.int32,
        "int64": np.int64,
        "uint64": np.uint64,
        "bool": np.bool_,
    }[dtype]


def parse_mil(text: str, source: str = "<mil>") -> ParsedProgram:
    """Parse MIL text; raises :class:`MilError` naming the line and what was expected."""
    return _Parser(text, source).program()
