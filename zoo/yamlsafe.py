"""A strict YAML loader for the small files users hand the tool (search spaces, victim
manifests): ``yaml.SafeLoader`` (no Python objects), plus

- no aliases (``*name``): a small file cannot expand into a huge value;
- no key given twice in a mapping (YAML itself would keep the last one silently);
- at most ``max_depth`` levels of nesting;
- ``1e-3`` reads as a float, as in JSON (YAML 1.1 wants ``1.0e-3``).

>>> Loader = strict_loader("a demo file", max_depth=4)
>>> yaml.load("lr: 1e-3", Loader=Loader)
{'lr': 0.001}
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["strict_loader"]


def _clip(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def strict_loader(what: str, max_depth: int) -> type[yaml.SafeLoader]:
    """A SafeLoader subclass with the rules above; errors say they concern ``what``."""

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError(f"YAML aliases (*name) are not accepted in {what}")
            self.depth += 1
            try:
                if self.depth > max_depth:
                    raise yaml.YAMLError(f"nested deeper than {max_depth} levels")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.YAMLError(f"key {_clip(key)} is given twice")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return StrictLoader
