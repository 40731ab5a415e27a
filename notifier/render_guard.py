"""A Jinja2 sandbox in which a template cannot make anything large.

A deadline stops a slow render, but not one allocation of a gigabyte. So every way a
template makes a value is bounded, before the value exists when its size can be foreseen:
operators (`*`, `+`, `%`, `**`, `~`), method calls on strings, filters, `str.format`,
namespaces and the output. Each value stays within MAX_RENDER_CHARS, and all that one
render makes within RENDER_BUDGET_CHARS, which bounds what it can hold at once (in
variables, lists, macro frames) whatever it loops or recurses over. Breaking a bound is
a `RenderLimitError`, which Jinja reports with the template's file and line.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from string import Formatter
from typing import Any

from jinja2 import Template, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.filters import do_join, make_attrgetter
from jinja2.nodes import Concat, EvalContext
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import Namespace

# The largest value, and the largest output, a template may make: a digest of 1,000
# requests renders in about 300 kB.
MAX_RENDER_CHARS = 4 * 1024 * 1024
# All that one render may make, counted as it is made.
RENDER_BUDGET_CHARS = 16 * MAX_RENDER_CHARS
# What a new item of a list or dict costs besides its text (a reference and an object),
# counted like characters.
ITEM_CHARS = 32
# The largest integer a template may make: about 4,900 digits, past which Python refuses
# to print one anyway, and still instant to multiply.
MAX_INT_BITS = 16 * 1024

# Filters that turn their arguments into text, which a list of a million references to
# one long string would make enormous.
_TEXT_FILTERS = frozenset(
    {
        *("capitalize", "e", "escape", "forceescape", "lower", "pprint", "safe", "string"),
        *("striptags", "title", "tojson", "trim", "truncate", "upper", "urlencode"),
        *("urlize", "wordcount", "xmlattr", "clip", "mrkdwn", "slack_link"),
    }
)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_DIGITS = re.compile(r"\d+")
_budget = threading.local()


class RenderLimitError(SecurityError):
    """A template asked for more than a render may make."""


def render_bounded(template: Template, context: Mapping[str, Any]) -> str:
    """`template` rendered with `context` within the bounds; `RenderLimitError` past them."""
    _budget.left = RENDER_BUDGET_CHARS
    try:
        parts, size = [], 0
        for part in template.generate(context):
            size += len(part)
            if size > MAX_RENDER_CHARS:
                raise RenderLimitError(f"the output is longer than {MAX_RENDER_CHARS:,} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        del _budget.left


def _check_size(size: int) -> None:
    """Refuse a value of `size` characters (foreseen or made) if it is over the bound."""
    if size > MAX_RENDER_CHARS:
        raise RenderLimitError(
            f"the template makes a value of {size:,} characters or more; "
            f"the limit is {MAX_RENDER_CHARS:,}"
        )


def _charge(size: int) -> None:
    """Count a value of `size` characters just made against the bound and the budget."""
    _check_size(size)
    try:
        left = _budget.left = _budget.left - size
    except AttributeError:  # outside render_bounded: compiling, or a test
        return
    if left < 0:
        raise RenderLimitError(
            f"the template makes more than {RENDER_BUDGET_CHARS:,} characters in all"
        )


def _measure(value: object) -> int:
    """About `len(str(value))`, found without making it (quotes and escapes aside); stops
    counting past MAX_RENDER_CHARS, so cycles and shared items cost a bounded time."""
    if isinstance(value, str):
        return len(value)
    size, pending = 0, [value]
    while pending and size <= MAX_RENDER_CHARS:
        item = pending.pop()
        if isinstance(item, str | bytes | bytearray):
            size += len(item) + 2
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 2
        elif isinstance(item, Mapping):
            size += 4 * len(item) + 2
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset | range):
            size += 2 * len(item) + 2
            pending.extend(item)
        else:
            size += 24
    return size


def _cost(value: object) -> int:
    """What making `value` took: its text, or its items' references (the items themselves
    were counted when they were made)."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple | dict | set):
        return ITEM_CHARS * len(value)
    return 0


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise RenderLimitError(f"the template makes a number of more than {MAX_INT_BITS:,} bits")


def _check_binop(operator: str, left: object, right: object) -> None:
    """Refuse `left <operator> right` before it runs when its result would be too large."""
    if isinstance(left, int) and isinstance(right, int):
        if operator == "*":
            _check_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and right > 0:
            _check_bits(max(left.bit_length(), 1) * right)
    elif operator == "*":
        count, sequence = (right, left) if isinstance(right, int) else (left, right)
        if isinstance(count, int) and isinstance(sequence, str | bytes | list | tuple):
            _check_size(_cost(sequence) * count)
    elif operator == "+" and isinstance(left, str | bytes | list | tuple):
        _check_size(_cost(left) + _cost(right))
    elif operator == "%" and isinstance(left, str | bytes):
        _check_size(_percent_size(left, right))


