"""llm-pack build side: manifests, model sources, conda environments, bundle assembly, `pack` CLI."""

__version__ = "0.1.0"
