"""Checked settings: strict pydantic types, one clear error per mistake, safe YAML.

The building blocks of esm_core/config.py and esm_core/runspec.py: ranged number types
(``Int(lo, hi)``, ``Float(lo, hi)``), strict booleans, identifier names, and
:class:`explained`, which turns a pydantic ValidationError into one :class:`ESMError` naming the
setting, the value (cut to ~200 characters by :func:`short_repr`) and what is allowed. YAML is
read with ``safe_load``, size-capped, and refused when aliases expand past a sane size.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from esm_core.errors import ESMError

_MAX_MESSAGE_VALUE = 200  # characters of a user's value quoted in an error message
MAX_CONFIG_BYTES = 4 * 2**20
MAX_YAML_NODES = 100_000  # values a config may expand to (YAML aliases included)
_STRICT = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=False)
_FLOAT_RE = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _number_text(v):
    # YAML 1.1 reads "1e-3" as text; accept a plainly written number for a float setting
    if isinstance(v, str) and _FLOAT_RE.match(v):
        return float(v)
    return v


def Int(lo: int, hi: int):
    return Annotated[int, Field(strict=True, ge=lo, le=hi)]


def Float(lo: float, hi: float):
    return Annotated[float, BeforeValidator(_number_text), Field(strict=True, ge=lo, le=hi, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Text = Annotated[str, Field(strict=True, max_length=100_000)]


# Names become PEFT adapter names, tensor keys and folder names: identifiers only.
NAME_RULE = "letters (Unicode letters too), digits, '_' and '-', at most 64 characters"
Name = Annotated[str, Field(strict=True, min_length=1, max_length=64, pattern=r"^\w[\w-]*$")]


def setting(default, help: str, **meta):
    """A dataclass field with its help string (and other metadata, e.g. the stage it invalidates)."""
    return field(default=default, metadata={"help": help, **meta})


def short_repr(value: Any, limit: int = _MAX_MESSAGE_VALUE) -> str:
    """repr of a user's value for a message: bounded in depth and length, never the whole of a huge value."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, 60
    s = r.repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ------------------------------------------------------------------ validation errors -> ESMError
def _allowed(cls, name: str) -> str:
    """What a field accepts, in words, from its pydantic declaration."""
    info = getattr(cls, "__pydantic_fields__", {}).get(name)
    if info is None:
        return "see the settings list (python -m esm_core settings)"
    return _describe_type(info.annotation, info.metadata)


def _describe_type(ann, metadata=()) -> str:
    import typing

    lo = hi = None
    for m in metadata or ():
        lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
    origin = typing.get_origin(ann)
    if origin is Annotated:
        base, *meta = typing.get_args(ann)
        inner = []
        for m in meta:
            inner.extend(getattr(m, "metadata", []) or [])
            inner.append(m)
        return _describe_type(base, list(metadata or ()) + inner)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        return "a list of " + (_describe_type(args[0]).replace("a whole number", "whole numbers") if args else "values")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return (_describe_type(args[0], metadata) if args else "nothing") + " (or nothing)"
    if ann is bool:
        return "true or false (an unquoted YAML boolean)"
    rng = ""
    if lo is not None and hi is not None:
        rng = f" from {lo:g} to {hi:g}" if isinstance(lo, float) or isinstance(hi, float) else f" from {lo} to {hi}"
    elif lo is not None:
        rng = f" >= {lo}"
    if ann is int:
        return "a whole number" + rng
    if ann is float:
        return "a finite number" + rng
    if ann is str:
        return "text"
    if ann is dict or origin is dict:
        return "a mapping"
    return getattr(ann, "__name__", str(ann))


