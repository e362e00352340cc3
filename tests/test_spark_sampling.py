"""tts/spark/decode.py sampling: the top-k candidate path equals sorting the whole vocabulary.

The device sampler sorts only the best max_k + TIE_MARGIN logits; rows where ties may reach past that
cut are redrawn over the whole vocabulary. Both must pick the same tokens for the same draws, also
with heavy ties, greedy rows mixed in and end tokens masked (top_k off always sorts all).
"""

import torch

from tts.spark.decode import (GRAPH_LENGTHS, GRAPH_ROWS, SamplingParams, Sequence, finish_sampling,
                              graph_buckets, pick_bucket, plan_sampling, sample_on_device, sample_tokens)

END = (7,)


def _rows(seed: int):
    g = torch.Generator().manual_seed(seed)
    configs = [(50, 0.8, 0.95, 0), (1, 0.8, 0.95, 0), (2, 1.3, 1.0, 3), (400, 1.0, 0.5, 0), (20, 0.0, 0.9, 0)]  # top_k off sorts all
    seqs = []
    for r, (k, t, p, mn) in enumerate(configs):
        s = Sequence([1], SamplingParams(temperature=t, top_k=k, top_p=p, min_new_tokens=mn), END, seed=seed * 10 + r)
        s.generated = [5]
        seqs.append(s)
    return g, seqs


def test_candidate_cut_matches_the_whole_vocabulary():
    for seed in range(20):
        g, seqs = _rows(seed)
        logits = torch.randn(len(seqs), 3000, generator=g) * 3
        if seed % 2:
            logits = torch.randint(0, 4, logits.shape, generator=g).float()  # ~750 ties at each value: redrawn
        plan = plan_sampling(seqs)
        cut = finish_sampling(logits, plan, sample_on_device(logits, plan))
        whole = sample_on_device(logits, plan, full=True)
        assert whole[1].sum() == 0
        assert cut == whole[0].tolist()


def test_greedy_and_masked_end_rows():
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]] * 2)
    seqs = [Sequence([1], SamplingParams(top_k=1, min_new_tokens=2), END, seed=0),  # end token masked
            Sequence([1], SamplingParams(top_k=1), END, seed=0)]
    assert sample_tokens(logits, seqs) == [1, 7]


def test_graph_buckets_cover_every_row_count_and_length():
    rows = graph_buckets(GRAPH_ROWS, 12)
    assert rows == [1, 2, 4, 8, 12]
    assert [pick_bucket(rows, n) for n in (1, 3, 8, 9, 12)] == [1, 4, 8, 12, 12]
    assert graph_buckets(GRAPH_LENGTHS, 3000)[-1] == 3000 and graph_buckets(GRAPH_ROWS, 1) == [1]
