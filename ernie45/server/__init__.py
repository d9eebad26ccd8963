"""OpenAI-compatible HTTP server (FastAPI + uvicorn) around the AsyncLLM engine front: `ernie45 serve`.

`app.build_app(front, tokenizer, served_model_name, ...)` builds the app; `serve.run(args)` is the CLI entry.
"""