def _loc_text(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part) or str(part).startswith(("Literal", "tuple")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _field_class(root, loc: tuple):
    """The dataclass declaring the last field of loc, walking nested specs from root."""
    cls = root
    for part in loc[:-1]:
        info = getattr(cls, "__pydantic_fields__", {}).get(part) if isinstance(part, str) else None
        if info is None:
            continue
        cls = _first_dataclass(info.annotation) or cls
    return cls


def _first_dataclass(t):
    import typing

    if dataclasses.is_dataclass(t):
        return t
    for a in typing.get_args(t) or ():
        d = _first_dataclass(a)
        if d is not None:
            return d
    return None


def validation_message(e: ValidationError, root, where: str) -> ESMError:
    """One ESMError for a pydantic error: the setting, the value (short) and what is allowed."""
    errs = e.errors(include_url=False)
    first = errs[0]
    loc = tuple(first.get("loc") or ())
    name = _loc_text(loc)
    typ = first.get("type", "")
    more = f" ({len(errs) - 1} more problem(s) after this one)" if len(errs) > 1 else ""
    if typ in ("unexpected_keyword_argument", "extra_forbidden"):
        cls = _field_class(root, loc)
        known = sorted(f.name for f in fields(cls) if not f.metadata.get("internal")) if dataclasses.is_dataclass(cls) else []
        same = [str(x["loc"][-1]) for x in errs if x.get("type") == typ and tuple(x["loc"])[:-1] == loc[:-1]]
        parent = _loc_text(loc[:-1])
        return ESMError(f"Unknown key(s) {short_repr(same)} in {parent or where}.", fix=f"allowed keys: {known}.")
    if typ == "missing_argument" or typ == "missing":
        return ESMError(f"{where}: {name!r} is missing{more}.", fix=f"set {name!r}.")
    field_name = next((p for p in reversed(loc) if isinstance(p, str) and not p.startswith(("function", "Literal"))
                       and "[" not in p), name)
    cls = _field_class(root, loc)
    allowed = _allowed(cls, field_name)
    f = getattr(cls, "__dataclass_fields__", {}).get(field_name)
    if typ.startswith("string_") and f is not None and f.metadata.get("rule"):
        allowed = f.metadata["rule"]
    value = short_repr(first.get("input"))
    verdict = "is out of range" if typ in ("greater_than_equal", "less_than_equal", "greater_than", "less_than") \
        else "is not allowed"
    return ESMError(f"Setting {name}={value} in {where} {verdict}: it must be {allowed}{more}.",
                    fix=f"set {name} to {allowed}.")


class explained:
    """Context manager: a pydantic ValidationError raised inside becomes one ESMError."""

    def __init__(self, where: str, root):
        self.where, self.root = where, root

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is not None and issubclass(typ, ValidationError):
            raise validation_message(e, self.root, self.where) from None
        return False




def _mapping(data: Any, where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ESMError(f"{where} must be a mapping, got {type(data).__name__} {short_repr(data)}.",
                       fix=f"write {where} as 'key: value' lines.")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ESMError(f"{where} has a key that is not text: {short_repr(bad[0])}.", fix="write keys as plain names.")
    return data


def _count_nodes(obj, limit: int) -> None:
    """Refuse a value that expands to more than ``limit`` nodes (YAML aliases share nodes: count each use)."""
    n = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        n += 1
        if n > limit:
            raise ESMError(f"The config expands to more than {limit:,} values (YAML anchors and aliases "
                           "repeated inside each other?).", fix="write the config out plainly, without nested aliases.")
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


def read_yaml(path: str | Path, what: str = "Config file") -> Any:
    """Parse a YAML file safely: size-capped, no Python objects, aliases that expand too far refused."""

    p = Path(path)
    if not p.is_file():
        raise ESMError(f"{what} {str(p)!r} does not exist.", fix="pass the path of a YAML run config.")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ESMError(f"{what} {str(p)!r} is {p.stat().st_size // 2**20} MiB, over the "
                       f"{MAX_CONFIG_BYTES // 2**20} MiB a run config may have.", fix="pass a run config file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ESMError(f"{what} {str(p)!r} is not UTF-8 text.", fix="save it as UTF-8.") from None
    return parse_yaml_text(text, f"{what} {str(p)!r}")


def parse_yaml_text(text: str, where: str) -> Any:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ESMError(f"{where} is not valid YAML: {short_repr(str(e).splitlines()[0])}",
                       fix="correct the YAML syntax at the line named.") from None
    except RecursionError:
        raise ESMError(f"{where} nests too deeply.", fix="write it out plainly.") from None
    _count_nodes(data, MAX_YAML_NODES)
    return data
