"""Scale layer: `segment` over many rasters or a mosaic on Ray workers, resumable, same output as one process.

Imports the engine and Ray (Ray only inside functions, so a single-process `segment` never loads
it); never typer, FastAPI/HTTP, `backend.service` or `training`.
"""
