"""Engine layer: raster reading, models, dense patch features, text, the sliding-window engine,
segmentation, vectorising, export and presets. No CLI, HTTP or training imports."""
