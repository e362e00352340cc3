"""Spark's `LLM/` (a Hugging Face Qwen2 causal LM) as a TensorRT-LLM checkpoint, written by the project.

A TensorRT-LLM checkpoint is a folder with `config.json` (the model's `PretrainedConfig`, here
TensorRT-LLM's `QWenConfig` fields) and one `rank{N}.safetensors` per rank; `trtllm-build` turns it
into an engine. The key mapping follows TensorRT-LLM's Qwen2 converter (models/qwen/convert.py,
single rank, no quantisation) and its module definitions (layers/mlp.py `GatedMLP`:
proj(act(fc(x)) * gate(x)), so HF `gate_proj` (the activated branch) -> `mlp.fc`, `up_proj` ->
`mlp.gate`):

    model.embed_tokens                      -> transformer.vocab_embedding
    model.layers.i.input_layernorm          -> transformer.layers.i.input_layernorm
    model.layers.i.self_attn.{q,k,v}_proj   -> transformer.layers.i.attention.qkv (rows q, k, v; + bias)
    model.layers.i.self_attn.o_proj         -> transformer.layers.i.attention.dense
    model.layers.i.post_attention_layernorm -> transformer.layers.i.post_layernorm
    model.layers.i.mlp.gate_proj            -> transformer.layers.i.mlp.fc
    model.layers.i.mlp.up_proj              -> transformer.layers.i.mlp.gate
    model.layers.i.mlp.down_proj            -> transformer.layers.i.mlp.proj
    model.norm                              -> transformer.ln_f
    lm_head (or the embedding when tied)    -> lm_head

Every tensor is stored in the checkpoint dtype (bf16 by default). TensorRT-LLM's own converter
(`examples/models/core/qwen/convert_checkpoint.py` in the image) produces the same layout; this one
needs only safetensors and torch, so its output is tested on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: --precision names -> TensorRT-LLM dtype names
PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def trtllm_config(hf: dict, dtype: str) -> dict:
    """TensorRT-LLM `QWenConfig` fields (as its `to_dict` writes them) from an HF Qwen2 `config.json`."""
    if hf.get("model_type") != "qwen2":
        raise ValueError(f"LLM config model_type is {hf.get('model_type')!r}; only qwen2 is converted here")
    if any(t != "full_attention" for t in hf.get("layer_types") or ["full_attention"]):
        raise ValueError("sliding-window layers are not supported by this converter")
    heads = int(hf["num_attention_heads"])
    # transformers < 5 writes rope_theta / rope_scaling at the top; 5.x nests them in rope_parameters
    rope = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    return {
        "architecture": "Qwen2ForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",  # sampling reads float32 logits, as the torch runtime does
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_hidden_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hf.get("num_key_value_heads", heads)),
        "head_size": int(hf.get("head_dim") or hf["hidden_size"] // heads),
        "intermediate_size": int(hf["intermediate_size"]),
        "hidden_act": hf.get("hidden_act", "silu"),
        "norm_epsilon": float(hf["rms_norm_eps"]),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": int(hf["max_position_embeddings"]),
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "qwen_type": "qwen2",
        "attn_bias": True,  # Qwen2 has q/k/v biases, no o_proj bias
        "mlp_bias": False,
        "use_logn_attn": False,
        "disable_weight_only_quant_plugin": False,
        "seq_length": int(hf.get("seq_length", 8192)),
    }


def convert_state(hf_state: dict[str, torch.Tensor], hf: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF Qwen2 tensors -> TensorRT-LLM checkpoint tensors (shapes checked), all in `dtype`."""
    layers = int(hf["num_hidden_layers"])
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads", heads))
    head = int(hf.get("head_dim") or hidden // heads)
    inter = int(hf["intermediate_size"])

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf_state:
            raise ValueError(f"LLM weights lack {name}")
        t = hf_state[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        return t.to(dtype).contiguous()

    out: dict[str, torch.Tensor] = {}
    embed = get("model.embed_tokens.weight", (int(hf["vocab_size"]), hidden))
    out["transformer.vocab_embedding.weight"] = embed
    for i in range(layers):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        a = src + "self_attn."
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight", (hidden,))
        out[dst + "attention.qkv.weight"] = torch.cat([get(a + "q_proj.weight", (heads * head, hidden)),
                                                       get(a + "k_proj.weight", (kv * head, hidden)),
                                                       get(a + "v_proj.weight", (kv * head, hidden))]).contiguous()
        out[dst + "attention.qkv.bias"] = torch.cat([get(a + "q_proj.bias", (heads * head,)),
                                                     get(a + "k_proj.bias", (kv * head,)),
                                                     get(a + "v_proj.bias", (kv * head,))]).contiguous()
        out[dst + "attention.dense.weight"] = get(a + "o_proj.weight", (hidden, heads * head))
        out[dst + "post_layernorm.weight"] = get(src + "post_attention_layernorm.weight", (hidden,))
        out[dst + "mlp.fc.weight"] = get(src + "mlp.gate_proj.weight", (inter, hidden))
        out[dst + "mlp.gate.weight"] = get(src + "mlp.up_proj.weight", (inter, hidden))
        out[dst + "mlp.proj.weight"] = get(src + "mlp.down_proj.weight", (hidden, inter))
    out["transformer.ln_f.weight"] = get("model.norm.weight", (hidden,))
    if "lm_head.weight" in hf_state:
        out["lm_head.weight"] = get("lm_head.weight", (int(hf["vocab_size"]), hidden))
    elif hf.get("tie_word_embeddings", False):
        out["lm_head.weight"] = embed.clone()  # TensorRT-LLM keeps its own output projection
    else:
        raise ValueError("LLM weights lack lm_head.weight and the embedding is not tied")
    return out


def read_hf_state(llm_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(llm_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{llm_dir}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def convert(llm_dir: str | Path, out_dir: str | Path, precision: str = "bf16") -> dict:
    """Write `out_dir/config.json` and `out_dir/rank0.safetensors` from `llm_dir`; returns the config."""
    from safetensors.torch import save_file

    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    hf = json.loads((llm_dir / "config.json").read_text())
    dtype_name = PRECISION_DTYPE[precision]
    config = trtllm_config(hf, dtype_name)
    weights = convert_state(read_hf_state(llm_dir), hf, DTYPES[dtype_name])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "rank0.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return config


# -- a reference forward over the converted tensors (tests: the mapping means what it says) ---------

def reference_logits(weights: dict[str, torch.Tensor], config: dict, ids: list[int]) -> torch.Tensor:
    """Causal LM logits [T, V] computed from TensorRT-LLM checkpoint tensors with TensorRT-LLM's
    module semantics (fused qkv rows q|k|v, GPT-NeoX rotary, GatedMLP proj(silu(fc x) * gate x),
    RMSNorm), in float32. Used to prove the conversion against the HF model on the CPU."""
    w = {k: v.float() for k, v in weights.items()}
    hd, nh, nkv = config["head_size"], config["num_attention_heads"], config["num_key_value_heads"]
    eps, base = config["norm_epsilon"], config["rotary_base"]
    t = len(ids)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

    def rope(x):  # [H, T, D], rotate halves (GPT-NeoX style)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    h = w["transformer.vocab_embedding.weight"][torch.tensor(ids)]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        qkv = x @ w[p + "attention.qkv.weight"].T + w[p + "attention.qkv.bias"]
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
        q = rope(q.view(t, nh, hd).transpose(0, 1))
        k = rope(k.view(t, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
        v = v.view(t, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        att = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + (att @ v).transpose(0, 1).reshape(t, nh * hd) @ w[p + "attention.dense.weight"].T
        x = rms(h, w[p + "post_layernorm.weight"])
        gated = torch.nn.functional.silu(x @ w[p + "mlp.fc.weight"].T) * (x @ w[p + "mlp.gate.weight"].T)
        h = h + gated @ w[p + "mlp.proj.weight"].T
    return rms(h, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T
