"""Load and validate a bundle manifest (YAML) into `packager.spec.Manifest` (`pack validate`, `pack build`).

- ``schema``: the JSON Schema, the one source of what is enforced and what `pack schema` publishes
  (packager/schema/manifest.schema.json is its text);
- ``nodes``: YAML nodes to plain data, with the line and column of every value, and what only YAML can get
  wrong (tags, key types, duplicate keys, alias bombs);
- ``validate``: that data checked with jsonschema against the published schema, each error at its node;
- ``rules``: the semantic rules JSON Schema cannot express (and the warnings);
- ``problems``: file:line:col, field path, "did you mean";
- ``load``: `load_manifest`, the steps in order, and the typed spec.
"""

from packager.manifest.load import load_manifest
from packager.manifest.rules import manifest_warnings
from packager.manifest.schema import SCHEMA, schema_json

__all__ = ["SCHEMA", "load_manifest", "manifest_warnings", "schema_json"]
