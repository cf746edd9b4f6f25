"""FarSLIP backend: dense open-vocabulary segmentation of GeoTIFFs."""

__version__ = "0.1.0"
