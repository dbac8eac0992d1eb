"""The job's templates: Jinja's immutable sandbox, seeing a row's columns and nothing else.

A job file may come from someone else, and ``batcher preview`` promises to send nothing: its
templates must run no code and read nothing of the machine. Jinja's own sandbox is the tool
for untrusted templates (it refuses Python's internals at render time); on top of it the
globals are cut to three harmless ones, and what can be refused by reading the template
(``{{ x.__class__ }}``, ``{% include %}``) is refused when the job is loaded, so the mistake is
one line, before any row. What only a row's value reveals fails that row (``template_error``).
"""

from __future__ import annotations

from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace

from batcher.errors import ConfigError

# The names a template sees besides the row's columns. Dropped from Jinja's defaults:
# ``lipsum`` (random text: a request that changed every run would be sent again every run),
# ``cycler`` and ``joiner`` (the usual way into Python objects, and `loop.cycle` does the work).
GLOBALS: dict[str, Any] = {"range": safe_range, "dict": dict, "namespace": Namespace}
# The longest text or list a ``*`` may build, and the largest number a ``**`` may: without a
# bound ``{{ 'x' * 10**10 }}`` takes 10 GB and ``{{ 10**10**8 }}`` takes minutes.
MAX_REPEAT = 10_000_000
MAX_POWER_BITS = 4096
# Tags that read other templates, which here would mean files: a job has none to offer.
_LOADING = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if _power_bits(left, right) > MAX_POWER_BITS:
                raise SecurityError(f"{left!r} ** {right!r} is too large a number")
        elif isinstance(left, int) != isinstance(right, int):  # a sequence repeated
            sequence, count = (right, left) if isinstance(left, int) else (left, right)
            if hasattr(sequence, "__len__") and len(sequence) * count > MAX_REPEAT:
                raise SecurityError(f"repeating a value {count:,} times is too large")
        return super().call_binop(context, operator, left, right)


def template_environment(finalize: Any) -> jinja2.Environment:
    """The one environment every template of a job is compiled in: preview, estimate, run."""
    environment = _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=finalize,
    )
    environment.globals.clear()
    environment.globals.update(GLOBALS)
    return environment


def template_columns(environment: jinja2.Environment, source: str, where: str) -> set[str]:
    """The row columns a template reads; ConfigError for a syntax error or for what the
    sandbox would refuse anyway (a ``_`` name, a tag that loads a file)."""
    try:
        tree = environment.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{where}: template error on line {exc.lineno}: {exc.message}") from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, *_LOADING)):
        refused = _refused(node)
        if refused is not None:
            raise ConfigError(
                f"{where}: template error on line {node.lineno}: {refused} "
                "(templates see the row's columns and run no code)"
            )
    return set(jinja2.meta.find_undeclared_variables(tree))


def _refused(node: nodes.Node) -> str | None:
    if isinstance(node, _LOADING):
        return f"{{% {type(node).__name__.lower()} %}} is not available"
    name: Any = None
    if isinstance(node, nodes.Getattr):
        name = node.attr
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        name = node.arg.value
    elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
        first = node.args[0]
        name = first.value if isinstance(first, nodes.Const) else None
    # Dunders only: a struct column's ``_id`` field is a value, and any other ``_`` attribute
    # is refused by the sandbox when rendered.
    if isinstance(name, str) and name.startswith("__"):
        return f"{name!r} is Python's internals, not a value"
    return None


def _power_bits(base: Any, exponent: Any) -> float:
    """About how many bits ``base ** exponent`` takes (0 for what is not a whole power)."""
    if not isinstance(base, int) or not isinstance(exponent, int) or exponent <= 0:
        return 0
    return max(abs(base).bit_length() - 1, 0) * float(exponent)
