"""Service layer: command line, HTTP server, jobs, schemas and benchmarks. The only layer that
imports `training`, to expose it."""