def _number(text: str, star: int) -> int:
    """A width or precision of a format: `*` takes `star`; digits beyond any bound count
    as over it, without reading them as a number."""
    if text == "*":
        return star
    return int(text) if len(text) < 10 else MAX_RENDER_CHARS + 1


def _percent_size(template: str | bytes, values: object) -> int:
    """At most how long `template % values` is: each `%` spec holds the longest value,
    padded to its width and precision."""
    if isinstance(values, Mapping):
        items = list(values.values())
    else:
        items = list(values) if isinstance(values, tuple) else [values]
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    return _spec_sizes(text, items, (match.groups() for match in _PERCENT_SPEC.finditer(text)))


def _format_size(template: str, values: Iterable[object]) -> int:
    """At most how long `template.format(...)` of `values` is, the same way; a width taken
    from a value (`{:{}}`) counts as the largest integer among them."""
    items = list(values)
    specs = [
        (*_DIGITS.findall(spec or ""), *("*" * ("{" in (spec or ""))))
        for _, field, spec, _ in Formatter().parse(template)
        if field is not None
    ]
    return _spec_sizes(template, items, specs)


def _spec_sizes(template: str, items: list[object], specs: Iterable[Iterable[str]]) -> int:
    """`template`'s length plus, per spec, the widest item and the spec's numbers."""
    widest = max(map(_measure, items), default=0)
    star = max((item for item in items if isinstance(item, int)), default=0)
    size = len(template)
    for numbers in specs:
        size += widest + sum(_number(number, star) for number in numbers if number)
    return size


def _text_method_size(text: str | bytes, name: str, args: tuple[Any, ...]) -> int:
    """At most how long `text.<name>(*args)` is, for the methods that can make a string
    much longer than `text` and their arguments."""
    match name, args:
        case (("center" | "ljust" | "rjust" | "zfill"), (int(width), *_)):
            return len(text) + width
        case "expandtabs", (int(tabsize),):
            return len(text) * max(tabsize, 1)
        case "replace", (old, new, *rest):
            # `old` of another type (the filter makes text of it) counts as matching anywhere.
            found = text.count(old) if old and isinstance(old, type(text)) else len(text) + 1
            limit = rest[0] if rest and isinstance(rest[0], int) and rest[0] >= 0 else found
            return len(text) + min(found, limit) * _measure(new)
        case "translate", (Mapping() as table,):
            return len(text) * max(map(_measure, table.values()), default=1)
    return 0


def _check_method_call(
    owner: object, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """Refuse a call of a string's (or an int's `to_bytes`) method whose result would be
    too large; the arguments to call it with (`join` gets its items as a list, to count
    them first)."""
    given = (*args, *kwargs.values())
    if isinstance(owner, int):
        if name == "to_bytes" and given and isinstance(given[0], int):
            _check_size(given[0])
    elif isinstance(owner, str | bytes):
        if name == "join" and len(args) == 1:
            items = list(args[0])
            _check_size(sum(map(_measure, items)) + len(items) * len(owner))
            return (items,)
        _check_size(_text_method_size(owner, name, given))
    return args


# Filters that can make much more than they are given, and how much at most.


def _center_size(value: object, width: int = 80) -> int:
    return _measure(value) + width


def _indent_size(s: object, width: int | str = 4, *_: object) -> int:
    lines = s.count("\n") + 1 if isinstance(s, str) else _measure(s)
    return _measure(s) + lines * (width if isinstance(width, int) else _measure(width))


def _wordwrap_size(s: object, width: int = 79, *args: object, **kwargs: object) -> int:
    wrapstring = kwargs.get("wrapstring", args[1] if len(args) > 1 else None) or "\n"
    lines = _measure(s) // max(width, 1) + 1 if isinstance(width, int) else 1
    return _measure(s) + lines * (ITEM_CHARS + _measure(wrapstring))  # a string per line


def _replace_size(s: object, old: object, new: object, count: int | None = None) -> int:
    if not isinstance(s, str):  # made text first: count the worst case
        return _measure(s) + (_measure(s) + 1) * _measure(new)
    return _text_method_size(s, "replace", (old, new, -1 if count is None else count))


def _format_filter_size(value: object, *args: object, **kwargs: object) -> int:
    return _percent_size(value if isinstance(value, str) else "", kwargs or args)


def _batch_size(value: object, linecount: int, fill_with: object = None) -> int:
    return ITEM_CHARS * linecount if fill_with is not None else 0


def _slice_size(value: object, slices: int, fill_with: object = None) -> int:
    return ITEM_CHARS * slices


def _round_size(value: object, precision: int = 0, *_: object) -> int:
    # Rounding an integer to -N digits computes 10**N first, inside one C call.
    if isinstance(value, int) and isinstance(precision, int) and precision < 0:
        _check_bits(-precision * 10 // 3)
    return 0


def _text_size(*args: object, **kwargs: object) -> int:
    return sum(map(_measure, args)) + (sum(map(_measure, kwargs.values())) if kwargs else 0)


_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "batch": _batch_size,
    "center": _center_size,
    "format": _format_filter_size,
    "indent": _indent_size,
    "replace": _replace_size,
    "round": _round_size,
    "slice": _slice_size,
    "wordwrap": _wordwrap_size,
}


def _bounded_filter(name: str, filter_: Callable[..., Any]) -> Callable[..., Any]:
    """`filter_`, refusing calls whose result would be too large and charging what it makes."""
    size = _FILTER_SIZES.get(name, _text_size if name in _TEXT_FILTERS else None)
    skip = 1 if getattr(filter_, "jinja_pass_arg", None) else 0  # context or environment

    @functools.wraps(filter_)  # keeps `jinja_pass_arg`, so Jinja passes the same arguments
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if size is not None:
            _check_size(size(*args[skip:], **kwargs))
        result = filter_(*args, **kwargs)
        _charge(len(result) if type(result) is str else _cost(result))
        return result

    return bounded


@pass_eval_context
def _join(
    eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None
) -> str:
    """Jinja's `join`, counting the items before it joins them."""
    if attribute is not None:
        value = map(make_attrgetter(eval_ctx.environment, attribute), value)
    items = list(value)
    _check_size(sum(map(_measure, items)) + len(items) * _measure(d))
    return do_join(eval_ctx, items, d)


class _Namespace(Namespace):
    """`namespace()`, whose attributes hold no value too large to print."""

    def __setitem__(self, name: str, value: Any) -> None:
        _check_size(_measure(value))
        super().__setitem__(name, value)


class _Buffer(list[str]):
    """The output of a macro or of a `set`, `filter` or `call` block while it is made:
    charged piece by piece, and within MAX_RENDER_CHARS as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self._size = 0

    def append(self, text: str) -> None:
        """Add one piece of output."""
        self._grow(len(text))
        list.append(self, text)

    def extend(self, texts: Iterable[str]) -> None:
        """Add pieces of output."""
        texts = tuple(texts)
        self._grow(sum(map(len, texts)))
        list.extend(self, texts)

    def _grow(self, size: int) -> None:
        self._size += size
        _check_size(self._size)
        _charge(size)


class _CodeGenerator(CodeGenerator):
    """Jinja's compiler, with frame buffers and `~` that go through the environment."""

    def buffer(self, frame: Frame) -> None:
        """Start a frame's output buffer: a bounded one."""
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    @optimizeconst
    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        """`a ~ b`: joined by the environment, which counts the operands first."""
        self.write("environment.concat_operands((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("), context.eval_ctx.autoescape)")


