"""YAML configurations shipped with the package (tiny, shapes demo and paper settings)."""
