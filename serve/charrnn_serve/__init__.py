"""charrnn serving: an OpenAI-compatible completions server over the runtime's batched Engine.

`charrnn-serve` runs it in one process (FastAPI + uvicorn); `charrnn-serve --ray` runs the same app
as a Ray Serve deployment with several replicas.
"""
