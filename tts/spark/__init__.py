"""Spark-TTS: Qwen2.5-0.5B LLM over BiCodec tokens, 16 kHz.

Imports nothing heavy. Modules, one concern each:

    config           configs rebuilt from the checkpoint's files; SAMPLE_RATE, TOKENS_PER_SECOND, ...
    mel              torchaudio-equivalent mel spectrogram (no torchaudio)
    layers, vocos, quantizers, speaker, wave_generator, bicodec     the BiCodec codec
    reference, audio_tokenizer                                      reference clip -> tokens, tokens -> audio
    prompts, tokenizer                                              upstream's prompts; text <-> ids
    kv_cache, llm, decode                                           static-cache decode loop (CUDA graphs on GPU)
    text_split, streaming, request, session, scheduler              requests, segments, chunking, in-flight batching
    pipeline         SparkPipeline: models + prompt cache; synthesize / stream one request
    engine           SparkEngine: thread-safe in-flight batching over many requests
    demo             write_demo_checkpoint: tiny (or full-size) random weights in the published layout
"""
