"""``llm-install bench``: the post-install benchmark of an installed instance (run.py), the built-in
streaming client for environments without a working ``vllm bench serve`` (client.py), and the table,
JSON rows and SVG curve (report.py). Standard library only: runs on the target."""
