"""A tunelab template as a Jinja chat template, so plain transformers (and vLLM, llama.cpp) render its prompts.

Only :class:`~tunelab.data.template.StringTemplate` needs this: a run trained with the tokenizer's own chat template
keeps that template. The Jinja is built from expressions only (``{{ ... }}`` and ``{% ... %}`` with no literal text
between them), so the whitespace options transformers sets (``trim_blocks``, ``lstrip_blocks``) change nothing.
Every generated template is checked against :meth:`Template.render` by :func:`check_chat_template` before use.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.data.record import Turn
from tunelab.data.template import ChatTemplate, StringTemplate, Template
from tunelab.errors import ModelError

# Conversations the rendered Jinja is compared on: with and without a system prompt, several turns, braces and
# Chinese in the content (templates are filled with str.replace, so braces are ordinary text).
_CHECK_CONVERSATIONS: tuple[tuple[str | None, tuple[Turn, ...]], ...] = (
    (None, (Turn("user", "What is 2 plus 3?"),)),
    ("You answer in JSON.", (Turn("user", "加入购物车 {\"size\": \"L\"}"),)),
    ("Be brief.", (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "again"))),
    (None, (Turn("user", "a"), Turn("assistant", "b\n\nc"), Turn("user", "d"), Turn("assistant", "e"),
            Turn("user", "f"))),
)


def _literal(text: str) -> str:
    """A Jinja string literal for ``text``: JSON escapes are a subset of the ones Jinja decodes."""
    return json.dumps(text, ensure_ascii=True)


def _filled(template: StringTemplate, pattern: str) -> tuple[str, str]:
    """``pattern`` with eos/bos filled in, split around ``{content}`` into (before, after)."""
    text = pattern.replace("{eos}", template.eos_token).replace("{bos}", template.bos_token)
    before, _, after = text.partition("{content}")
    return before, after


def _emit(template: StringTemplate, pattern: str, content: str) -> str:
    before, after = _filled(template, pattern)
    if "{content}" not in pattern:
        return f"{{{{ {_literal(before)} }}}}"
    return f"{{{{ {_literal(before)} + {content} + {_literal(after)} }}}}"


def jinja_chat_template(template: StringTemplate) -> str:
    """The Jinja equivalent of ``template``: the same text as :meth:`StringTemplate.render` for every conversation.

    A ``system`` message first sets the system prompt (else the template's default); ``user`` and ``assistant``
    messages follow. Like ``render``, it writes the generation prompt after every user turn, so a conversation
    ending in a user turn ends with it whether or not ``add_generation_prompt`` is set.
    """
    generation = _literal(_filled(template, template.generation_prompt)[0])
    default = _literal(template.default_system) if template.default_system else "none"
    return "".join([
        _emit(template, template.prefix, "''"),
        "{% if messages and messages[0]['role'] == 'system' %}",
        "{% set system_text = messages[0]['content'] %}{% set loop_messages = messages[1:] %}",
        "{% else %}",
        f"{{% set system_text = {default} %}}{{% set loop_messages = messages %}}",
        "{% endif %}",
        "{% if system_text %}", _emit(template, template.system, "system_text"), "{% endif %}",
        "{% for message in loop_messages %}",
        "{% if message['role'] == 'user' %}", _emit(template, template.user, "message['content']"),
        f"{{{{ {generation} }}}}",
        "{% elif message['role'] == 'assistant' %}", _emit(template, template.assistant, "message['content']"),
        "{% else %}{{ raise_exception('this template knows the roles system, user and assistant') }}",
        "{% endif %}",
        "{% endfor %}",
    ])


def _expected(template: Template, system: str | None, turns: tuple[Turn, ...]) -> str:
    return "".join(segment.text for segment in template.render(system, turns, add_generation_prompt=True))


def check_chat_template(template: Template, tokenizer: Any) -> int:
    """Check that ``tokenizer.apply_chat_template`` renders the prompts ``template`` renders; the number checked.

    Raises :class:`ModelError` naming the first conversation whose text differs.
    """
    for system, turns in _CHECK_CONVERSATIONS:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            t.to_dict() for t in turns]
        got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = _expected(template, system, turns)
        if got != want:
            raise ModelError(f"the exported chat template renders {got!r} where template {template.name!r} renders "
                             f"{want!r} (messages {messages!r})")
    return len(_CHECK_CONVERSATIONS)


def install_chat_template(template: Template, tokenizer: Any) -> str:
    """Give ``tokenizer`` a chat template equivalent to ``template`` and check it; returns where it came from."""
    if isinstance(template, ChatTemplate):
        source = "the tokenizer's own chat template (the run trained with it)"
    else:
        assert isinstance(template, StringTemplate)
        tokenizer.chat_template = jinja_chat_template(template)
        source = f"tunelab template {template.name!r}, written as Jinja"
    check_chat_template(template, tokenizer)
    return source
