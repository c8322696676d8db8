"""Tests of the Ollama stand-in (tests/support/standin), run under real Granian."""
