"""Load params.yaml and check each stage's sections and keys against a small declarative spec."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import ruamel.yaml
import yaml
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.resolver import VersionedResolver

from gpt.fields import describe_range, in_range, type_ok, value_type


class ParamsError(ValueError):
    """params.yaml is missing, unparsable, or has a wrong, unknown or missing key."""


@dataclass(frozen=True)
class Spec:
    """What one value must be; `fields` (exact keys) or `values` (any keys) for mappings."""

    type: type
    optional: bool = False  # may be missing or null; then it reads as `default`
    default: Any = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    bounds: str = "[]"  # "(]" etc.: which interval ends are open
    pattern: str = ""
    min_items: int = 0
    item: Spec | None = None
    fields: Mapping[str, Spec] = field(default_factory=dict)
    values: Spec | None = None


def Int(low: float | None = None, high: float | None = None, **kw: Any) -> Spec:
    return Spec(int, low=low, high=high, **kw)


def Float(low: float | None = None, high: float | None = None, **kw: Any) -> Spec:
    return Spec(float, low=low, high=high, **kw)


def Str(**kw: Any) -> Spec:
    return Spec(str, **kw)


def Bool(**kw: Any) -> Spec:
    return Spec(bool, **kw)


def List(item: Spec, min_items: int = 0, **kw: Any) -> Spec:
    return Spec(list, item=item, min_items=min_items, **kw)


def Section(**fields: Spec) -> Spec:
    """A mapping with exactly these keys (missing ones allowed only if optional)."""
    return Spec(dict, fields=fields)


def Named(values: Spec, **kw: Any) -> Spec:
    """A mapping from free names (file-name-like) to values of one spec."""
    return Spec(dict, values=values, **kw)


def config_specs(config_class: type, *, skip: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict[str, Spec]:
    """The specs of a config dataclass's fields (gpt.fields.bounded): type from the annotation
    (`X | None` may be null), range or choices from the field. `optional` names fields that may be
    null in params although the dataclass needs a value (null then means "keep the default")."""
    specs = {}
    for spec in fields(config_class):
        if spec.name in skip:
            continue
        kind, nullable = value_type(config_class, spec.name)
        meta = spec.metadata
        specs[spec.name] = Spec(kind, optional=nullable or spec.name in optional, choices=meta.get("choices", ()),
                                low=meta.get("low"), high=meta.get("high"), bounds=meta.get("bounds", "[]"))
    return specs


SHA256 = Str(pattern=r"[0-9a-f]{64}")
# A plain file name: no folders, no hidden files, so params can never point outside data/.
FILENAME = Str(pattern=r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
# Keys read by several stages, declared once so every reader checks them the same way.
CONTEXT_LENGTH = Int(low=1)
DEVICE = Str(choices=("auto", "cpu", "cuda", "mps"))
_RELPATH = Str(pattern=r"(?!.*\.\.)[A-Za-z0-9_+-][A-Za-z0-9._+/-]*", optional=True, default="")
# download.sources: fetched by download, named by the datasets that validate and tokenize read.
DOWNLOAD_SOURCES = Named(Section(
    urls=List(Str(pattern=r"https?://\S+"), min_items=1),
    sha256=Str(pattern=SHA256.pattern, optional=True, default=""),  # pinned: the final file's sha256
    track=Bool(optional=True, default=False),  # or tracked: fetched again on every run
    filename=FILENAME,
    mirror_path=_RELPATH,
    archive_member=_RELPATH,
))

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping"}


def check(value: Any, spec: Spec, key: str, origin: str = "params.yaml") -> Any:
    """Return `value` checked against spec (optional fields filled in); raise ParamsError naming `key`."""
    def fail(what: str) -> ParamsError:
        return ParamsError(f"{origin}: {key} must be {what}, got {value!r}")

    if value is None and spec.optional:
        return spec.default
    if not type_ok(value, spec.type):
        raise fail(_TYPE_NAMES[spec.type])
    if spec.choices and value not in spec.choices:
        raise fail("one of " + ", ".join(map(str, spec.choices)))
    if (spec.low is not None or spec.high is not None) and not in_range(value, spec.low, spec.high, spec.bounds):
        raise fail(describe_range(spec.low, spec.high, spec.bounds))
    if spec.pattern and not re.fullmatch(spec.pattern, value):
        raise fail(f"a string matching {spec.pattern}")
    if spec.type is list:
        if len(value) < spec.min_items:
            raise fail(f"a list of at least {spec.min_items} item(s)")
        return [check(v, spec.item, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if spec.type is dict:
        return _check_mapping(value, spec, key, origin)
    return float(value) if spec.type is float else value


def _check_mapping(value: dict, spec: Spec, key: str, origin: str) -> dict:
    if spec.values is not None:
        for name in value:
            if not isinstance(name, str) or not re.fullmatch(FILENAME.pattern, name):
                raise ParamsError(f"{origin}: {key} has an invalid name {name!r}")
        return {name: check(v, spec.values, f"{key}.{name}", origin) for name, v in value.items()}
    unknown = sorted(set(value) - set(spec.fields), key=str)
    if unknown:
        raise ParamsError(f"{origin}: unknown key {key}.{unknown[0]} (allowed: {', '.join(spec.fields)})")
    out = {}
    for name, sub in spec.fields.items():
        if name not in value and not sub.optional:
            raise ParamsError(f"{origin}: missing key {key}.{name}")
        out[name] = check(value.get(name), sub, f"{key}.{name}", origin)
    return out


def _parsed(path: str | Path, load: Callable[[str], Any]) -> dict:
    path = Path(path)
    try:
        data = load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (yaml.YAMLError, ruamel.yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path.name}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path.name}: must be a mapping of sections, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path) -> dict:
    """The parsed params file as a mapping of section names to sections."""
    return _parsed(path, yaml.safe_load)


class _Resolver(VersionedResolver):
    """YAML 1.1, the version read_yaml (PyYAML) reads: a value already in the file means what the stages
    read (`yes` is true), and a new string "yes" is written quoted."""

    def __init__(self, version: Any = None, loader: Any = None, loadumper: Any = None):
        super().__init__((1, 1), loader, loadumper)  # whatever version ruamel asks for


def _represent_float(representer: RoundTripRepresenter, value: float) -> ScalarNode:
    node = RoundTripRepresenter.yaml_representers[float](representer, value)
    if "e" in node.value and "." not in node.value:  # YAML 1.1 reads 5e-05 as a string; 5.0e-05 is a number
        node.value = node.value.replace("e", ".0e", 1)
    return node


class _Representer(RoundTripRepresenter):
    """Values as params.yaml spells them: a null as `null` (ruamel's round trip writes nothing), a float
    as YAML 1.1 reads it."""


_Representer.add_representer(type(None), lambda representer, _: representer.represent_scalar(
    "tag:yaml.org,2002:null", "null"))
_Representer.add_representer(float, _represent_float)


def _round_trip() -> ruamel.yaml.YAML:
    document = ruamel.yaml.YAML()  # round trip: comments, key order, quotes and flow style are kept
    document.Resolver = _Resolver
    document.Representer = _Representer
    document.preserve_quotes = True
    document.indent(mapping=2, sequence=4, offset=2)  # params.yaml's layout
    document.width = 4096  # a long value is never wrapped onto a second line
    return document


def read_document(path: str | Path) -> dict:
    """The params file as read_yaml reads it, with its comments and layout kept for document_text: change
    its values in place (a list's items too: the list keeps its flow style and its comment)."""
    return _parsed(path, _round_trip().load)


def document_text(document: dict) -> str:
    """The text of a document read by read_document: its comments, key order and layout as read, its
    values as they are now."""
    out = io.StringIO()
    _round_trip().dump(document, out)
    return out.getvalue()


def load_params(path: str | Path, specs: Mapping[str, Spec]) -> dict:
    """Read params, checking each of `specs`: a section name (checked strictly, as a stage's own
    section) or a dotted key read from another stage's section. Returns {name or dotted key: value}.

    Sections nobody declared here are left alone, so a stage never fails on (or depends on the
    spec of) another stage's params.
    """
    data = read_yaml(path)
    origin = Path(path).name
    out: dict = {}
    for name, spec in specs.items():
        node: Any = data
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{origin}: missing {'key' if '.' in name else 'section'} {name}")
            node = node[part]
        out[name] = check(node, spec, name, origin)
    return out
