"""The engine: scheduler + runner + output processing, and the offline ``LLM`` API."""
