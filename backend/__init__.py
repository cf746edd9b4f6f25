"""FarSLIP backend: dense open-vocabulary segmentation of GeoTIFFs."""

# The project's one version: pyproject.toml reads it (dynamic version), scripts/build_plugin.py writes it
# into the plugin's metadata.txt, CHANGELOG.md names it.
__version__ = "0.1.0"
