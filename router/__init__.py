"""The router: OpenAI-compatible HTTP front end (aiohttp, no torch). See app.py."""
