"""Reading run configs from YAML with `--set` overrides, and fitting messages for a terminal.

    cfg = load_config("jobs/configs/demo.yaml", ["adapter.sigma_p=0.1", "optim.max_steps=20"])
    cfg, sweep = load_experiment("jobs/configs/ablation.yaml")   # the `sweep:` section, untouched

The YAML reader takes plain data only and refuses what a config never holds (repeated keys,
deep nesting, alias bombs, huge files or integers) with a `ConfigError` that names the file,
line and column. Nothing here writes anything anywhere.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from melora.errors import ConfigError
from melora.fields import short_repr
from orchestrator.config.run import RunConfig, check_dotted_key, set_dotted

# Limits on what a config file may hold; a real config is far inside each.
MAX_CONFIG_BYTES = 1_000_000  # the size of a config file
MAX_DEPTH = 32  # nesting of mappings and lists (a sweep's named axis is about 6 deep)
MAX_VALUES = 100_000  # values in the file, counting each YAML alias as the copy it stands for
_INT64 = 2**63 - 1


def load_experiment(
    path: str | Path, overrides: Iterable[str] = (), allow_empty: bool = True
) -> tuple[RunConfig, dict[str, Any]]:
    """Read an experiment YAML: (the validated run config, its raw `sweep:` section or {}).

    `overrides` are `key=value` strings (`--set` arguments) with dotted keys, applied to the file's
    values before validation; values are read as YAML ('0.1', '[a, b]', 'null', 'true').
    `allow_empty=False` refuses a file with no settings (the defaults are the demo run).
    """
    parsed = parse_overrides(overrides)
    raw = read_yaml(path)
    if not raw and not allow_empty:
        raise ConfigError(
            f"config file {short_repr(str(path))} is empty: an experiment sets at least one "
            "section (model:, adapter:, task:, ... sweep:); jobs/configs/demo.yaml is an example"
        )
    for key, value in parsed:
        check_dotted_key(key)
        set_dotted(raw, key, value)
    sweep = raw.pop("sweep", None)
    if sweep is None:
        sweep = {}
    if not isinstance(sweep, dict):
        raise ConfigError(
            f"{path}: sweep={short_repr(sweep)} must be a mapping (the sweep section)"
        )
    try:
        return RunConfig.from_dict(raw), sweep
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a run config YAML with `--set` overrides; a `sweep:` section is ignored."""
    return load_experiment(path, overrides)[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, a syntax error (with its line) or a repeated key is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise ConfigError(
            f"config file {short_repr(str(path))} {what} (looked in {path.resolve().parent})"
        )
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config file (at most {MAX_CONFIG_BYTES})"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{path} line {line}, column {column}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
            "save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # SafeLoader subclass: plain data only
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{path}{_yaml_where(e, text)}: malformed YAML: {_yaml_problem(e)}"
        ) from None
    try:
        _check_plain(data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model:, adapter:, ...), got {type(data).__name__}"
        )
    return data


def add_overrides_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Every job's `--set KEY=VALUE` (repeatable), collected into `args.overrides` for
    `parse_overrides` / `load_config`; `help` gives the job's own example."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """['optim.lr=3e-4', 'task.ood_tasks=[arc_easy]'] -> [('optim.lr', 0.0003), ('task.ood_tasks', ['arc_easy'])]."""
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(
                f"--set {short_repr(item)} is malformed: expected key=value with a dotted key, e.g. --set optim.lr=1e-4"
            )
        try:
            value = yaml.load(text, Loader=_Loader)  # SafeLoader subclass: plain data only
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {short_repr(item)}: the value is not valid YAML ({_yaml_problem(e)}); quote strings with special characters"
            ) from None
        try:
            _check_plain(value, key)
        except ConfigError as e:
            raise ConfigError(f"--set {key}: {e}") from None
        parsed.append((key, value))
    return parsed


# ----- helpers ----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 needs '1.0e-4'), refuses repeated keys,
    keys that are lists or mappings, nesting deeper than MAX_DEPTH and integers of thousands of digits."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.Node) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # beyond Python's 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} digits is too large", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            what = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a mapping key must be a plain value (a name or a number), not {what}",
                key_node.start_mark,
            )
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_where(e: yaml.YAMLError, text: str) -> str:
    """' line L, column C' of a YAML error, when it has a position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return f" line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(e, "position", None)  # a reader error: a character YAML refuses
    if isinstance(position, int):
        line = text.count("\n", 0, position) + 1
        return f" line {line}, column {position - (text.rfind(chr(10), 0, position) + 1) + 1}"
    return ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return f"character {e.character!r} is not allowed in YAML"
    text = str(getattr(e, "problem", None) or e)
    return text if len(text) <= 300 else text[:297] + "..."


def shorten_message(text: str, word: int = 200, limit: int = 1500) -> str:
    """A message fit to print: each run of more than `word` non-space characters (a huge value
    or key) is cut in its middle, and the whole to about `limit` characters."""

    def cut(m: re.Match) -> str:
        s = m.group()
        return f"{s[:100]}...[{len(s) - 120} characters cut]...{s[-20:]}"

    text = re.sub(rf"\S{{{word + 1},}}", cut, text)
    if len(text) > limit:
        cut_n = len(text) - limit + 350
        text = f"{text[: limit - 400]} ...[{cut_n} characters cut]... {text[-350:]}"
    return text


def _check_plain(data: Any, where: str) -> None:
    """Refuse what config data never holds: a value that contains itself, more than MAX_VALUES
    values once YAML aliases are expanded, nesting deeper than MAX_DEPTH, an integer beyond 64 bits.

    Iterative and memoised by object, so an alias bomb costs its size on disk, not its expansion.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, str, bool]] = [(data, where, False)]
    while stack:
        node, path, done = stack.pop()
        if not isinstance(node, (dict, list)):
            if isinstance(node, int) and not isinstance(node, bool) and abs(node) > _INT64:
                raise ConfigError(
                    f"{path}={short_repr(node)} is too large: integers in a config fit in 64 bits"
                )
            continue
        key = id(node)
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            depths[key] = 1 + max((depths.get(id(c), 0) for c in children), default=0)
            if sizes[key] > MAX_VALUES:
                raise ConfigError(
                    f"{path} expands to more than {MAX_VALUES} values (YAML aliases?): "
                    f"{short_repr(node)}; a config holds far fewer"
                )
            if depths[key] > MAX_DEPTH:
                raise ConfigError(f"{path} is nested more than {MAX_DEPTH} levels deep")
            continue
        if key in sizes:  # another alias of a value already counted
            continue
        if key in open_:
            raise ConfigError(f"{path} contains itself (a YAML alias inside its own anchor)")
        open_.add(key)
        stack.append((node, path, True))
        if isinstance(node, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), False) for k, v in node.items()]
        else:
            stack += [(v, f"{path}[{i}]", False) for i, v in enumerate(node)]
