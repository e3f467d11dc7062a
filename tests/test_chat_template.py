"""Chat templates: rendered only in jinja2's immutable sandbox; hostile templates are refused."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from qf.format.errors import ModelError
from qf.format.reader import open_gguf
from qf.runtime.chat import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, chat_template_from_metadata

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_template_renders_chatml(smollm2_gguf: Path) -> None:
    with open_gguf(smollm2_gguf) as f:
        t = chat_template_from_metadata(f.meta, "<|im_start|>", "<|im_end|>")
    assert t.render(MESSAGES) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    sys_msgs = [{"role": "system", "content": "Be brief."}] + MESSAGES
    assert t.render(sys_msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")


def test_missing_template_falls_back_to_chatml(gemma3_gguf: Path) -> None:
    with open_gguf(gemma3_gguf) as f:
        assert "tokenizer.chat_template" not in f.meta
        t = chat_template_from_metadata(f.meta)
    assert t.source == CHATML_TEMPLATE
    assert t.render(MESSAGES).endswith("<|im_start|>assistant\n")


def test_hf_helpers_are_available() -> None:
    t = ChatTemplate("{{ bos_token }}{{ strftime_now('%Y') }}|{{ messages | tojson }}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "é"}]) == (
        f'<s>{datetime.now().year}|[{{"role": "user", "content": "é"}}]')
    t = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="system first"):
        t.render(MESSAGES)


HOSTILE = [
    # CVE-2024-34359 style: reach os through a global's __globals__
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch CANARY') }}",
    "{{ namespace.__init__.__globals__.__builtins__['open']('CANARY', 'w').write('x') }}",
    # walk the class hierarchy to find a file-writing class
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'FileIO' %}"
    "{{ c('CANARY', 'w') }}{% endif %}{% endfor %}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ self.__init__.__globals__.__builtins__.open('CANARY', 'w') }}",
    "{{ lipsum.__globals__['os'].popen('touch CANARY') }}",
    # mutate shared state (the immutable sandbox forbids it)
    "{% set x = messages.append({'role': 'x', 'content': 'y'}) %}{{ messages | length }}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_templates_are_refused(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = source.replace("CANARY", str(tmp_path / "canary"))
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source).render([dict(m) for m in MESSAGES])
    assert isinstance(e.value, ModelError)
    assert not (tmp_path / "canary").exists()
    assert not any(tmp_path.iterdir())


def test_template_errors_are_reported() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}").compile()
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}").render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="failed"):
        ChatTemplate("{{ messages[5]['content'] | int / 0 }}").render(MESSAGES * 6)
    with pytest.raises(ChatTemplateError, match="message 0"):
        ChatTemplate("x").render([{"role": "user"}])


def test_runaway_output_is_cut_off() -> None:
    t = ChatTemplate("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="output budget of 16777216 characters.*QF_TEMPLATE_MAX_OUTPUT"):
        t.render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="(?i)range too big"):
        ChatTemplate("{% for i in range(10**9) %}x{% endfor %}").render(MESSAGES)
