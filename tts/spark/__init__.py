"""Spark-TTS: Qwen2.5-0.5B LLM over BiCodec tokens, 16 kHz."""
