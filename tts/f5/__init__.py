"""F5-TTS: flow-matching DiT + Vocos, 24 kHz."""
