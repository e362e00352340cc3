"""The studio app side: UI, Triton client, embedded server, CLI. Never imports torch at module level."""
