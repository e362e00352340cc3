"""Model code for the voice studio: no Triton imports, importable without torch at package level."""
