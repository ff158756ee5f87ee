"""The serving engine: scheduler, pipeline executor, sampling, and the user-facing API."""