def _check_output(value: object) -> object:
    """Refuse to print a value whose text would be too large (a list of a million
    references to one long string is small until it is printed)."""
    if not isinstance(value, str):
        _check_size(_measure(value))
    return value


class BoundedEnvironment(SandboxedEnvironment):
    """The sandbox with the bounds of this module; `filters` are bounded too."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self, filters: Mapping[str, Callable[..., Any]], **options: Any) -> None:
        super().__init__(finalize=_check_output, **options)
        del self.globals["lipsum"]  # paragraphs of lorem ipsum by the thousand: no message's need
        self.globals["namespace"] = _Namespace
        self.filters.update(filters, join=_join)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def new_buffer() -> list[str]:
        """An output buffer for compiled templates (see `_CodeGenerator.buffer`)."""
        return _Buffer()

    @staticmethod
    def concat_operands(operands: tuple[Any, ...], autoescape: bool) -> str:
        """`a ~ b ~ …` for compiled templates: refused before it is made if too long."""
        _check_size(sum(map(_measure, operands)))
        text = markup_join(operands) if autoescape else str_join(operands)
        _charge(len(text))
        return text

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """`left <operator> right` for `+`, `*`, `%`, `**`, refused if the result is too large."""
        _check_binop(operator, left, right)
        result = self.binop_table[operator](left, right)
        _charge(_cost(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """A call from a template. A method's result is charged, foreseen first for a
        string's, and so is what it adds to a list, dict or set."""
        owner = getattr(__obj, "__self__", None)
        if owner is None:  # a macro, a global, a sandboxed format: bounded as they make things
            return super().call(__context, __obj, *args, **kwargs)
        args = _check_method_call(owner, getattr(__obj, "__name__", ""), args, kwargs)
        before = len(owner) if isinstance(owner, list | dict | set) else None
        result = super().call(__context, __obj, *args, **kwargs)
        grown = 0 if before is None else max(len(owner) - before, 0)
        _charge(ITEM_CHARS * grown + _cost(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` and `format_map`, sandboxed by Jinja, refused if too long."""
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        template, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(sandboxed)
        def bounded(*args: Any, **kwargs: Any) -> str:
            values = args[0].values() if is_map and args and isinstance(args[0], Mapping) else ()
            _check_size(_format_size(template, [*values, *args[not is_map :], *kwargs.values()]))
            text = sandboxed(*args, **kwargs)
            _charge(len(text))
            return text

        return bounded
