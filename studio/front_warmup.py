"""One request through every front instance once the server is ready.

The front models (`f5_tts`, `f5_tts_stream`, `spark_tts`, `spark_tts_stream`) run one stub process
per instance (16 by default), and Triton hands consecutive requests to different instances. An
instance's first requests were the slowest part of the way in: measured on the CPU (F5 offline,
c=1, 48 traced requests, demo weights, engine loop on), the front's leg to its BLS request took
3.9-5.8 ms (median) when the bench's 2 warm-up requests left most instances unused, 2.7-3.6 ms
after 18 warm-up requests had passed through all of them, and the way in (`path_in_ms_mean`)
9.0-13.1 against 6.4-7.7 ms. So the server manager sends, per front model, as many requests at
once as it has instances (each front instance holds its request until the engine answers, so
each instance gets one), with a short text and few steps, before `TritonServer.start()` returns
(Triton is ready and serving meanwhile: a request sent then waits behind the warm-up's).
Failures are logged, never fatal: a family whose engine cannot serve still starts as before.

Off by default (`STUDIO_WARM_FRONTS=1` turns it on). On an H100 (2026-12-08, two servers of one
run, full-size random weights, F5 offline c=1, 32 requests) the way in was 5.2 ms with the warm-up
and 4.9 ms without, the way back 4.0 and 3.8 ms: the host there (16 cores) shows no first-request
penalty worth the start-up time. On the CPU a real-weight F5 or Spark request takes seconds, so sixteen of them
per front model would lengthen the start by far more than they save.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

WARM_FRONTS_ENV = "STUDIO_WARM_FRONTS"
#: Per warm-up request (s): a front stuck this long is left to the supervisor, start-up goes on.
WARM_TIMEOUT_S = 60.0
#: What each family's warm-up request asks for: the shortest real request (F5: 2 ODE steps; Spark:
#: 8 tokens, fixed because random weights never emit the end token).
WARM_PARAMS = {"f5": {"nfe_steps": 2, "seed": 0}, "spark": {"max_new_tokens": 8, "min_new_tokens": 8, "seed": 0}}
WARM_TEXT = "Warm up."
WARM_PROMPT_TEXT = "A short prompt."
#: The synthetic prompt: long enough for the prompt checks (>= 0.5 s), loud enough not to be silence.
WARM_PROMPT_S = 1.5


def warm_prompt(sample_rate: int) -> np.ndarray:
    """[N] float32: a voiced-like buzz (150 Hz and its harmonics under a 4 Hz syllable envelope)."""
    t = np.arange(int(WARM_PROMPT_S * sample_rate), dtype=np.float64) / sample_rate
    buzz = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    envelope = 0.5 - 0.5 * np.cos(2 * np.pi * 4 * t)
    return (0.2 * buzz * envelope / np.abs(buzz).max()).astype(np.float32)


def warm_fronts(grpc_url: str, families: list[str], instances: int, log=print) -> dict[str, int]:
    """Send `instances` concurrent requests to each front of `families` (f5, spark; offline and
    streaming); returns front model -> requests that succeeded. Never raises for a failed request."""
    from studio.client import SAMPLE_RATES, StudioClient, triton_model_name

    done: dict[str, int] = {}
    if instances < 1:
        return done
    for family in [f for f in families if f in WARM_PARAMS]:
        prompt = warm_prompt(SAMPLE_RATES[family])
        for stream in (False, True):
            name = triton_model_name(family, stream)
            started = time.perf_counter()
            clients: list[StudioClient] = []
            try:
                for _ in range(instances):
                    clients.append(StudioClient(grpc_url))

                def one(client: StudioClient) -> str | None:
                    try:
                        client.synthesize(family, WARM_TEXT, prompt, WARM_PROMPT_TEXT, stream=stream,
                                          params=dict(WARM_PARAMS[family]), timeout_s=WARM_TIMEOUT_S)
                        return None
                    except Exception as exc:  # noqa: BLE001 - logged; start-up goes on
                        return f"{type(exc).__name__}: {exc}"

                with ThreadPoolExecutor(instances) as pool:
                    errors = list(pool.map(one, clients))
            finally:
                for client in clients:
                    client.close()
            failed = [e for e in errors if e is not None]
            done[name] = len(errors) - len(failed)
            note = f"; {len(failed)} failed, e.g. {failed[0][:200]}" if failed else ""
            log(f"warmed {name}: {done[name]} of {instances} instances in {time.perf_counter() - started:.1f} s{note}")
    return done
