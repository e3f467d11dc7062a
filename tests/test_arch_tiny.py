"""One tiny-model runner for every architecture (as mlx-lm's tests do): a random model built with
transformers' own classes (config + from_config, saved), `qconvert` to F32, then our runtime against
transformers' logits (within 1e-4) and greedy tokens; the same after the GGUF -> HF exporter.

An architecture joins by adding one CASES entry: (HF class, config class, config overrides).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import CHAT_TEMPLATE  # noqa: E402

from qf.convert.export import export_hf  # noqa: E402
from qf.convert.pipeline import convert  # noqa: E402
from qf.runtime import Model  # noqa: E402

TOL = 1e-4
N_GREEDY = 8
PROMPT = [5, 17, 42, 101, 7, 250, 3, 99, 64, 12, 200, 31]

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (HF model class, config class, config overrides, GGUF architecture)
CASES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": True}, "llama"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": False}, "qwen2"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
               "gemma3"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}, "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                 {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "norm_topk_prob": True, "tie_word_embeddings": False}, "qwen3moe"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False}, "llama"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0, "tie_word_embeddings": False}, "phi3"),
    "phi3-longrope": ("Phi3ForCausalLM", "Phi3Config",
                      {"pad_token_id": 0, "tie_word_embeddings": False, "original_max_position_embeddings": 64,
                       "partial_rotary_factor": 0.5,
                       "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0, 1.5, 2.0, 4.0],
                                        "short_factor": [1.0, 1.1, 1.3, 2.5]}}, "phi3"),
}


def _write_tokenizer(d: Path, tok: dict[str, Any]) -> int:
    """tokenizer.json + tokenizer_config.json of the shared tiny BPE; its vocabulary size."""
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE, "add_prefix_space": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return len(tok["model"]["vocab"])


def _perturb(model: Any, seed: int) -> None:
    """Random weights large enough that routing, norms and every head matter (transformers' init is tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def build_hf(case: str, d: Path, tok: dict[str, Any], seed: int = 0) -> Path:
    """A saved random transformers model of one case (F32 safetensors + tokenizer)."""
    cls, cfg_cls, over, _ = CASES[case]
    d.mkdir(parents=True)
    n_vocab = _write_tokenizer(d, tok)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, "vocab_size": n_vocab, "bos_token_id": 1, "eos_token_id": 2,
                                            **over})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)._from_config(cfg, dtype=torch.float32)
    _perturb(model, seed)
    model.eval()
    model.save_pretrained(d)
    return d


def hf_logits(d: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits [n, n_vocab] for one sequence."""
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(d: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (no sampling, no stop)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def our_greedy(m: Model, ids: list[int], n: int) -> list[int]:
    """Our greedy continuation through the engine (prefill, then one step per token)."""
    eng = m.engine
    with eng.lock:
        eng.cache.clear()
        logits, _ = eng.prefill(ids)
        out = []
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = eng.step(tok)
        eng.cache.clear()
    return out


@pytest.fixture(scope="module", params=list(CASES))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              tiny_bpe_json: dict[str, Any]) -> tuple[str, Path, Path]:
    """(case, HF folder, our F32 conversion of it)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, root / "hf", tiny_bpe_json)
    out = root / "model.qf"
    convert(hf, out, "F32")
    return request.param, hf, out


def test_logits_and_greedy_match_transformers(converted: tuple[str, Path, Path]) -> None:
    case, hf, path = converted
    ref = hf_logits(hf, PROMPT)
    with Model.load(path, n_ctx=64, gpu_layers=0, warmup=False, type_k="f32", type_v="f32") as m:
        assert m.hparams.arch == CASES[case][3]
        got = m.logits(PROMPT)
        assert np.abs(got - ref).max() < TOL, f"{case}: max |diff| {np.abs(got - ref).max():.2e}"
        assert our_greedy(m, PROMPT, N_GREEDY) == hf_greedy(hf, PROMPT, N_GREEDY)


def test_exporter_round_trip_matches_transformers(converted: tuple[str, Path, Path], tmp_path: Path) -> None:
    case, hf, path = converted
    back = export_hf(path, tmp_path / "back", dtype="float32")
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == [CASES[case][0]]
    ref = hf_logits(hf, PROMPT)
    got = hf_logits(back, PROMPT)
    assert np.abs(got - ref).max() < TOL, f"{case}: exported model differs by {np.abs(got - ref).max():.2e}"
    again = tmp_path / "again.qf"
    convert(back, again, "F32")
    with Model.load(again, n_ctx=64, gpu_layers=0, warmup=False, type_k="f32", type_v="f32") as m:
        assert np.abs(m.logits(PROMPT) - ref).max() < TOL


@pytest.mark.parametrize("case, over, match", [
    ("qwen3moe", {"norm_topk_prob": False}, "norm_topk_prob false is not supported"),
    ("qwen3moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3", {"attention_bias": True}, "attention_bias true"),
    ("phi3", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling 'yarn' is not supported for phi3"),
])
def test_what_gguf_cannot_say_is_refused(case: str, over: dict[str, Any], match: str, tmp_path: Path,
                                         tiny_bpe_json: dict[str, Any]) -> None:
    from qf.format.errors import ConvertError

    hf = build_hf(case, tmp_path / "hf", tiny_bpe_json)
    cfg = json.loads((hf / "config.json").read_text()) | over
    cfg.pop("rope_parameters", None) if "rope_scaling" in over else None
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=match):
        convert(hf, tmp_path / "o.qf", "F32")
    assert not (tmp_path / "o.qf").exists()
